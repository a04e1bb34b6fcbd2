"""The guarded Step's cost: ``guarded_step`` against the bare ``optimizer.step()``, in one run.

The server applies a step only if its result is finite and sane, and keeps a copy to roll back
to (remote_autograd/guard.py). Five ways, on the same parameters, one after the other, step i
of each back to back, each right after a guarded step that stood:

- bare: ``optimizer.step()`` alone;
- guarded_back_to_back: ``guarded_step`` with no pause between steps, so the copy that a
  step that stood starts for the next one (``StepBackup.prepare``) is waited for inside it;
- guarded_after_a_pause: the same with ``--pause`` seconds between steps, as a trunk server
  has while the client computes: the copy is taken in the pause;
- guarded_nothing_prepared: the copy inside the step, as before session 17;
- copy: ``StepBackup.copy`` of the parameters and the optimizer state alone.

One torch thread (``--threads``), GPT-2 small's blocks 3-11 by default (the trunk of
bench_pipeline), fused AdamW. Reports median milliseconds and the ratios to the bare step.

    python -m benchmarks.bench_guard --preset full --json guard.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.common import machine, median, table, write_json
from remote_autograd.guard import StepBackup, guarded_step
from remote_autograd.options import ServerOptions

# ---- settings ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": "tiny", "blocks": (1, 3), "steps": 3, "warmup": 1, "pause_s": 0.05},
    # GPT-2 small's blocks 3-11: 64M parameters, as the trunk server of bench_pipeline holds
    "full": {"model": "small", "blocks": (3, 12), "steps": 10, "warmup": 2, "pause_s": 0.3},
}


def _parameters(preset: dict[str, Any]) -> list[tuple[str, torch.nn.Parameter]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if preset["model"] == "tiny":
        config = GPT2Config(n_layer=3, n_embd=64, n_head=2, n_positions=64, vocab_size=128)
    else:
        config = GPT2Config()
    start, end = preset["blocks"]
    blocks = torch.nn.ModuleList(GPT2LMHeadModel(config).transformer.h[start:end])
    return list(blocks.named_parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(PRESETS[args.preset])
    if args.pause is not None:
        preset["pause_s"] = args.pause
    torch.set_num_threads(args.threads)
    params = _parameters(preset)
    generator = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=generator) * 1e-3 for n, p in params}
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-5, fused=True)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    options, backup = ServerOptions(), StepBackup()

    def bare() -> None:  # outside guarded_step: nothing may be prepared (see timed())
        for name, param in params:
            param.grad = grads[name]
        optimizer.step()
        for _, param in params:
            param.grad = None

    def guarded() -> None:
        guarded_step(optimizer, params, grads, groups, options, backup)

    def copy() -> None:
        state = [v for s in optimizer.state.values() for v in s.values()]
        backup.copy([p for _, p in params] + state)

    def timed(fn: Any, *, prepared: bool, pause: float = 0.0) -> tuple[float, int]:
        """``fn``'s seconds, right after a guarded step that stood (``prepared``: with the
        copy it started for the next step; else that copy dropped first, untimed), and how
        many tensors its copy found prepared."""
        guarded()
        if not prepared:
            backup.forget()
        time.sleep(pause)
        backup.reused = 0
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, backup.reused

    ways = {
        "bare": lambda: timed(bare, prepared=False),
        "guarded_back_to_back": lambda: timed(guarded, prepared=True),
        "guarded_after_a_pause": lambda: timed(guarded, prepared=True, pause=preset["pause_s"]),
        "guarded_nothing_prepared": lambda: timed(guarded, prepared=False),
        "copy": lambda: timed(copy, prepared=False),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    reused: dict[str, list[int]] = {name: [] for name in ways}
    for index in range(preset["warmup"] + preset["steps"]):
        for name, way in ways.items():
            seconds, found = way()
            if index >= preset["warmup"]:
                times[name].append(seconds)
                reused[name].append(found)
    medians = {name: median(values) for name, values in times.items()}
    return {
        "benchmark": "guard",
        "preset_name": args.preset,
        "preset": preset,
        "threads": args.threads,
        "machine": machine(),
        "parameters": sum(p.numel() for _, p in params),
        "times": times,
        "tensors": len(params) + sum(len(s) for s in optimizer.state.values()),
        "tensors_found_prepared": reused,
        "ms": {name: value * 1e3 for name, value in medians.items()},
        "ratios": {
            f"{name}_vs_bare": value / medians["bare"]
            for name, value in medians.items()
            if name != "bare"
        },
    }


def markdown(data: dict[str, Any]) -> str:
    rows = [[name, ms, ms / data["ms"]["bare"]] for name, ms in data["ms"].items()]
    return table(["way", "median ms", "vs bare step"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--pause", type=float, help="seconds between steps (preset's default)")
    parser.add_argument("--json", help="write the results here (default: stdout)")
    args = parser.parse_args(argv)
    data = run(args)
    print(f"{data['parameters'] / 1e6:.1f}M parameters, {args.threads} thread(s)")
    print(markdown(data), flush=True)
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
