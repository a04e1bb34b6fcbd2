"""Pipelined-step benchmark: GPT-2 split step, sequential vs pipelined, vs the monolithic step.

Client and trunk server are separate processes with one torch thread each (two machines'
worth of compute on a 2-core box). The client holds the embeddings, the first blocks, the
final norm and the tied LM head; the server the middle blocks, chosen so that both sides do
about the same work. Four runs in lockstep (step i of each back to back) from the same
weights and batches, AdamW everywhere (``--fused``: ``AdamW(fused=True)``, one kernel per step):

- monolithic: the whole model in this process, one thread;
- sequential: the ordinary split step (``loss.backward()`` through ``RemoteModule``);
- pipelined: ``PipelinedStep`` with ``micro_batches`` pieces (remote_autograd.pipeline);
- pipelined, split backward: the same with ``split_backward=True`` (the top's weight
  gradients computed while the trunk's Backward runs).

With ``--overlap-step`` the first two split runs run again (six runs in lockstep) with the trunk's
optimizer stepping beside the client's (``with trunk_opt.stepping(): opt.step()``), so the
two ways of stepping compare in one run.

Reports median step times, the ratios, and the fraction of each split step in which the trunk
server sits idle: 1 - (compute + codec seconds from the reply headers + the Step RPC's wall
time) / step time.

    python -m benchmarks.bench_pipeline --preset full --json pipeline.json --doc
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import ServerProcess, machine, median, table, update_doc, write_json
from remote_autograd.hf import SplitModel, causal_lm_loss, split_causal_lm, unique_parameters

# ---- settings ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": "tiny",
        "trunk": (1, 3),  # trunk blocks [start, end)
        "batch": 4,
        "seq": 16,
        "micro_batches": 2,
        "steps": 2,
        "warmup": 1,
        "probe_s": 0,  # seconds of each parallel-capacity probe (0: none)
        "fused": False,  # AdamW(fused=True) in every run: one kernel per step, not a loop
    },
    # GPT-2 small (124M): 3 blocks + the 50257-word head here (~120 MFLOP per token forward),
    # 9 blocks on the server (~130 MFLOP per token)
    "full": {
        "model": "small",
        "trunk": (3, 12),
        "batch": 8,
        "seq": 32,
        # Measured on the idle 2-core VM (session 8): 2 pieces 0.754x-0.767x the sequential
        # step, 3 pieces 0.843x, 4 pieces 0.835x-0.853x, 8 pieces 1.18x (session 6); session 9,
        # 3 pieces 0.728x-0.863x, 2 pieces 0.799x-0.898x: not told apart from noise. Session
        # 10, --trunk 1:12 (two blocks moved to the server): 0.732x-0.805x against this
        # split's 0.778x-0.838x in the same 40 minutes, but both split steps slower
        "micro_batches": 2,
        "steps": 10,
        # The first two steps after one warm-up step took 1.2-1.6x the median in every run of
        # session 9, in all three runs alike (the allocator and AdamW's state settling)
        "warmup": 3,
        "probe_s": 4.0,
        "fused": False,
    },
}
# model -> (n_layer, n_embd, n_head, vocab)
MODELS = {"small": (12, 768, 12, 50257), "tiny": (4, 64, 4, 1000)}
SEED = 0  # the same weights in every process
LR = 3e-4
DATA_VOCAB = 512
# -----------------------------------------------------------------------------------------


def adamw(preset: dict[str, Any]) -> dict[str, Any]:
    """AdamW's arguments in every run, local and remote alike."""
    return {"lr": LR, "fused": True} if preset["fused"] else {"lr": LR}


def build_split(preset: dict[str, Any]) -> SplitModel:
    n_layer, n_embd, n_head, vocab = MODELS[preset["model"]]
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=1024,
        resid_pdrop=0.0,  # no dropout: the runs compare step by step
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(config).train()
    return split_causal_lm(model, *preset["trunk"])


