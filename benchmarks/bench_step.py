"""Training-step benchmark: GPT-2 with its blocks on a trunk server vs the same model in-process.

The model is transformers' GPT2LMHeadModel (random init, no downloads), cut by the library's
own ``remote_autograd.hf.split_causal_lm``: bottom (embeddings) | trunk (every block, on the
server) | top (final norm + tied LM head). No LoRA: every weight trains. Same weights, same
batches, same optimizer (AdamW; the trunk's runs on the server through RemoteOptimizer). All
runs advance in lockstep, step i of each back to back. Reports the median step time, the
overhead ratio, where the split step's time goes, and the loss curve of every wire codec next
to the monolithic float32 one.

    python -m benchmarks.bench_step --preset full --json step.json --doc
    python -m benchmarks.bench_step --preset full --link 100mbit --doc      # needs root
    python -m benchmarks.bench_step --trunk-device cuda --client-device cuda --json gpu.json

``--trunk-device`` places the server's blocks, ``--client-device`` the embeddings, the head and
the monolithic model; on a GPU each timed step ends with a synchronize, so it counts the work
it queued.

``--micro-batches k`` adds, for every codec, a run whose Compute and Backward calls go in k
slices (``ClientOptions.micro_batches``), in the same lockstep, against its own server; its
ratio to the ordinary split step is in ``ratios``. ``--threads n`` gives every process (this
one, each server) n torch threads; one each emulates client and trunk on machines of their
own on this 2-core VM, as bench_pipeline does.

    python -m benchmarks.bench_step --preset wire --link 100mbit --micro-batches 4 --threads 1
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

from benchmarks.common import (
    ServerProcess,
    machine,
    median,
    rate_limited_link,
    save_plot,
    table,
    update_doc,
    write_json,
)
from remote_autograd.hf import SplitModel, causal_lm_loss, split_causal_lm, unique_parameters

# ---- settings ---------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": "tiny",
        "batch": 2,
        "seq": 16,
        "steps": 4,
        "warmup": 1,
        "codecs": ["none", "bf16"],
    },
    "full": {
        "model": "small",
        "batch": 2,
        "seq": 64,
        "steps": 20,
        "warmup": 2,
        "codecs": ["none", "bf16", "fp16", "int8"],
    },
    # a step that is mostly wire, as with a GPU trunk, on a CPU: GPT-2 "tiny" (2 blocks of 64)
    # over 4096 tokens moves 1 MiB of float32 activations per crossing for little compute
    "wire": {
        "model": "tiny",
        "batch": 8,
        "seq": 512,
        "steps": 20,
        "warmup": 2,
        "codecs": ["none", "bf16", "fp16", "int8"],
    },
    # a batch that keeps a GPU busy: 4096 tokens, 12.6 MB of float32 activations per crossing
    "large": {
        "model": "small",
        "batch": 8,
        "seq": 512,
        "steps": 10,
        "warmup": 2,
        "codecs": ["none", "bf16", "int8"],
    },
}
# model -> (n_layer, n_embd, n_head, vocab): "small" is GPT-2 small (124M parameters).
MODELS = {"small": (12, 768, 12, 50257), "tiny": (2, 64, 4, 1000)}
SEED = 0  # the same weights in every process: split and monolithic runs start identical
LR = 3e-4
DATA_VOCAB = 512  # tokens are drawn from the first 512 ids: a pattern the model learns fast
# -----------------------------------------------------------------------------------------


def batches(preset: dict[str, Any]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    n = preset["warmup"] + preset["steps"]
    shape = (preset["batch"], preset["seq"])
    return [torch.randint(0, DATA_VOCAB, shape, generator=generator) for _ in range(n)]


def build_model(name: str) -> GPT2LMHeadModel:
    """The whole GPT-2 in training mode, GPT-2's own init drawn from ``SEED``."""
    n_layer, n_embd, n_head, vocab = MODELS[name]
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=1024,
        resid_pdrop=0.0,  # no dropout: runs are comparable step by step
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(config)
    return model.train()


def build_split(name: str) -> SplitModel:
    """Bottom | trunk (all blocks) | top, from the library's split."""
    return split_causal_lm(build_model(name), 0, MODELS[name][0])


