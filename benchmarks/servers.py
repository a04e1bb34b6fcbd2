"""Server processes for the benchmarks: ``python -m benchmarks.servers KIND [options]``.

Each prints ``ready <host:port>`` once it accepts connections, then serves until terminated.
With ``--tls-cert`` and ``--tls-key`` (PEM files) each serves inside TLS instead.

    ra        a remote_autograd trunk server (an echo trunk, or the GPT-2 trunk of bench_step)
    tcp       a raw TCP echo: 8-byte length, then that many bytes, echoed back
    grpc      a bare gRPC echo of bytes (``/bench.Echo/Unary``; streamed: ``/bench.Echo/Stream``)

(The torch.distributed.rpc pair lives in ``benchmarks.rpc_baseline``: both of its processes
busy-poll, so it runs in a phase of its own.)
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import threading
from concurrent import futures
from typing import Any

import torch
from torch import nn

GRPC_MAX_MESSAGE = 1 << 30


class EchoTrunk(nn.Module):
    """Returns its input (as a view, so autograd has a node): transfer cost only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)


def _wait_for_signal() -> None:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()


def serve_ra(args: argparse.Namespace) -> None:
    from remote_autograd import ServerOptions, serve

    if args.trunk == "echo":
        module: nn.Module = EchoTrunk()
    else:
        from benchmarks.bench_step import build_trunk

        module = build_trunk(args.trunk)
    chain, key = _tls_files(args)
    options = ServerOptions(
        device=args.device,
        compression=args.compression,
        unary_payload_bytes=args.unary_bytes,
        stream_chunk_bytes=args.chunk_bytes,
        insecure=True,
        certificate_chain=chain,
        private_key=key,
    )
    torch.manual_seed(0)
    server = serve(module, f"{args.host}:0", options=options)
    print(f"ready {server.address}", flush=True)
    _wait_for_signal()
    server.stop(grace=None)


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _tcp_client(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    header = bytearray(8)
    with conn:
        try:
            while True:
                _recv_exact(conn, memoryview(header))
                (size,) = struct.unpack(">Q", header)
                if len(buffer) < size:
                    buffer = bytearray(size)
                view = memoryview(buffer)[:size]
                _recv_exact(conn, view)
                conn.sendall(header)
                conn.sendall(view)
        except ConnectionError:
            return


def _tls_files(args: argparse.Namespace) -> tuple[bytes | None, bytes | None]:
    if not args.tls_cert:
        return None, None
    with open(args.tls_cert, "rb") as chain, open(args.tls_key, "rb") as key:
        return chain.read(), key.read()


def serve_tcp(args: argparse.Namespace) -> None:
    listener = socket.create_server((args.host, 0))
    print(f"ready {args.host}:{listener.getsockname()[1]}", flush=True)
    context = None
    if args.tls_cert:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)

    def client(conn: socket.socket) -> None:
        if context is not None:
            conn = context.wrap_socket(conn, server_side=True)
        _tcp_client(conn)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    _wait_for_signal()


def serve_grpc(args: argparse.Namespace) -> None:
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        return request

    def stream(requests: Any, context: Any) -> Any:
        # Assemble then echo, like a frame: the reply starts after the whole request arrived.
        chunks = [bytes(r) for r in requests]
        yield from chunks

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    options = [
        ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
        ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    server.add_generic_rpc_handlers((handler,))
    chain, key = _tls_files(args)
    if chain is not None:
        credentials = grpc.ssl_server_credentials([(key, chain)])
        port = server.add_secure_port(f"{args.host}:0", credentials)
    else:
        port = server.add_insecure_port(f"{args.host}:0")
    server.start()
    print(f"ready {args.host}:{port}", flush=True)
    _wait_for_signal()
    server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    ra = sub.add_parser("ra")
    ra.add_argument("--trunk", default="echo", help="echo, or a preset of bench_step")
    ra.add_argument("--device", default="cpu", help="where the trunk runs: cpu, cuda...")
    ra.add_argument("--compression", default="auto")
    ra.add_argument("--unary-bytes", type=int, default=1 << 20)
    ra.add_argument("--chunk-bytes", type=int, default=1 << 20)
    for name in ("tcp", "grpc"):
        sub.add_parser(name)
    for p in sub.choices.values():
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--tls-cert", help="PEM certificate: serve inside TLS")
        p.add_argument("--tls-key", help="PEM key of --tls-cert")
    args = parser.parse_args()
    {"ra": serve_ra, "tcp": serve_tcp, "grpc": serve_grpc}[args.kind](args)


if __name__ == "__main__":
    main()
