"""Where a trunk server on a GPU spends a training step: GPT-2 small's 12 blocks on CUDA, run by
plain PyTorch and then behind an in-process trunk server, phase by phase.

Each phase is bracketed by synchronizes, so its time includes the GPU work it queued; the
instrumented run is therefore slower than a real one, which is timed apart. Ends with
torch.profiler's busiest operators of the server run. Needs CUDA.

    python scripts/profile_gpu_trunk.py [--steps 10] [--model small]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from collections.abc import Callable
from statistics import median
from typing import Any

import torch

from benchmarks.bench_step import LR, build_split
from remote_autograd import (
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    engine,
    serve,
    validate,
)
from remote_autograd.engine import TrunkEngine
from remote_autograd.runner import TrunkRunner
from remote_autograd.service import TrunkService

PHASES: dict[str, list[float]] = defaultdict(list)
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(name: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            PHASES[name].append(time.perf_counter() - start)

    return wrapper


def plain(trunk: torch.nn.Module, hiddens: list[torch.Tensor]) -> dict[str, float]:
    """The same blocks, plain PyTorch: forward, autograd.grad w.r.t. input + weights, AdamW."""
    params = [p for p in trunk.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    times: dict[str, list[float]] = defaultdict(list)
    for hidden in hiddens:
        hidden = hidden.detach().requires_grad_()
        sync()
        t0 = time.perf_counter()
        out = trunk(hidden)
        sync()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(out, [hidden, *params], torch.ones_like(out))
        sync()
        t2 = time.perf_counter()
        for p, g in zip(params, grads[1:], strict=True):
            p.grad = g
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        times["forward"].append(t1 - t0)
        times["backward"].append(t2 - t1)
        times["adamw"].append(t3 - t2)
    return {k: median(v[2:]) * 1e3 for k, v in times.items()}


def remote_steps(remote: RemoteModule, optimizer: Any, hiddens: list[torch.Tensor]) -> float:
    times = []
    for hidden in hiddens:
        hidden = hidden.detach().requires_grad_()
        sync()
        start = time.perf_counter()
        out = remote(hidden)
        out.backward(torch.ones_like(out))
        optimizer.step()
        optimizer.zero_grad()
        sync()
        times.append(time.perf_counter() - start)
    return median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="small")
    parser.add_argument("--device", default="cuda", help="cpu: try the script without a GPU")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    split = build_split(args.model)
    bottom = split.bottom.to(DEVICE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hiddens = [
            bottom(torch.randint(0, 512, (2, 64), generator=generator).to(DEVICE))["hidden_states"]
            for _ in range(args.steps + 2)
        ]
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none"
    print(f"GPU: {gpu} | torch {torch.__version__}")
    reference = plain(copy.deepcopy(split.trunk).to(DEVICE), hiddens)
    print("plain PyTorch (ms):", {k: round(v, 2) for k, v in reference.items()})

    server = serve(copy.deepcopy(split.trunk), "127.0.0.1:0", options=ServerOptions(device=DEVICE))
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "AdamW", lr=LR)
    print(f"remote step, not instrumented: {remote_steps(remote, optimizer, hiddens):.2f} ms")

    patches = [
        (TrunkRunner, "forward"),
        (TrunkService, "_encode_reply"),
        (TrunkRunner, "_grad_pairs"),
        (TrunkEngine, "compute"),
        (TrunkEngine, "backward"),
        (TrunkEngine, "step"),
        (engine, "check_finite_grads"),
        (validate, "finite_flags"),
        (torch.autograd, "grad"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name in patches]
    for owner, name, fn in originals:
        setattr(owner, name, timed(name, fn))
    PHASES.clear()
    instrumented = remote_steps(remote, optimizer, hiddens)
    for owner, name, fn in originals:
        setattr(owner, name, fn)
    print(f"remote step, instrumented: {instrumented:.2f} ms; server phases (median ms):")
    for name, values in PHASES.items():
        print(f"  {name:20s} {median(values[2:]) * 1e3:8.2f}  x{len(values) // len(hiddens)}")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        remote_steps(remote, optimizer, hiddens[:5])
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if DEVICE == "cuda":
        print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    remote.close()
    server.stop(None)


if __name__ == "__main__":
    main()
