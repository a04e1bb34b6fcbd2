"""Per-client adapters: N clients on one per-client adapter server vs N single-tenant servers.

Both setups serve the same GPT-2 trunk (random init, no downloads) with LoRA adapters of the
same shape, and every client trains its own adapter: in the first, one server process holds the
frozen base once and one adapter per client identity (a token each); in the second, each client
has a server process of its own. The clients run at once, each in a thread of this process,
each doing ``warmup`` untimed then ``steps`` timed trunk steps (Compute with hidden states of
``batch x seq x n_embd``, Backward, Step). Reported: the servers' resident memory (RSS, from
/proc) per client, and the aggregate tokens/s of all clients together. A third run puts the
same clients on the per-client server one at a time (a lock around each client's step), the
tokens/s it would reach if calls of different clients were serialised.

    python -m benchmarks.bench_adapters --preset full --json adapters.json --doc
    python -m benchmarks.bench_adapters --preset smoke --json /tmp/adapters.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, machine, python_path, table, update_doc, write_json

# ---- settings -----------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # 8 clients of a GPT-2 trunk of 4 blocks, 256 wide; 4 x 128 tokens a step
    "full": dict(clients=8, n_layer=6, n_embd=256, n_head=4, trunk="1:5", batch=4, seq=128,
                 warmup=2, steps=10, rank=8),
    # the code path only: 2 clients, a tiny trunk
    "smoke": dict(clients=2, n_layer=3, n_embd=32, n_head=2, trunk="1:2", batch=1, seq=16,
                  warmup=1, steps=2, rank=2),
}  # fmt: skip


def _model_flags(p: dict[str, Any]) -> list[str]:
    return [
        "--model-type=gpt2",
        f"--n-layer={p['n_layer']}",
        f"--n-embd={p['n_embd']}",
        f"--n-head={p['n_head']}",
        f"--n-positions={max(64, p['seq'])}",
        f"--trunk-layers={p['trunk']}",
        f"--lora-rank={p['rank']}",
        "--dropout=0",
    ]


@contextlib.contextmanager
def _servers(flags: list[list[str]], threads: int) -> Iterator[list[tuple[int, str]]]:
    """``remote-autograd serve`` child processes, started at once; yields (pid, address) each."""
    env = dict(os.environ, PYTHONPATH=python_path(), OMP_NUM_THREADS=str(threads))
    argv = [sys.executable, "-m", "remote_autograd.cli", "serve", "--address=127.0.0.1:0"]
    processes = [
        subprocess.Popen(
            [*argv, *f],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for f in flags
    ]
    try:
        started = []
        for process in processes:
            assert process.stdout is not None
            for line in process.stdout:
                if " serving " in line:
                    started.append((process.pid, line.rsplit(" ", 1)[-1].strip()))
                    break
            else:
                raise RuntimeError(f"a server exited with {process.wait()} before serving")
        yield started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _clients_run(
    p: dict[str, Any], addresses: list[str], tokens: list[str | None], serialise: bool
) -> float:
    """All clients at once (or one at a time under a lock); returns aggregate tokens/s."""
    from remote_autograd import ClientOptions, RemoteModule, RemoteOptimizer

    trunks = [
        RemoteModule(address, options=ClientOptions(token=token, seed=i))
        for i, (address, token) in enumerate(zip(addresses, tokens, strict=True))
    ]
    optimizers = [RemoteOptimizer(t, torch.optim.AdamW, lr=1e-3) for t in trunks]
    shape = (p["batch"], p["seq"], p["n_embd"])
    start = threading.Barrier(len(trunks) + 1)
    lock = threading.Lock() if serialise else contextlib.nullcontext()
    errors: list[BaseException] = []

    def step(index: int, hidden: torch.Tensor) -> None:
        with lock:
            trunks[index](hidden.requires_grad_()).pow(2).mean().backward()
            optimizers[index].step()
            optimizers[index].zero_grad()

    def run(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        try:
            for _ in range(p["warmup"]):
                step(index, torch.randn(shape, generator=generator))
            start.wait()
            for _ in range(p["steps"]):
                step(index, torch.randn(shape, generator=generator))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trunks))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for trunk in trunks:
        trunk.close()
    if errors:
        raise errors[0]
    return len(trunks) * p["steps"] * p["batch"] * p["seq"] / seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    p = dict(PRESETS[args.preset])
    if args.clients:
        p["clients"] = args.clients
    n = p["clients"]
    threads = args.server_threads
    torch.set_num_threads(1)  # the client threads: the work to measure is the servers'
    data: dict[str, Any] = {
        "benchmark": "adapters",
        "preset_name": args.preset,
        "preset": p,
        "machine": machine(),
        "server_threads": threads,
    }
    tokens = [f"client-{i}-token" for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        token_file = Path(folder) / "tokens"
        token_file.write_text("\n".join(tokens) + "\n")
        flags = [*_model_flags(p), "--adapters=per-client", f"--token-file={token_file}"]
        with _servers([flags], threads) as [(pid, address)]:
            idle = _rss_bytes(pid)
            shared = _clients_run(p, [address] * n, list(tokens), serialise=False)
            rss = _rss_bytes(pid)
            serialised = _clients_run(p, [address] * n, list(tokens), serialise=True)
        data["per_client_server"] = {
            "rss_idle_bytes": idle,
            "rss_bytes": rss,
            "rss_per_client_bytes": rss / n,
            "tokens_per_s": shared,
            "tokens_per_s_one_client_at_a_time": serialised,
        }
    with _servers([_model_flags(p)] * n, threads) as servers:
        alone = _clients_run(p, [a for _, a in servers], [None] * n, serialise=False)
        rss = sum(_rss_bytes(pid) for pid, _ in servers)
    data["separate_servers"] = {
        "rss_bytes": rss,
        "rss_per_client_bytes": rss / n,
        "tokens_per_s": alone,
    }
    one, many = data["per_client_server"], data["separate_servers"]
    data["ratios"] = {
        "memory_per_client_separate_over_shared": many["rss_per_client_bytes"]
        / one["rss_per_client_bytes"],
        "tokens_per_s_shared_over_separate": one["tokens_per_s"] / many["tokens_per_s"],
        "tokens_per_s_concurrent_over_serialised": one["tokens_per_s"]
        / one["tokens_per_s_one_client_at_a_time"],
    }
    return data


def markdown(data: dict[str, Any]) -> str:
    p, m = data["preset"], data["machine"]
    one, many = data["per_client_server"], data["separate_servers"]
    mib = 1 << 20
    head = (
        f"{p['clients']} clients, GPT-2 trunk blocks {p['trunk']} of {p['n_layer']} "
        f"(n_embd {p['n_embd']}), LoRA rank {p['rank']}, {p['batch']}x{p['seq']} tokens a "
        f"step, {p['steps']} timed steps each; {m['cpus']} CPUs, torch {m['torch']}, "
        f"{data['server_threads']} torch thread(s) per server process, {m['time_utc']} UTC."
    )
    rows = [
        [
            "one server, --adapters per-client",
            one["rss_bytes"] / mib,
            one["rss_per_client_bytes"] / mib,
            one["tokens_per_s"],
        ],
        [
            "the same, one client at a time",
            None,
            None,
            one["tokens_per_s_one_client_at_a_time"],
        ],
        [
            f"{p['clients']} single-tenant servers",
            many["rss_bytes"] / mib,
            many["rss_per_client_bytes"] / mib,
            many["tokens_per_s"],
        ],
    ]
    r = data["ratios"]
    note = (
        f"An idle per-client server holds {one['rss_idle_bytes'] / mib:.0f} MiB (interpreter, "
        "torch, transformers, the frozen base), paid once instead of once per client: "
        f"{r['memory_per_client_separate_over_shared']:.2f}x less memory per client. "
        f"Concurrent clients on the one server reach "
        f"{r['tokens_per_s_concurrent_over_serialised']:.2f}x the tokens/s of the same clients "
        f"taking turns (their calls overlap), and {r['tokens_per_s_shared_over_separate']:.2f}x "
        "the tokens/s of separate servers (one process per client, no GIL shared)."
    )
    return (
        head
        + "\n\n"
        + table(["setup", "server RSS MiB", "MiB per client", "tokens/s (all clients)"], rows)
        + "\n\n"
        + note
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--clients", type=int, help="override the preset's clients")
    parser.add_argument(
        "--server-threads", type=int, default=1, help="torch threads of each server process"
    )
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--doc", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--render", help="no run: write the doc section of a results JSON")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
    else:
        data = run(args)
        write_json(args.json, data)
    if args.doc or args.render:
        update_doc(
            "adapters", "### Per-client adapters vs single-tenant servers\n\n" + markdown(data)
        )
    return data


if __name__ == "__main__":
    main()
