"""Transfer benchmark: Compute + Backward through RemoteModule vs raw TCP, gRPC and torch RPC.

Every method moves the same float32 tensor payload to a server process and back (an echo), in
the same run, payload sizes interleaved. Throughput counts tensor payload bytes both ways
(``2 * size / seconds``); lossy codecs therefore show their effective throughput.

    python -m benchmarks.bench_transfer --preset full --json transfer.json --doc
    python -m benchmarks.bench_transfer --preset smoke --link 100mbit     # needs root
    python -m benchmarks.bench_transfer --preset latency     # 4 KiB Compute vs gRPC unary only
    python -m benchmarks.bench_transfer --preset tls --tls   # everything inside TLS

With ``--tls`` every method runs inside TLS (one self-signed certificate made with openssl for
the run): the ``tcp`` baseline is then a raw TLS socket (Python ``ssl``), ``grpc_*`` are TLS gRPC,
remote_autograd's ``none`` codec takes its TLS bulk channel and ``grpc`` its TLS gRPC streams.
torch.distributed.rpc has no TLS and is left out.

The ``native`` baseline (presets ``rpc`` and ``tls``) is the ``tcp`` echo written in C
(``benchmarks/native_echo.c``, OpenSSL under ``--tls``): what this machine's TCP and TLS move
with no interpreter in the way. It is built with ``cc`` when a compiler and OpenSSL's headers
are at hand, and left out (with a note in the JSON) when they are not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import torch

from benchmarks.common import (
    ROOT,
    Link,
    MiB,
    ServerProcess,
    human_bytes,
    machine,
    measure,
    median,
    python_path,
    rate_limited_link,
    reps_for,
    save_plot,
    table,
    update_doc,
    write_json,
)

BASELINES = ("tcp", "grpc_unary", "grpc_stream", "torch_rpc")  # measured unless a preset says
KNOWN_BASELINES = (*BASELINES, "native")
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"sizes": [4 << 10, 1 << 20], "codecs": ["auto", "bf16"], "reps": 3, "warmup": 1},
    # the small-call latency alone: alternating blocks of calls, so drifting load on a noisy
    # machine hits the baseline and remote_autograd alike
    "latency": {
        "sizes": [4 << 10],
        "codecs": ["none"],
        "baselines": ["grpc_unary"],
        "reps": 200,
        "rounds": 10,
        "warmup": 50,
    },
    # over a shaped link: sizes that finish in minutes at 100 Mbit/s
    "link": {
        "sizes": [4 << 10, 64 << 10, 1 << 20, 4 << 20],
        "reps": 5,
        "warmup": 2,
        "codecs": ["none", "grpc", "auto", "bf16", "fp16", "int8"],
    },
    # inside TLS (--tls): the bulk channel vs a raw TLS socket vs TLS gRPC streams
    "tls": {
        "sizes": [1 << 20, 16 << 20, 64 << 20, 256 << 20],
        "codecs": ["none", "grpc"],
        "baselines": ["tcp", "grpc_stream", "native"],
        "reps": 5,
        "warmup": 1,
    },
    # the 64 MiB Compute + Backward against torch.distributed.rpc over TCP and a raw socket
    "rpc": {
        "sizes": [64 << 20],
        "codecs": ["none"],
        "baselines": ["tcp", "torch_rpc", "native"],
        "reps": 10,
        "warmup": 2,
    },
    "full": {
        "sizes": [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20],
        "codecs": ["none", "grpc", "auto", "lz4", "bf16", "fp16", "int8"],
        "reps": 20,
        "warmup": 3,
    },
}
# codec name -> (client compression, server compression, activation and gradient quantization,
# bulk channel on). "grpc" is "none" with the bulk channel off: every frame in gRPC messages.
CODECS = {
    "none": ("none", "none", "none", True),
    "grpc": ("none", "none", "none", False),
    "auto": ("auto", "auto", "none", True),
    "lz4": ("lz4", "lz4", "none", True),
    "bf16": ("auto", "auto", "bf16", True),
    "fp16": ("auto", "auto", "fp16", True),
    "int8": ("auto", "auto", "int8", True),
}
LOSSLESS = ("none", "grpc", "auto", "lz4")
BIG = 16 << 20  # lossy codecs are measured up to this size (they take the same path above it)


# -- baseline clients ---------------------------------------------------------------------


class TcpEcho:
    """Raw TCP: length prefix + bytes, the reply read into a preallocated buffer."""

    def __init__(self, address: str, tls: ssl.SSLContext | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()

    def roundtrip(self, payload: memoryview) -> None:
        size = len(payload)
        if len(self.buffer) < size + 8:
            self.buffer = bytearray(size + 8)
        self.sock.sendall(struct.pack(">Q", size))
        self.sock.sendall(payload)
        view = memoryview(self.buffer)[: size + 8]
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("echo server closed")
            got += n

    def close(self) -> None:
        self.sock.close()


class GrpcEcho:
    """Bare gRPC: bytes in one unary message, or streamed in chunks and reassembled."""

    def __init__(self, address: str, chunk_bytes: int = MiB, root: bytes | None = None) -> None:
        import grpc

        from benchmarks.servers import GRPC_MAX_MESSAGE

        options = [
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
        ]
        if root is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.unary_rpc = self.channel.unary_unary("/bench.Echo/Unary")
        self.stream_rpc = self.channel.stream_stream("/bench.Echo/Stream")
        self.chunk_bytes = chunk_bytes

    def unary(self, payload: memoryview) -> None:
        reply = self.unary_rpc(bytes(payload), timeout=600)
        assert len(reply) == len(payload)

    def stream(self, payload: memoryview) -> None:
        chunk = self.chunk_bytes
        requests = (bytes(payload[i : i + chunk]) for i in range(0, len(payload), chunk))
        buffer = bytearray(len(payload))
        filled = 0
        for reply in self.stream_rpc(requests, timeout=600):
            buffer[filled : filled + len(reply)] = reply
            filled += len(reply)
        assert filled == len(payload)

    def close(self) -> None:
        self.channel.close()


def torch_rpc_phase(preset: dict[str, Any], host: str, link: Link | None) -> dict[str, Any]:
    """The torch.distributed.rpc echo for every size, in two processes of its own."""
    port = _free_port(host) if link is None else 29517
    # TensorPipe's TCP transport ("uv") as between two machines: on one host it would otherwise
    # pick shared memory, which no network offers.
    common = ["--address", f"{host}:{port}", "--uv-only"]
    server = ServerProcess(
        "server",
        *common,
        "--ifname",
        link.server_if if link else "lo",
        netns=link.netns if link else None,
        module="benchmarks.rpc_baseline",
    )
    try:
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.rpc_baseline",
                "client",
                *common,
                "--ifname",
                link.client_if if link else "lo",
                "--sizes",
                ",".join(map(str, preset["sizes"])),
                "--reps",
                str(preset["reps"]),
                "--warmup",
                str(preset["warmup"]),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=python_path()),
        )
        server.process.wait(60)
    finally:
        server.stop()
    lines = [line for line in client.stdout.splitlines() if line.startswith("result ")]
    if client.returncode or not lines:
        raise RuntimeError(f"torch.distributed.rpc baseline failed: {client.stderr[-2000:]}")
    return json.loads(lines[-1][len("result ") :])


def native_phase(
    preset: dict[str, Any], host: str, link: Link | None, tls: SelfSigned | None
) -> dict[str, Any]:
    """The C echo (native_echo.c) for every size, in two processes of its own; {} with a
    "skipped" note when it cannot be built here."""
    with tempfile.TemporaryDirectory(prefix="bench-native-") as directory:
        binary = os.path.join(directory, "native_echo")
        source = os.path.join(ROOT, "benchmarks", "native_echo.c")
        built = (
            subprocess.run(
                ["cc", "-O2", "-o", binary, source, "-lssl", "-lcrypto"],
                capture_output=True,
                text=True,
            )
            if shutil.which("cc")
            else None
        )
        if built is None or built.returncode:
            why = "no C compiler" if built is None else built.stderr.strip()[-300:]
            print(f"native baseline left out: {why}", flush=True)
            return {"skipped": why}
        command = [binary, "server", host, *((tls.cert, tls.key) if tls else ())]
        if link is not None:
            command = ["ip", "netns", "exec", link.netns, *command]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            ready = server.stdout.readline().split()
            if ready[:1] != ["ready"]:
                raise RuntimeError(f"the native echo server did not start: {ready}")
            port = ready[1].rsplit(":", 1)[1]
            results = {}
            for size in preset["sizes"]:
                reps = str(reps_for(size, preset["reps"]))
                client = [binary, "client", host, port, str(size), reps, str(preset["warmup"])]
                out = subprocess.run(
                    [*client, *((tls.cert,) if tls else ())],
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=True,
                )
                seconds = json.loads(out.stdout)["s"]
                results[str(size)] = {"s": seconds, "MBps": 2 * size / seconds / 1e6}
            return results
        finally:
            server.kill()
            server.wait()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host.startswith("127.") else "127.0.0.1", 0))
        return s.getsockname()[1]


# -- remote_autograd --------------------------------------------------------------------


def ra_roundtrips(module: Any, size: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Compute and Backward seconds of ``module`` (a RemoteModule) for ``size`` bytes, per call,
    and the wire bytes of the last round trip."""
    x = torch.randn(size // 4, requires_grad=True)  # [size/4] float32: the activation
    grad = torch.randn(size // 4)  # [size/4] float32: the gradient coming back
    compute, backward = [], []
    wire = 0
    stats = module.client.stats
    for i in range(warmup + reps):
        sent, received = stats.bytes_sent, stats.bytes_received
        start = time.perf_counter()
        y = module(x)
        middle = time.perf_counter()
        y.backward(grad)
        end = time.perf_counter()
        x.grad = None
        del y
        if i >= warmup:
            compute.append(middle - start)
            backward.append(end - middle)
            wire = stats.bytes_sent - sent + stats.bytes_received - received
    return {"compute": compute, "backward": backward, "wire": [wire]}


def ra_summary(size: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    compute, backward = median(samples["compute"]), median(samples["backward"])
    return {
        "compute_s": compute,
        "backward_s": backward,
        "compute_MBps": 2 * size / compute / 1e6,
        "backward_MBps": 2 * size / backward / 1e6,
        "wire_bytes_per_roundtrip": samples["wire"][-1],  # Compute + Backward, both directions
        "payload_bytes_per_roundtrip": 4 * size,
        "calls": len(samples["compute"]),
    }


class SelfSigned:
    """A throwaway certificate for 127.0.0.1 and localhost (its own root), made with openssl."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="bench-tls-")
        self.cert = os.path.join(self._directory.name, "cert.pem")
        self.key = os.path.join(self._directory.name, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
            + ["ec_paramgen_curve:prime256v1", "-nodes", "-keyout", self.key, "-out", self.cert]
            + ["-days", "1", "-subj", "/CN=localhost"]
            + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True,
            capture_output=True,
        )
        with open(self.cert, "rb") as file:
            self.pem = file.read()
        self.client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client_context.load_verify_locations(cafile=self.cert)
        self.server_args = ("--tls-cert", self.cert, "--tls-key", self.key)

    def close(self) -> None:
        self._directory.cleanup()


def run(preset: dict[str, Any], link: Link | None, tls: SelfSigned | None = None) -> dict:
    from remote_autograd import ClientOptions, RemoteModule

    sizes, codecs = preset["sizes"], preset["codecs"]
    baselines = preset.get("baselines", BASELINES)
    rounds = preset.get("rounds", 1)
    host = link.server_ip if link else "127.0.0.1"
    netns = link.netns if link else None
    results: dict[str, Any] = {"baselines": {}, "remote_autograd": {c: {} for c in codecs}}
    # Over a shaped link the TensorPipe pair hung in rendezvous/shutdown across namespaces in
    # our runs, so there the torch.distributed.rpc baseline is left out (see docs/benchmarks.md).
    use_torch_rpc = link is None and tls is None and "torch_rpc" in baselines
    torch_rpc = torch_rpc_phase(preset, host, link) if use_torch_rpc else {}
    native = native_phase(preset, host, link, tls) if "native" in baselines else {}
    if "skipped" in native:
        results["native_skipped"] = native.pop("skipped")
    with ExitStack() as stack:
        # One thread per side: two OpenMP pools spinning on 2 cores distort every number.
        tls_args = tls.server_args if tls else ()

        def start(*args: str) -> Any:
            return stack.enter_context(
                ServerProcess(
                    *args,
                    "--host",
                    host,
                    *tls_args,
                    netns=netns,
                    env={"OMP_NUM_THREADS": "1"},
                    wait=False,  # every server starts side by side, waited for below
                )
            )

        tcp_server = start("tcp") if "tcp" in baselines else None
        grpc_server = start("grpc") if {"grpc_unary", "grpc_stream"} & set(baselines) else None
        ra_servers = {codec: start("ra", "--compression", CODECS[codec][1]) for codec in codecs}
        for started in (tcp_server, grpc_server, *ra_servers.values()):
            if started is not None:
                started.wait_ready()
        tcp = None
        if tcp_server is not None:
            tcp = TcpEcho(tcp_server.address, tls.client_context if tls else None)
        grpc_echo = None
        if grpc_server is not None:
            grpc_echo = GrpcEcho(grpc_server.address, root=tls.pem if tls else None)
        modules = {}
        for codec, server in ra_servers.items():
            client_z, _, quant, bulk = CODECS[codec]
            options = ClientOptions(
                compression=client_z,
                activation_quantization=quant,
                gradient_quantization=quant,
                bulk=bulk,
                root_certificates=tls.pem if tls else None,
            )
            modules[codec] = stack.enter_context(RemoteModule(server.address, options=options))
        for size in sizes:
            reps = reps_for(size, preset["reps"])
            warmup = preset["warmup"]
            payload = torch.randn(size // 4)
            view = memoryview(payload.numpy()).cast("B")
            methods = {}
            if tcp is not None:
                methods["tcp"] = lambda v=view: tcp.roundtrip(v)
            if grpc_echo is not None:
                methods["grpc_unary"] = lambda v=view: grpc_echo.unary(v)
                methods["grpc_stream"] = lambda v=view: grpc_echo.stream(v)
            methods = {name: fn for name, fn in methods.items() if name in baselines}
            measured = [c for c in codecs if codec_measured(c, size)]
            base_samples: dict[str, list[float]] = {name: [] for name in methods}
            ra_samples = {c: {"compute": [], "backward": [], "wire": []} for c in measured}
            # Rounds of blocks, methods in turn: load that drifts during the run hits all alike.
            for _ in range(rounds):
                for name, fn in methods.items():
                    base_samples[name] += measure(fn, warmup=warmup, reps=reps)
                for codec in measured:
                    got = ra_roundtrips(modules[codec], size, reps, warmup)
                    for key, values in got.items():
                        ra_samples[codec][key] += values
            row: dict[str, Any] = {}
            for name, samples in base_samples.items():
                seconds = median(samples)
                row[name] = {"s": seconds, "MBps": 2 * size / seconds / 1e6}
            for name, phase in (("torch_rpc", torch_rpc), ("native", native)):
                if str(size) in phase:
                    row[name] = phase[str(size)]
            results["baselines"][str(size)] = row
            for codec in measured:
                results["remote_autograd"][codec][str(size)] = ra_summary(size, ra_samples[codec])
            ra_rows = {c: results["remote_autograd"][c].get(str(size), {}) for c in codecs}
            print(
                f"{human_bytes(size):>8}: "
                + "  ".join(f"{k} {v['MBps']:.0f}" for k, v in row.items())
                + "  ra "
                + "  ".join(f"{c} {r.get('backward_MBps', 0):.0f}" for c, r in ra_rows.items()),
                flush=True,
            )
        if grpc_echo is not None:
            grpc_echo.close()
        if tcp is not None:
            tcp.close()
    results["ratios"] = ratios(results)
    return results


def codec_measured(codec: str, size: int) -> bool:
    return codec in LOSSLESS or size <= BIG


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """remote_autograd vs each baseline, per codec and size: throughput and latency ratios."""
    out: dict[str, Any] = {}
    for codec, by_size in results["remote_autograd"].items():
        for size, ra in by_size.items():
            base = results["baselines"][size]
            seconds = {name: value["s"] for name, value in base.items()}
            grpc = [seconds[k] for k in ("grpc_unary", "grpc_stream") if k in seconds]
            backward = ra["backward_s"]
            unary = seconds.get("grpc_unary")
            out.setdefault(codec, {})[size] = {
                "backward_vs_tcp": seconds["tcp"] / backward if "tcp" in seconds else None,
                "compute_vs_tcp": seconds["tcp"] / ra["compute_s"] if "tcp" in seconds else None,
                "backward_vs_torch_rpc": (
                    seconds["torch_rpc"] / backward if "torch_rpc" in seconds else None
                ),
                "backward_vs_grpc": min(grpc) / backward if grpc else None,
                "backward_vs_native": (
                    seconds["native"] / backward if "native" in seconds else None
                ),
                "compute_latency_vs_grpc_unary": ra["compute_s"] / unary if unary else None,
            }
    return out


def markdown(results: dict[str, Any], title: str) -> str:
    sizes = list(results["baselines"])
    rows = []
    for size in sizes:
        b = results["baselines"][size]
        rows.append(
            [human_bytes(int(size)), *(b[k]["s"] * 1e3 for k in b), *(b[k]["MBps"] for k in b)]
        )
    base_header = list(results["baselines"][sizes[0]])
    parts = [
        f"### {title}",
        "",
        "Baselines (echo of the payload; ms, then MB/s both ways):",
        "",
        table(
            ["size", *(f"{k} ms" for k in base_header), *(f"{k} MB/s" for k in base_header)], rows
        ),
        "",
    ]
    rows = []
    for codec, by_size in results["remote_autograd"].items():
        for size, ra in by_size.items():
            r = results["ratios"][codec][size]
            rows.append(
                [
                    codec,
                    human_bytes(int(size)),
                    ra["compute_s"] * 1e3,
                    ra["backward_s"] * 1e3,
                    ra["backward_MBps"],
                    ra["wire_bytes_per_roundtrip"] / ra["payload_bytes_per_roundtrip"],
                    r["backward_vs_tcp"],
                    r["backward_vs_grpc"],
                    r["backward_vs_torch_rpc"],
                    r["compute_latency_vs_grpc_unary"],
                ]
            )
    parts += [
        "remote_autograd (Compute then Backward through `RemoteModule`; ratios > 1 for "
        "throughput mean faster than the baseline, the latency ratio < 1 means faster):",
        "",
        table(
            [
                "codec",
                "size",
                "Compute ms",
                "Backward ms",
                "Backward MB/s",
                "wire/payload",
                "Bwd vs TCP",
                "Bwd vs gRPC",
                "Bwd vs torch RPC",
                "Compute latency / gRPC unary",
            ],
            rows,
        ),
    ]
    return "\n".join(parts)


def plot(results: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = [int(s) for s in results["baselines"]]
    for name in results["baselines"][str(sizes[0])]:
        ax.plot(
            sizes,
            [results["baselines"][str(s)][name]["MBps"] for s in sizes],
            "--o",
            label=f"{name} (baseline)",
        )
    for codec, by_size in results["remote_autograd"].items():
        xs = [int(s) for s in by_size]
        ax.plot(
            xs,
            [by_size[str(s)]["backward_MBps"] for s in xs],
            "-s",
            label=f"remote_autograd Backward, {codec}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tensor payload (bytes)")
    ax.set_ylabel("payload MB/s (both directions)")
    save_plot(fig, ax, path, title=title, legend_size=7)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        help="override the preset's payload sizes (bytes, comma separated)",
    )
    parser.add_argument("--codecs", type=lambda s: s.split(","), help="override the codecs")
    parser.add_argument("--reps", type=int, help="override the preset's repetitions")
    parser.add_argument(
        "--baselines",
        type=lambda s: s.split(","),
        help=f"measure only these baselines (comma separated: {','.join(KNOWN_BASELINES)})",
    )
    parser.add_argument(
        "--rounds", type=int, help="repeat every method's block of calls this many times, in turn"
    )
    parser.add_argument("--link", help="run over a veth pair shaped to this rate (100mbit...)")
    parser.add_argument("--tls", action="store_true", help="run every method inside TLS")
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--doc", action="store_true", help="update docs/benchmarks.md + plot")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key in ("sizes", "codecs", "reps", "baselines", "rounds"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    unknown = set(preset.get("baselines", BASELINES)) - set(KNOWN_BASELINES)
    if unknown:
        parser.error(f"unknown baselines {', '.join(sorted(unknown))}; known: {KNOWN_BASELINES}")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # see run(): the servers use one thread too
    with ExitStack() as stack:
        link = stack.enter_context(rate_limited_link(args.link)) if args.link else None
        tls = SelfSigned() if args.tls else None
        if tls is not None:
            stack.callback(tls.close)
        results = run(preset, link, tls)
    data = {
        "benchmark": "transfer",
        "preset": args.preset,
        "link": args.link or "loopback",
        "tls": args.tls,
        "machine": machine(),
        **results,
    }
    write_json(args.json, data)
    if args.doc:
        from benchmarks.common import DOCS

        suffix = (f"_{args.link}" if args.link else "") + ("_tls" if args.tls else "")
        title = f"Transfer over {args.link or 'loopback'}" + (", TLS" if args.tls else "")
        plot(results, str(DOCS / f"transfer{suffix}.png"), title)
        update_doc(
            f"transfer{suffix}", markdown(data, title) + f"\n\n![{title}](transfer{suffix}.png)"
        )
    return data


if __name__ == "__main__":
    main()
