"""Scale-out benchmark: one compute-bound trunk served by 2 CPU ranks vs 1 (torchrun).

Every server is a child process with one torch thread per rank (OMP_NUM_THREADS=1): a plain
one-process server, ``torchrun --nproc-per-node 1 ... --parallel MODE`` (ddp by default, or
fsdp) and the same with 2 ranks. The client trains the trunk alone (a forward, a backward of
one batch with the input requiring its gradient, and an SGD Step) and reports samples per
second, the ratio 2 ranks / 1 rank, and the front door's overhead per call: the time of a
tiny call (batch 1) through each server, whose difference to the plain server is what handing
a call to the ranks costs. It also reads the CPU seconds of every server process (/proc)
during the timed steps: the busiest process's CPU time per step is what a step would take
with a free core per rank, a ratio that holds even on a machine busy with other work, where
wall-clock times do not.

    python -m benchmarks.bench_distributed --preset full --json dist.json --doc
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.common import ROOT, machine, measure, median, python_path, table, update_doc
from benchmarks.common import write_json as write_json_file
from remote_autograd import SteppedTrunkWarning

# ---- settings ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"width": 64, "layers": 2, "batch": 8, "warmup": 1, "reps": 3, "tiny_reps": 5},
    "full": {"width": 1024, "layers": 4, "batch": 1024, "warmup": 3, "reps": 15, "tiny_reps": 50},
}
# -----------------------------------------------------------------------------------------


def trunk() -> nn.Module:
    """The served trunk (``--module benchmarks.bench_distributed:trunk``): an MLP whose size
    the benchmark passes in BENCH_WIDTH / BENCH_LAYERS, seeded."""
    width = int(os.environ.get("BENCH_WIDTH", "64"))
    layers = int(os.environ.get("BENCH_LAYERS", "2"))
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks)


def _thread_seconds(pid: str) -> float:
    """Run time of the live threads of process ``pid`` (/proc/PID/task/TID/schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return total / 1e9


class Server:
    """A trunk server child: plain (``ranks=0``) or under torchrun with ``ranks`` processes."""

    def __init__(self, ranks: int, settings: dict[str, Any], mode: str) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=python_path(),
            OMP_NUM_THREADS="1",
            BENCH_WIDTH=str(settings["width"]),
            BENCH_LAYERS=str(settings["layers"]),
        )
        serve = ["serve", "--module", "benchmarks.bench_distributed:trunk"]
        serve += ["--address", "127.0.0.1:0", "--no-bulk"]
        if ranks:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            launch += [f"--nproc-per-node={ranks}", "-m", "remote_autograd"]
            serve += ["--parallel", mode]
        else:
            launch = [sys.executable, "-m", "remote_autograd"]
        self.name = f"{ranks} rank{'s' if ranks > 1 else ''}" if ranks else "plain"
        self.process = subprocess.Popen(
            [*launch, *serve],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.address = ""

    def wait_ready(self, timeout: float = 300) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if "serving" in line:
                self.address = line.rsplit(" ", 1)[-1].strip()
                return self.address
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"server {self.name} did not start")

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds so far of this server's process and its descendants (torchrun's ranks
        run in sessions of their own, so the tree is walked by parent): the scheduler's
        nanosecond run times of their threads, not utime + stime in 10 ms ticks (a smoke run's
        few steps counted 0 ticks)."""
        parents, seconds = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            parents[int(entry)] = int(fields[1])
            seconds[int(entry)] = _thread_seconds(entry)
        tree = {self.process.pid}
        grown = True
        while grown:
            more = {pid for pid, parent in parents.items() if parent in tree} - tree
            tree |= more
            grown = bool(more)
        return {pid: seconds[pid] for pid in tree if pid in seconds}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def measure_server(server: Server, settings: dict[str, Any]) -> dict[str, Any]:
    from remote_autograd import ClientOptions, RemoteModule, RemoteOptimizer

    width, batch = settings["width"], settings["batch"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=generator, requires_grad=True)
    tiny = torch.randn(1, width, generator=generator)
    with RemoteModule(server.address, options=ClientOptions(compression="none")) as remote:
        optimizer = RemoteOptimizer(remote, "SGD", lr=1e-6)

        def train_step() -> None:
            optimizer.zero_grad()
            torch.autograd.grad(remote(x).sum(), x)
            optimizer.step()  # every rank steps its replica (ddp) or its shards (fsdp)

        def tiny_call() -> None:
            with torch.no_grad():
                remote(tiny)

        measure(train_step, warmup=settings["warmup"], reps=0)
        before = server.cpu_seconds()
        steps = measure(train_step, warmup=0, reps=settings["reps"])
        after = server.cpu_seconds()
        calls = measure(tiny_call, warmup=settings["warmup"], reps=settings["tiny_reps"])
    step_s = median(steps)
    return {
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "tiny_call_s": median(calls),
        # The busiest process's CPU seconds per step: what the step would take with a free
        # core per rank, whatever else the machine runs meanwhile.
        "busiest_rank_cpu_s_per_step": max(
            (after[pid] - before.get(pid, 0.0) for pid in after), default=0.0
        )
        / settings["reps"],
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--doc", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--batch", type=int, help="samples per step (default: the preset's)")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="the mode")
    args = parser.parse_args()
    settings = dict(PRESETS[args.preset])
    if args.batch is not None:
        if args.batch < 1:
            parser.error(f"--batch must be at least 1, got {args.batch}")
        settings["batch"] = args.batch
    torch.set_num_threads(1)
    # Each server is measured twice, the second time from the weights the first run left.
    warnings.filterwarnings("ignore", category=SteppedTrunkWarning)
    # Started side by side.
    servers = {ranks: Server(ranks, settings, args.parallel) for ranks in (0, 1, 2)}
    results: dict[str, Any] = {}
    try:
        for server in servers.values():
            server.wait_ready()
        for ranks in (0, 1, 2, 1, 2):  # 1 and 2 ranks twice, interleaved: a fairer median
            server = servers[ranks]
            run = measure_server(server, settings)
            previous = results.get(server.name)
            if previous is None or run["step_s"] < previous["step_s"]:
                results[server.name] = run
    finally:
        for server in servers.values():
            server.stop()
    one, two, plain = results["1 rank"], results["2 ranks"], results["plain"]
    data = {
        "benchmark": "distributed",
        "parallel": args.parallel,
        "preset": args.preset,
        "settings": settings,
        "machine": machine(),
        "servers": results,
        "speedup_2_vs_1": two["samples_per_s"] / one["samples_per_s"],
        "cpu_speedup_2_vs_1": one["busiest_rank_cpu_s_per_step"]
        / two["busiest_rank_cpu_s_per_step"],
        "front_door_overhead_s": {
            "1 rank": one["tiny_call_s"] - plain["tiny_call_s"],
            "2 ranks": two["tiny_call_s"] - plain["tiny_call_s"],
        },
    }
    write_json_file(args.json, data)
    rows = [
        [
            name,
            f"{r['step_s'] * 1e3:.1f}",
            f"{r['samples_per_s']:.0f}",
            f"{r['busiest_rank_cpu_s_per_step'] * 1e3:.1f}",
            f"{r['tiny_call_s'] * 1e3:.2f}",
        ]
        for name, r in results.items()
    ]
    header = ["server", "train step (ms)", "samples/s", "busiest rank CPU/step (ms)"]
    text = table([*header, "tiny call (ms)"], rows)
    summary = (
        f"{args.parallel}, 2 ranks / 1 rank: **{data['speedup_2_vs_1']:.2f}x** samples/s "
        f"({data['cpu_speedup_2_vs_1']:.2f}x by the busiest rank's CPU time); front door "
        "overhead "
        f"per call vs the plain server: "
        f"{data['front_door_overhead_s']['1 rank'] * 1e3:.2f} ms (1 rank), "
        f"{data['front_door_overhead_s']['2 ranks'] * 1e3:.2f} ms (2 ranks)"
    )
    print(text + "\n\n" + summary, file=sys.stderr)
    if args.doc:
        update_doc(f"distributed_{args.parallel}", f"{text}\n\n{summary}\n")


if __name__ == "__main__":
    main()
