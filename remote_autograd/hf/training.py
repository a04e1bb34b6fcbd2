"""Three-part training: bottom and top here, the trunk on a server, one ordinary PyTorch loop.

    bottom (AdamW) -> trunk (RemoteModule, RemoteOptimizer) -> top (AdamW) -> loss.backward()

Per optimizer step: ``grad_accum`` micro-batches forward and backward, then the global
gradient norm over all three parts is clipped (the trunk's norms come from the server), then
both optimizers step and both LR schedules advance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..fingerprint import trunk_fingerprint
from ..module import RemoteModule
from ..optim import RemoteOptimizer, clip_grad_norm_
from ..options import ClientOptions
from ..pipeline import PipelinedStep
from .checkpoint import load_checkpoint, save_checkpoint
from .data import builtin_corpus, micro_batches, pack_samples
from .lora import LoraOptions, lora_state
from .models import ModelSpec, build_client_parts, build_config, build_tokenizer, build_trunk
from .split import causal_lm_loss

__all__ = [
    "TrainConfig",
    "TrainResult",
    "expected_fingerprint",
    "lr_factor",
    "train",
    "unique_parameters",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``model`` and ``lora`` must be what the trunk server was started with."""

    server: str  # address of the trunk server, host:port
    model: ModelSpec = field(default_factory=ModelSpec)  # what to split, and where
    lora: LoraOptions = field(default_factory=LoraOptions)  # adapters of the bottom and top
    steps: int = 300  # optimizer steps in all (a resumed run stops here too)
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    micro_batches: int = 1  # >1: each micro-batch runs as this many pipelined pieces, the
    # client's bottom/top overlapping the trunk's work (remote_autograd.pipeline)
    seq_len: int = 128  # tokens per sample, at most
    lr: float = 3e-3  # peak learning rate of both optimizers
    weight_decay: float = 0.0  # AdamW weight decay of both optimizers
    warmup_steps: int = 20  # linear warmup, then cosine decay to 10% of lr
    max_grad_norm: float = 1.0  # global clipping over all three parts; 0 turns it off
    corpus: str | None = None  # a UTF-8 text file; None: Python's pydoc topics
    max_samples: int | None = None  # use only the first samples of the corpus
    seed: int = 0  # data order and dropout here (the weights come from model.seed)
    out_dir: str = "runs/train"  # metrics.json, loss.png, checkpoints/
    checkpoint_every: int = 0  # save every this many steps (0: only at the end)
    resume: str | None = None  # a checkpoint file, or a folder holding step_*.pt
    progress: bool = False  # show a tqdm bar
    client: ClientOptions = field(default_factory=ClientOptions)  # how to reach the server


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one entry per optimizer step, from step 1
    lora_change: dict[str, float]  # L2 norm of each part's adapter change over this run
    frozen_unchanged: bool  # the bottom's and top's frozen weights are bit-for-bit the same
    bottom: nn.Module
    top: nn.Module
    out_dir: Path


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine down to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def unique_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``modules`` in order, each once (GPT-2's embedding is also its LM head)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def train(config: TrainConfig) -> TrainResult:
    if not 1 <= config.micro_batches <= config.batch_size:
        raise ValueError(
            f"micro_batches must be between 1 and batch_size ({config.batch_size}), "
            f"got {config.micro_batches}"
        )
    out_dir = Path(config.out_dir)
    # A table of learned positions (GPT-2's n_positions) ends; rotary positions do not.
    positions = getattr(build_config(config.model), "n_positions", None)
    if positions is not None and config.seq_len > positions:
        raise ValueError(
            f"seq_len={config.seq_len} is longer than the model's {positions} positions "
            "(n_positions): shorten --seq-len"
        )
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config.model)
    bottom, top = build_client_parts(config.model, config.lora)
    text = Path(config.corpus).read_text(encoding="utf-8") if config.corpus else builtin_corpus()
    samples = pack_samples(text, tokenizer, config.seq_len, max_samples=config.max_samples)
    log.info("%d samples of up to %d tokens", len(samples), config.seq_len)

    with contextlib.ExitStack() as stack:  # closes the bar and the trunk's channel
        trunk = stack.enter_context(RemoteModule(config.server, options=_checked(config)))
        if trunk.client.info().trainable_numel == 0:
            raise ValueError(f"the trunk served at {config.server} has no trainable parameters")
        local = [p for p in unique_parameters(bottom, top) if p.requires_grad]
        # The unsplit model's parameter order, the trunk standing for its own: what clipping needs.
        in_bottom = {id(p) for p in bottom.parameters()}
        clip_order: list[Any] = [
            *bottom.parameters(),
            trunk,
            *(p for p in top.parameters() if id(p) not in in_bottom),
        ]
        optimizer = torch.optim.AdamW(local, lr=config.lr, weight_decay=config.weight_decay)
        trunk_optimizer = RemoteOptimizer(
            trunk, torch.optim.AdamW, lr=config.lr, weight_decay=config.weight_decay
        )

        # The LR schedule's shape; a resumed run keeps its checkpoint's (see load_checkpoint).
        shape = {"steps": config.steps, "warmup_steps": config.warmup_steps}

        def schedule(step: int) -> float:
            return lr_factor(step, warmup=shape["warmup_steps"], total=shape["steps"])

        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (optimizer, trunk_optimizer)
        ]
        parts = {"bottom": bottom, "top": top}
        # What a checkpoint holds besides the step and the history: saved and loaded alike.
        run_state: dict[str, Any] = dict(
            spec=config.model,
            lora=config.lora,
            trunk=trunk,
            optimizer=optimizer,
            trunk_optimizer=trunk_optimizer,
            schedulers=schedulers,
            schedule=shape,
            **parts,
        )
        step, history = 0, list[dict[str, float]]()
        if config.resume:
            step, history = load_checkpoint(config.resume, **run_state)
        adapters_before = _adapters(bottom, top, trunk)
        frozen_before = {
            (part, n): p.detach().clone()
            for part, module in parts.items()
            for n, p in module.named_parameters()
            if not p.requires_grad
        }

        batches = micro_batches(
            samples,
            config.batch_size,
            pad_id=tokenizer.pad_token_id,
            seed=config.seed,
            start=step * config.grad_accum,
        )
        bottom.train()
        top.train()
        trunk.train()
        stats = trunk.client.stats
        pipelined = _pipelined_step(bottom, trunk, top, config.micro_batches, config.grad_accum)
        bar = stack.enter_context(
            tqdm(total=config.steps, initial=step, disable=not config.progress, unit="step")
        )
        while step < config.steps:
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            losses, tokens = [], 0
            for _ in range(config.grad_accum):
                batch = next(batches)
                tokens += int(batch["attention_mask"].sum())
                if pipelined is not None:
                    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
                    loss = pipelined(x, batch["labels"])
                    # The token mean of the whole micro-batch (divided by grad_accum inside).
                    losses.append(loss.item() * config.grad_accum)
                    continue
                # Seeds the trunk's dropout from this side's generator (see Trunk.forward).
                dropout_seed = int(torch.randint(2**62, ()).item())
                state = bottom(batch["input_ids"], batch["attention_mask"])  # hidden (B, T, d)
                hidden = trunk(**state, dropout_seed=dropout_seed)  # (B, T, d), on the server
                logits = top(hidden, state["attention_mask"], state["position_ids"])  # (B, T, V)
                loss = causal_lm_loss(logits, batch["labels"])
                (loss / config.grad_accum).backward()
                losses.append(loss.item())
            # With clipping off the norm is still measured (an infinite bound scales by 1).
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
            grad_norm = float(clip_grad_norm_(clip_order, max_norm))
            # The trunk first: a Step refused after a server restart leaves both parts unstepped,
            # so redoing the step cannot step the local parts twice.
            trunk_optimizer.step()
            optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            optimizer.zero_grad()
            trunk_optimizer.zero_grad()
            step += 1
            seconds = time.perf_counter() - started
            metrics = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "bytes_sent": stats.bytes_sent,  # this process's totals since it started
                "bytes_received": stats.bytes_received,
            }
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                sent=_megabytes(stats.bytes_sent),
                recv=_megabytes(stats.bytes_received),
            )
            if step == config.steps or (
                config.checkpoint_every and step % config.checkpoint_every == 0
            ):
                save_checkpoint(
                    out_dir / "checkpoints" / f"step_{step:06d}.pt",
                    step=step,
                    history=history,
                    **run_state,
                )
        adapters_after = _adapters(bottom, top, trunk)
    lora_change = {
        part: _distance(adapters_before[part], adapters_after[part]) for part in adapters_before
    }
    frozen_unchanged = all(
        torch.equal(value, dict(parts[part].named_parameters())[name])
        for (part, name), value in frozen_before.items()
    )
    write_report(out_dir, config, history, lora_change)
    return TrainResult(history, lora_change, frozen_unchanged, bottom, top, out_dir)


