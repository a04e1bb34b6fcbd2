"""The ``remote-autograd`` console command: ``serve``, and the subcommands of remote_autograd.hf."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .options import Limits, ServerOptions

__all__ = ["load_factory", "main"]


def load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:callable`` -> the callable; the operator names it on the command line."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--module must look like package.module:callable, got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"--module {spec}: cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise SystemExit(f"--module {spec}: {module_name} has no attribute {attr}")
    if not callable(target):
        raise SystemExit(f"--module {spec}: {attr} is not callable")
    return target


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    parser.add_argument("--dtype", default=None, help="run the trunk in this dtype (bfloat16...)")
    defaults, limits = ServerOptions(), Limits()
    parser.add_argument(
        "--context-ttl",
        type=float,
        default=defaults.context_ttl,
        help="seconds a forward context waits for its Backward",
    )
    parser.add_argument("--max-contexts", type=int, default=defaults.max_contexts)
    parser.add_argument("--max-context-bytes", type=int, default=defaults.max_context_bytes)
    parser.add_argument("--max-session-contexts", type=int, default=defaults.max_session_contexts)
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    parser.add_argument("--session-ttl", type=float, default=defaults.session_ttl)
    parser.add_argument("--max-inflight-bytes", type=int, default=defaults.max_inflight_bytes)
    parser.add_argument("--max-payload-bytes", type=int, default=limits.max_payload_bytes)
    parser.add_argument("--max-tensor-bytes", type=int, default=limits.max_tensor_bytes)
    parser.add_argument("--max-tensor-elements", type=int, default=limits.max_tensor_elements)
    parser.add_argument("--max-tensors", type=int, default=limits.max_tensors)
    parser.add_argument(
        "--recompute",
        action="store_true",
        help="keep only inputs between Compute and Backward; recompute the forward",
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint file: loaded at start when present, saved as below"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="save after every N optimizer steps"
    )
    parser.add_argument(
        "--checkpoint-interval", type=float, default=0.0, help="save every N seconds"
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain of the server (enables TLS)")
    parser.add_argument("--tls-key", help="PEM private key of the server")
    parser.add_argument("--client-ca", help="PEM CA that client certificates must chain to (mTLS)")
    parser.add_argument(
        "--token-file", help="file with one accepted bearer token per line (tokens required)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain text on a non-loopback address"
    )
    parser.add_argument(
        "--no-bulk",
        dest="bulk",
        action="store_false",
        help="offer no bulk channel: large frames travel as gRPC streams",
    )
    parser.add_argument(
        "--bulk-port", type=int, default=0, help="TCP port of the bulk channel (0: any free one)"
    )
    parser.add_argument("--bulk-timeout", type=float, default=defaults.bulk_timeout)


def server_options(args: argparse.Namespace) -> ServerOptions:
    tokens: tuple[str, ...] = ()
    if args.token_file:
        with open(args.token_file) as f:
            tokens = tuple(line.strip() for line in f if line.strip())
    return ServerOptions(
        device=args.device,
        dtype=args.dtype,
        context_ttl=args.context_ttl,
        max_contexts=args.max_contexts,
        max_context_bytes=args.max_context_bytes,
        max_session_contexts=args.max_session_contexts,
        max_sessions=args.max_sessions,
        session_ttl=args.session_ttl,
        max_inflight_bytes=args.max_inflight_bytes,
        limits=Limits(
            max_payload_bytes=args.max_payload_bytes,
            max_tensor_bytes=args.max_tensor_bytes,
            max_tensor_elements=args.max_tensor_elements,
            max_tensors=args.max_tensors,
        ),
        certificate_chain=_read(args.tls_cert),
        private_key=_read(args.tls_key),
        client_ca=_read(args.client_ca),
        tokens=tokens,
        insecure=args.insecure,
        bulk=args.bulk,
        bulk_port=args.bulk_port,
        bulk_timeout=args.bulk_timeout,
        recompute=args.recompute,
        checkpoint_path=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        checkpoint_interval=args.checkpoint_interval,
    )


def run_server(module: Any, args: argparse.Namespace) -> None:
    from .server import serve

    server = serve(module, args.address, options=server_options(args))
    print(f"remote-autograd: serving {type(module).__name__} on {server.address}", flush=True)
    done = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    done.wait()
    server.stop(grace=5.0)


def _serve(args: argparse.Namespace) -> None:
    if args.module is None:
        from .hf.cli import serve_hf

        serve_hf(args)
        return
    module = load_factory(args.module)()
    run_server(module, args)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="remote-autograd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a trunk module")
    serve_parser.add_argument(
        "--module",
        help="package.module:callable returning the trunk nn.Module (omit for a GPT-2 trunk)",
    )
    add_server_arguments(serve_parser)
    try:
        from .hf.cli import add_commands
    except ImportError:  # the hf extra is not installed: serve --module still works
        pass
    else:
        add_commands(commands, serve_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        _serve(args)
    else:
        args.run(args)


if __name__ == "__main__":
    main()