def batches(preset: dict[str, Any]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    shape = (preset["batch"], preset["seq"])
    n = preset["warmup"] + preset["steps"]
    return [torch.randint(0, DATA_VOCAB, shape, generator=generator) for _ in range(n)]


class Monolithic:
    def __init__(self, preset: dict[str, Any]) -> None:
        bottom, trunk, top = build_split(preset)
        self.parts = torch.nn.ModuleList([bottom, trunk, top])
        self.optimizer = torch.optim.AdamW(unique_parameters(bottom, trunk, top), **adamw(preset))
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, ids: torch.Tensor, timed: bool) -> None:  # ids: [B, T]
        bottom, trunk, top = self.parts
        start = time.perf_counter()
        loss = causal_lm_loss(top(trunk(bottom(ids)["hidden_states"])), ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if timed:
            self.times.append(time.perf_counter() - start)
            self.losses.append(loss.item())

    def result(self) -> dict[str, Any]:
        return {"step_s": median(self.times), "times": self.times, "losses": self.losses}


class Split:
    """Bottom and top here, the middle blocks on a trunk server; sequential or pipelined."""

    def __init__(
        self,
        preset: dict[str, Any],
        address: str,
        pipelined: bool,
        overlap_step: bool = False,
        split_backward: bool = False,
    ) -> None:
        from remote_autograd import PipelinedStep, RemoteModule, RemoteOptimizer

        bottom, _, top = build_split(preset)
        self.bottom, self.top = bottom, top
        self.trunk = RemoteModule(address)
        self.optimizer = torch.optim.AdamW(unique_parameters(bottom, top), **adamw(preset))
        self.remote_optimizer = RemoteOptimizer(self.trunk, "AdamW", **adamw(preset))
        self.pipelined = (
            PipelinedStep(
                lambda ids: bottom(ids)["hidden_states"],  # [b, T, d]
                self.trunk,
                top,
                causal_lm_loss,
                micro_batches=preset["micro_batches"],
                split_backward=split_backward,
            )
            if pipelined
            else None
        )
        self.overlap_step = overlap_step
        self.times: list[float] = []
        self.losses: list[float] = []
        self.trunk_busy: list[float] = []

    def step(self, ids: torch.Tensor, timed: bool) -> None:  # ids: [B, T]
        stats = self.trunk.client.stats
        before = stats.server_compute_seconds + stats.server_codec_seconds
        start = time.perf_counter()
        if self.pipelined is not None:
            loss = self.pipelined(ids, ids)
        else:
            hidden = self.bottom(ids)["hidden_states"]  # [B, T, d]
            loss = causal_lm_loss(self.top(self.trunk(hidden)), ids)
            loss.backward()
        rpc_start = time.perf_counter()
        if self.overlap_step:
            with self.remote_optimizer.stepping():
                self.optimizer.step()
            step_rpc = 0.0  # not told apart from the client's step: no idle fraction
        else:
            self.remote_optimizer.step()
            step_rpc = time.perf_counter() - rpc_start
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.remote_optimizer.zero_grad()
        elapsed = time.perf_counter() - start
        if timed:
            self.times.append(elapsed)
            self.losses.append(loss.item())
            busy = stats.server_compute_seconds + stats.server_codec_seconds - before + step_rpc
            self.trunk_busy.append(busy)

    def result(self) -> dict[str, Any]:
        self.trunk.close()
        result = {"step_s": median(self.times), "times": self.times, "losses": self.losses}
        if not self.overlap_step:
            idle = [1 - busy / t for busy, t in zip(self.trunk_busy, self.times, strict=True)]
            result["trunk_busy_s"] = median(self.trunk_busy)
            result["trunk_idle_fraction"] = median(idle)
        return result


_PROBE = """
import sys, time, torch
torch.set_num_threads(1)
a, w = torch.randn(128, 768), torch.randn(768, 768)
start, n = time.perf_counter(), 0
while time.perf_counter() - start < float(sys.argv[1]):
    a @ w
    n += 1
print(n / (time.perf_counter() - start))
"""


def parallel_capacity(seconds: float) -> float | None:
    """How many cores two single-thread processes get together, in units of one process
    alone: 2.0 on two idle cores, ~1.0 where other load leaves the equivalent of one. Overlap
    can only shorten a step by what this allows."""
    import subprocess
    import sys

    if seconds <= 0:
        return None  # not probed (the smoke preset)

    def start() -> subprocess.Popen:
        cmd = [sys.executable, "-c", _PROBE, str(seconds)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    def rate(process: subprocess.Popen) -> float:
        out, _ = process.communicate()
        return float(out)

    alone = rate(start())
    pair = [start(), start()]
    return sum(rate(p) for p in pair) / alone


def serve_trunk(preset_name: str, trunk: tuple[int, int] | None) -> None:
    """The server process: the preset's trunk blocks (or ``trunk``'s), one torch thread."""
    from benchmarks.servers import _wait_for_signal
    from remote_autograd import ServerOptions, serve

    torch.set_num_threads(1)
    preset = dict(PRESETS[preset_name], **({"trunk": trunk} if trunk else {}))
    server = serve(build_split(preset).trunk, "127.0.0.1:0", options=ServerOptions())
    print(f"ready {server.address}", flush=True)
    _wait_for_signal()
    server.stop(grace=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(PRESETS[args.preset])
    for key in ("steps", "micro_batches", "fused", "trunk"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    torch.set_num_threads(1)
    data: dict[str, Any] = {
        "benchmark": "pipeline",
        "preset_name": args.preset,
        "preset": preset,
        "machine": machine(),
        "load_before": os.getloadavg(),
        "parallel_capacity_before": parallel_capacity(preset["probe_s"]),
    }
    runners: dict[str, Any] = {"monolithic": Monolithic(preset)}
    modes = ["sequential", "pipelined", "pipelined, split backward"]
    if args.overlap_step:
        modes += [f"{mode}, overlapped step" for mode in ("sequential", "pipelined")]
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                ServerProcess(
                    "--serve-trunk",
                    args.preset,
                    *(["--trunk", "{}:{}".format(*args.trunk)] if args.trunk else []),
                    module="benchmarks.bench_pipeline",
                    env={"OMP_NUM_THREADS": "1"},
                    timeout=180,
                    wait=False,  # started side by side, waited for below
                )
            )
            for _ in modes
        ]
        for mode, server in zip(modes, servers, strict=True):
            server.wait_ready()
            runners[mode] = Split(
                preset,
                server.address,
                pipelined=mode.startswith("pipelined"),
                overlap_step=mode.endswith("overlapped step"),
                split_backward=mode.endswith("split backward"),
            )
        # Lockstep: a slow patch of a shared machine hits all runs alike.
        for i, ids in enumerate(batches(preset)):
            for runner in runners.values():
                runner.step(ids, timed=i >= preset["warmup"])
        results = {name: runner.result() for name, runner in runners.items()}
    data.update(results)
    data["load_after"] = os.getloadavg()
    data["parallel_capacity_after"] = parallel_capacity(preset["probe_s"])
    mono, seq, pipe = (results[k] for k in ("monolithic", "sequential", "pipelined"))
    split = results["pipelined, split backward"]
    data["ratios"] = {
        "pipelined_vs_sequential": pipe["step_s"] / seq["step_s"],
        "pipelined_vs_monolithic": pipe["step_s"] / mono["step_s"],
        "sequential_vs_monolithic": seq["step_s"] / mono["step_s"],
        "split_backward_vs_sequential": split["step_s"] / seq["step_s"],
        "split_backward_vs_monolithic": split["step_s"] / mono["step_s"],
        "split_backward_vs_pipelined": split["step_s"] / pipe["step_s"],
        "max_loss_rel_diff_pipelined_vs_sequential": max(
            abs(a - b) / abs(b) for a, b in zip(pipe["losses"], seq["losses"], strict=True)
        ),
        # The same computation as the pipelined run's, bit for bit (float32 here too).
        "losses_equal_split_backward_vs_pipelined": split["losses"] == pipe["losses"],
    }
    if args.overlap_step:
        seq_o, pipe_o = (results[f"{k}, overlapped step"] for k in ("sequential", "pipelined"))
        data["ratios"].update(
            {
                "overlapped_vs_plain_sequential": seq_o["step_s"] / seq["step_s"],
                "overlapped_vs_plain_pipelined": pipe_o["step_s"] / pipe["step_s"],
                "pipelined_vs_sequential_both_overlapped": pipe_o["step_s"] / seq_o["step_s"],
                "pipelined_overlapped_vs_monolithic": pipe_o["step_s"] / mono["step_s"],
                # The trunk's step beside the client's changes no number: equal losses.
                "losses_equal_overlapped_vs_plain": seq_o["losses"] == seq["losses"]
                and pipe_o["losses"] == pipe["losses"],
            }
        )
    for name, result in results.items():
        idle = result.get("trunk_idle_fraction")
        extra = f", trunk idle {idle:.0%}" if idle is not None else ""
        print(f"{name}: {result['step_s'] * 1e3:.0f} ms{extra}", flush=True)
    for key, value in data["ratios"].items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}", flush=True)
    return data


def markdown(data: dict[str, Any]) -> str:
    p, r = data["preset"], data["ratios"]
    mono = data["monolithic"]
    rows = [["monolithic (one process, one thread)", mono["step_s"] * 1e3, 1.0, "", "", ""]]
    names = [n for n in data if n.startswith(("sequential", "pipelined"))]
    for name in names:
        res = data[name]
        label = f"split, {name}".replace(
            "pipelined", f"pipelined ({p['micro_batches']} micro-batches)"
        )
        busy, idle = res.get("trunk_busy_s"), res.get("trunk_idle_fraction")
        rows.append(
            [
                label,
                res["step_s"] * 1e3,
                res["step_s"] / mono["step_s"],
                res["step_s"] / data["sequential"]["step_s"],
                "" if busy is None else busy * 1e3,
                "" if idle is None else f"{idle:.0%}",
            ]
        )
    header = [
        "run",
        "step ms",
        "vs monolithic",
        "vs sequential",
        "trunk busy ms",
        "trunk idle",
    ]
    split_equal = r.get("losses_equal_split_backward_vs_pipelined")
    load = data["load_before"][0], data["load_after"][0]
    capacity = data["parallel_capacity_before"], data["parallel_capacity_after"]
    return (
        f"### Pipelined step, preset {data['preset_name']}\n\n"
        f"GPT-2 `{p['model']}` (random init), trunk = blocks [{p['trunk'][0]}, {p['trunk'][1]}) "
        f"on a server process, the rest here; batch {p['batch']} x {p['seq']} tokens, "
        f"{'fused AdamW' if p.get('fused') else 'AdamW'}, "
        f"{p['steps']} timed steps after {p['warmup']} warm-up (medians); one torch thread "
        f"per process; {data['machine']['cpus']} CPUs, load average {load[0]:.1f} before and "
        f"{load[1]:.1f} after ({data['machine']['time_utc']} UTC); two single-thread processes "
        f"got {capacity[0] or 0:.2f}x / {capacity[1] or 0:.2f}x the throughput of one alone, "
        f"before / after (2.0 on two idle cores). Losses of the pipelined "
        f"run vs the sequential one: max rel. diff "
        f"{r['max_loss_rel_diff_pipelined_vs_sequential']:.1e}; of the split-backward run vs "
        f"the pipelined one: {_equal_text(split_equal)}.\n\n" + table(header, rows)
    )


def _equal_text(equal: bool | None) -> str:
    return "n/a (not run)" if equal is None else "equal" if equal else "not equal"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--steps", type=int, help="override the preset's timed steps")
    parser.add_argument("--micro-batches", type=int, help="override the preset's pieces")
    parser.add_argument(
        "--overlap-step",
        action="store_true",
        help="also run sequential and pipelined with trunk_opt.stepping() (six in lockstep)",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="AdamW(fused=True) everywhere (default: torch's default)",
    )
    parser.add_argument(
        "--trunk",
        type=lambda text: tuple(int(n) for n in text.split(":")),
        metavar="START:END",
        help="override the preset's trunk blocks [START, END)",
    )
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--doc", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--render", help="no run: write the doc section of a results JSON")
    parser.add_argument("--serve-trunk", metavar="PRESET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        update_doc(f"pipeline_{data['preset_name']}", markdown(data))
        return data
    if args.serve_trunk:
        serve_trunk(args.serve_trunk, args.trunk)
        return {}
    data = run(args)
    write_json(args.json, data)
    if args.doc:
        update_doc(f"pipeline_{args.preset}", markdown(data))
    return data


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