def expected_fingerprint(spec: ModelSpec, lora: LoraOptions) -> str:
    """The fingerprint of the trunk ``serve`` builds from ``spec`` and ``lora``: what this
    trainer's server must serve (other layers, model or adapters are refused)."""
    if spec.path is None:  # a random init: the layout alone, no memory for weights
        with torch.device("meta"):
            return trunk_fingerprint(build_trunk(spec, lora))
    return trunk_fingerprint(build_trunk(spec, lora))


def _checked(config: TrainConfig) -> ClientOptions:
    """The client options, with the fingerprint of this run's trunk unless one was given."""
    if config.client.fingerprint is not None:
        return config.client
    fingerprint = expected_fingerprint(config.model, config.lora)
    return dataclasses.replace(config.client, fingerprint=fingerprint)


def _pipelined_step(
    bottom: nn.Module, trunk: RemoteModule, top: nn.Module, micro_batches: int, grad_accum: int
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """The loop body above as a pipelined step over ``micro_batches`` pieces (None for 1).
    Each piece's token-mean loss is weighted by its count of predicted tokens, so the sum is
    the token mean of the whole micro-batch. An epoch's last micro-batch may hold fewer samples
    than ``micro_batches``: it runs as one piece per sample."""
    if micro_batches == 1:
        return None

    def bottom_part(x: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        dropout_seed = int(torch.randint(2**62, ()).item())  # drawn here: the caller's thread
        return bottom(x["input_ids"], x["attention_mask"]), dropout_seed

    def trunk_part(value: tuple[dict[str, torch.Tensor], int]) -> tuple[torch.Tensor, ...]:
        state, dropout_seed = value
        hidden = trunk(**state, dropout_seed=dropout_seed)
        return hidden, state["attention_mask"], state["position_ids"]

    def top_part(value: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return top(*value)

    def predicted_tokens(labels: torch.Tensor) -> float:
        return float((labels[:, 1:] != -100).sum())

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not predicted_tokens(labels):
            # A piece of end-of-text-only samples: its weight is 0, and its loss must be a
            # finite 0 (a token mean over no tokens is NaN, and NaN x 0 is NaN).
            return logits.sum() * 0.0
        return causal_lm_loss(logits, labels) / grad_accum

    steps: dict[int, PipelinedStep] = {}

    def step(x: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        pieces = min(micro_batches, labels.shape[0])
        if pieces not in steps:
            steps[pieces] = PipelinedStep(
                bottom_part,
                trunk_part,
                top_part,
                loss_fn,
                micro_batches=pieces,
                weight=predicted_tokens,
            )
        return steps[pieces](x, labels)

    return step


def _adapters(bottom: nn.Module, top: nn.Module, trunk: RemoteModule) -> dict[str, dict]:
    remote = {n: t for n, t in trunk.remote_state_dict().items() if "lora_" in n}
    return {"bottom": lora_state(bottom), "trunk": remote, "top": lora_state(top)}


def _distance(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    if not before:
        return 0.0
    squares = sum(float((after[n] - t).pow(2).sum()) for n, t in before.items())
    return math.sqrt(squares)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f}MB"


def write_report(
    out_dir: Path,
    config: TrainConfig,
    history: list[dict[str, float]],
    lora_change: dict[str, float],
) -> None:
    """``metrics.json`` (config, per-step metrics, adapter changes) and ``loss.png``."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        # The client options stay out: they may hold a bearer token.
        "config": _plain({k: v for k, v in dataclasses.asdict(config).items() if k != "client"}),
        "steps": history,
        "lora_change": lora_change,
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    figure = Figure(figsize=(6, 3.5), layout="tight")
    axes = figure.add_subplot()
    axes.plot([m["step"] for m in history], [m["loss"] for m in history], linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title("bottom + remote trunk + top")
    axes.grid(alpha=0.3)
    figure.savefig(out_dir / "loss.png", dpi=120)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