def build_trunk(name: str) -> torch.nn.Module:
    """What the trunk server runs (``python -m benchmarks.servers ra --trunk NAME``)."""
    return build_split(name).trunk


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Monolithic:
    """The whole model in this process, on ``device``."""

    def __init__(self, preset: dict[str, Any], device: torch.device) -> None:
        self.device = device
        self.model = build_model(preset["model"]).to(device)  # unsplit
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, ids: torch.Tensor, timed: bool) -> None:  # ids: [B, T]
        ids = ids.to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        loss = causal_lm_loss(self.model(ids).logits, ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        synchronize(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)
            self.losses.append(loss.item())

    def result(self) -> dict[str, Any]:
        return {"step_s": median(self.times), "times": self.times, "losses": self.losses}


class Split:
    """Bottom and top here (on ``device``), the blocks on a trunk server; one codec both ways."""

    def __init__(
        self,
        preset: dict[str, Any],
        address: str,
        codec: str,
        device: torch.device,
        micro_batches: int = 1,
    ) -> None:
        from remote_autograd import ClientOptions, RemoteModule, RemoteOptimizer

        self.preset, self.codec, self.device = preset, codec, device
        bottom, _, top = build_split(preset["model"])
        self.bottom, self.top = bottom.to(device), top.to(device)
        options = ClientOptions(
            activation_quantization=codec,
            gradient_quantization=codec,
            micro_batches=micro_batches,  # slices of each call (chunks.py)
        )
        self.trunk = RemoteModule(address, options=options)
        self.optimizer = torch.optim.AdamW(unique_parameters(self.bottom, self.top), lr=LR)
        self.remote_optimizer = RemoteOptimizer(self.trunk, "AdamW", lr=LR)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.parts: list[dict[str, float]] = []
        self.marks: dict[str, float] = {}

    def step(self, ids: torch.Tensor, timed: bool) -> None:  # ids: [B, T]
        stats, marks = self.trunk.client.stats, self.marks
        before = (
            stats.server_compute_seconds,
            stats.server_codec_seconds,
            stats.bytes_sent + stats.bytes_received,
        )
        ids = ids.to(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        hidden = self.bottom(ids)["hidden_states"]  # [B, T, n_embd]
        # Hooks mark when the remote Backward starts (grad of the trunk's output is ready)
        # and ends (the grad of its input arrives), to split the step's time.
        hidden.register_hook(lambda g: marks.__setitem__("bwd_end", time.perf_counter()))
        t0 = time.perf_counter()
        out = self.trunk(hidden)  # [B, T, n_embd]
        t1 = time.perf_counter()
        out.register_hook(lambda g: marks.__setitem__("bwd_start", time.perf_counter()))
        loss = causal_lm_loss(self.top(out), ids)
        loss.backward()
        t2 = time.perf_counter()
        self.remote_optimizer.step()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.remote_optimizer.zero_grad()
        synchronize(self.device)
        elapsed = time.perf_counter() - start
        if not timed:
            return
        self.times.append(elapsed)
        self.losses.append(loss.item())
        rpc = (t1 - t0) + (marks["bwd_end"] - marks["bwd_start"]) + (t3 - t2)
        server_compute = stats.server_compute_seconds - before[0]
        server_codec = stats.server_codec_seconds - before[1]
        self.parts.append(
            {
                "client_s": elapsed - rpc,
                "rpc_s": rpc,
                "server_step_rpc_s": t3 - t2,
                "server_compute_s": server_compute,
                "server_codec_s": server_codec,
                "wire_and_rest_s": rpc - (t3 - t2) - server_compute - server_codec,
                "wire_bytes": stats.bytes_sent + stats.bytes_received - before[2],
            }
        )

    def result(self) -> dict[str, Any]:
        self.trunk.close()
        breakdown = {key: median([p[key] for p in self.parts]) for key in self.parts[0]}
        breakdown["client_codec_s"] = _client_codec_seconds(self.preset, self.codec, self.device)
        return {
            "step_s": median(self.times),
            "times": self.times,
            "losses": self.losses,
            "breakdown": breakdown,
        }


def _client_codec_seconds(preset: dict[str, Any], codec: str, device: torch.device) -> float:
    """Client-side encode + decode of one step's tensors (4 of [B, T, n_embd]), timed apart;
    on a GPU with the copies to and from the host."""
    from remote_autograd import Decoder, Encoder
    from remote_autograd.memory import to_device

    n_embd = MODELS[preset["model"]][1]
    tensor = torch.randn(preset["batch"], preset["seq"], n_embd).to(device)
    encoder, decoder = Encoder(quantization=codec), Decoder()
    frame = encoder.encode({"t": tensor})
    samples = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(2):  # Compute and Backward: one frame out, one in each
            encoder.encode_buffers({"t": tensor})
            to_device(decoder.decode(bytearray(frame), device=device)["t"], device)
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return median(samples)


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    mono = data["monolithic"]
    out: dict[str, Any] = {}
    raw = data["split"].get("none")
    for codec, result in data["split"].items():
        out[codec] = _ratios(result, mono, raw)
    for codec, result in data.get("sliced", {}).items():
        out[f"{codec}, sliced"] = {
            **_ratios(result, mono, raw),
            "step_vs_sequential": result["step_s"] / data["split"][codec]["step_s"],
        }
    return out


def _ratios(result: dict[str, Any], mono: dict[str, Any], raw: dict[str, Any] | None):
    deltas = [abs(a - b) / b for a, b in zip(result["losses"], mono["losses"], strict=True)]
    return {
        "step_vs_monolithic": result["step_s"] / mono["step_s"],
        "step_vs_split_float32": result["step_s"] / raw["step_s"] if raw else None,
        "max_loss_rel_diff_vs_monolithic": max(deltas),
        "final_loss_rel_diff_vs_monolithic": deltas[-1],
    }


def _runs(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, ratios key, result) of every split run, sliced ones after the sequential."""
    k = data["preset"].get("micro_batches", 1)
    runs = [(f"split, wire {c}", c, r) for c, r in data["split"].items()]
    runs += [
        (f"split, wire {c}, micro_batches={k}", f"{c}, sliced", r)
        for c, r in data.get("sliced", {}).items()
    ]
    return runs


def markdown(data: dict[str, Any], title: str) -> str:
    mono = data["monolithic"]
    p = data["preset"]
    rows = [
        [
            "monolithic (one process)",
            mono["step_s"] * 1e3,
            1.0,
            "",
            "",
            "",
            "",
            "",
            "",
            mono["losses"][-1],
            0.0,
        ]
    ]
    for label, key, r in _runs(data):
        b, s = r["breakdown"], data["ratios"][key]
        rows.append(
            [
                label,
                r["step_s"] * 1e3,
                s["step_vs_monolithic"],
                s["step_vs_split_float32"],
                b["client_s"] * 1e3,
                b["server_compute_s"] * 1e3 + b["server_step_rpc_s"] * 1e3,
                (b["server_codec_s"] + b["client_codec_s"]) * 1e3,
                b["wire_and_rest_s"] * 1e3,
                b["wire_bytes"] / 1e6,
                r["losses"][-1],
                s["max_loss_rel_diff_vs_monolithic"],
            ]
        )
    header = [
        "run",
        "step ms",
        "vs monolithic",
        "vs split float32",
        "client compute ms",
        "server compute+Step ms",
        "encode/decode ms",
        "wire+gRPC ms",
        "MB on wire",
        "final loss",
        "max loss rel. diff",
    ]
    return (
        f"### {title}\n\nGPT-2 `{p['model']}` (random init, split by `remote_autograd.hf`, every "
        f"block on the server, no LoRA: all weights train), batch {p['batch']} x "
        f"{p['seq']} tokens, AdamW, {p['steps']} timed steps after {p['warmup']} warm-up "
        f"(medians); trunk on {data['devices']['trunk']}, client and monolithic on "
        f"{data['devices']['client']}{_gpu_note(data)}.\n\n" + table(header, rows)
    )


def _gpu_note(data: dict[str, Any]) -> str:
    return f" ({data['gpu']})" if data.get("gpu") else ""


def plot(data: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(data["monolithic"]["losses"], "k-", lw=3, alpha=0.4, label="monolithic float32")
    for label, _, result in _runs(data):
        ax.plot(result["losses"], "-o", ms=3, label=label)
    ax.set_xlabel("timed step")
    ax.set_ylabel("training loss")
    save_plot(fig, ax, path, title=title, legend_size=8)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--codecs", type=lambda s: s.split(","), help="override the codecs")
    parser.add_argument("--steps", type=int, help="override the preset's timed steps")
    parser.add_argument(
        "--micro-batches", type=int, help="also run each codec with this many slices per call"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads of every process (default: this one's)"
    )
    parser.add_argument("--link", help="run over a veth pair shaped to this rate (100mbit...)")
    parser.add_argument("--trunk-device", default="cpu", help="the server's blocks: cpu, cuda...")
    parser.add_argument(
        "--client-device", default="cpu", help="embeddings, head and monolithic model: cpu, cuda..."
    )
    parser.add_argument("--json", help="write the results here (default: stdout)")
    parser.add_argument("--doc", action="store_true", help="update docs/benchmarks.md + plot")
    parser.add_argument(
        "--render", help="no run: write the doc section of a results JSON (from a GPU machine)"
    )
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        document(data)
        return data
    data = run(args)
    write_json(args.json, data)
    if args.doc:
        document(data)
    return data


def document(data: dict[str, Any]) -> None:
    """Write the run's section of docs/benchmarks.md and its plot."""
    from benchmarks.common import DOCS

    link = data["link"] if data["link"] != "loopback" else ""
    on_gpu = data.get("gpu") is not None
    name = data.get("preset_name", "full")
    suffix = (f"_{link}" if link else "") + ("" if name == "full" else f"_{name}")
    slices = data["preset"].get("micro_batches", 1)
    suffix += f"_mb{slices}" if slices > 1 else ""
    if on_gpu:
        suffix += "_gpu" + ("" if data["devices"]["client"] != "cpu" else "_client_cpu")
    title = f"Training step over {link or 'loopback'}"
    if name != "full":
        title += f", preset {name}"
    if slices > 1:
        title += f", micro_batches={slices}"
    if on_gpu:
        title += f", {data['gpu']} (trunk on {data['devices']['trunk']}, client on "
        title += f"{data['devices']['client']})"
    plot(data, str(DOCS / f"step{suffix}.png"), title)
    update_doc(f"step{suffix}", markdown(data, title) + f"\n\n![{title}](step{suffix}.png)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = dict(PRESETS[args.preset])
    if args.codecs:
        preset["codecs"] = args.codecs
    if args.steps:
        preset["steps"] = args.steps
    if args.micro_batches and args.micro_batches > 1:
        preset["micro_batches"] = args.micro_batches
    if args.threads:
        torch.set_num_threads(args.threads)
    client_device = torch.device(args.client_device)
    data: dict[str, Any] = {
        "benchmark": "step",
        "preset_name": args.preset,
        "preset": preset,
        "link": args.link or "loopback",
        "devices": {"trunk": args.trunk_device, "client": args.client_device},
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
    }
    with ExitStack() as stack:
        netns, host = None, "127.0.0.1"
        if args.link:
            link = stack.enter_context(rate_limited_link(args.link))
            netns, host = link.netns, link.server_ip
        runners: dict[tuple[str, str], Monolithic | Split] = {
            ("monolithic", ""): Monolithic(preset, client_device)
        }
        slices = [("split", 1)]
        if "micro_batches" in preset:
            slices.append(("sliced", preset["micro_batches"]))
        servers = {
            (kind, codec, k): stack.enter_context(
                ServerProcess(
                    "ra",
                    "--trunk",
                    preset["model"],
                    "--device",
                    args.trunk_device,
                    "--host",
                    host,
                    netns=netns,
                    env={"OMP_NUM_THREADS": str(torch.get_num_threads())},
                    wait=False,  # started side by side, waited for below
                )
            )
            for codec in preset["codecs"]
            for kind, k in slices
        }
        for (kind, codec, k), server in servers.items():
            server.wait_ready()
            runners[kind, codec] = Split(preset, server.address, codec, client_device, k)
        # Lockstep: step i of every run back to back, so a slow patch of a noisy machine
        # hits all of them alike and the ratios stay honest.
        for i, ids in enumerate(batches(preset)):
            for runner in runners.values():
                runner.step(ids, timed=i >= preset["warmup"])
        data["monolithic"] = runners.pop(("monolithic", "")).result()
        for (kind, codec), runner in runners.items():
            data.setdefault(kind, {})[codec] = runner.result()
        for label, _, result in _runs(data):
            print(
                f"{label}: {result['step_s'] * 1e3:.0f} ms "
                f"(monolithic {data['monolithic']['step_s'] * 1e3:.0f} ms)",
                flush=True,
            )
    data["ratios"] = summarize(data)
    on_gpu = "cuda" in {torch.device(d).type for d in (args.trunk_device, args.client_device)}
    # Asked only now: in a process that has not touched CUDA it would start it, and that
    # changes how the client receives (pinned buffers).
    data["gpu"] = torch.cuda.get_device_name() if on_gpu else None
    return data


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
