"""Checkpoints of a three-part run: bottom and top from here, the trunk's through its server."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..module import RemoteModule
from ..optim import RemoteOptimizer

__all__ = [
    "ResumeMismatch",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "trainable_state",
]

log = logging.getLogger(__name__)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (the adapters with LoRA, every weight without); frozen base
    weights are rebuilt from the model spec and need no saving."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    *,
    step: int,
    spec: Any,
    lora: Any,
    bottom: nn.Module,
    top: nn.Module,
    trunk: RemoteModule,
    optimizer: torch.optim.Optimizer,
    trunk_optimizer: RemoteOptimizer,
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    history: list[dict[str, float]],
    schedule: dict[str, int] | None = None,
) -> Path:
    state = {
        "step": step,
        "model": dataclasses.asdict(spec),
        "lora": dataclasses.asdict(lora),
        "bottom": trainable_state(bottom),
        "top": trainable_state(top),
        "trunk": trunk.remote_state_dict(),
        "optimizer": optimizer.state_dict(),
        "trunk_optimizer": trunk_optimizer.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
        "schedule": dict(schedule or {}),  # the LR schedule's shape (steps, warmup_steps)
        "rng": torch.random.get_rng_state(),  # dropout here, and the trunk's dropout seeds
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-write leaves the previous checkpoint intact
    log.info("checkpoint of step %d written to %s", step, path)
    return path


class ResumeMismatch(ValueError):
    """A training checkpoint written with other model or LoRA options than this run's."""


def _same_meaning(options: dict[str, Any]) -> dict[str, Any]:
    """Model options as they decide the model: no model type and no folder is GPT-2 (``train``
    without --model-type), the same model as --model-type gpt2."""
    if "model_type" in options and options.get("path") is None and options["model_type"] is None:
        return {**options, "model_type": "gpt2"}
    return options


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or the newest ``step_*.pt`` in it when it is a folder."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("step_*.pt"))
        if not found:
            raise FileNotFoundError(f"no step_*.pt checkpoint in {path}")
        return found[-1]
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_checkpoint(
    path: str | Path,
    *,
    spec: Any,
    lora: Any,
    bottom: nn.Module,
    top: nn.Module,
    trunk: RemoteModule,
    optimizer: torch.optim.Optimizer,
    trunk_optimizer: RemoteOptimizer,
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    schedule: dict[str, int] | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Restore all three parts, both optimizers, the schedules and the RNG; return the step
    reached and the metrics history so far.

    ``schedule`` (the LR schedule's shape: steps, warmup_steps) takes the checkpoint's values:
    a run resumed with more ``--steps`` keeps the schedule it was started with (past its end
    the lr stays at its floor) instead of silently stretching it, and says so."""
    path = find_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for what, current in (("model", dataclasses.asdict(spec)), ("lora", dataclasses.asdict(lora))):
        saved = _same_meaning(
            {k: tuple(v) if isinstance(v, list) else v for k, v in state[what].items()}
        )
        current = _same_meaning(
            {k: tuple(v) if isinstance(v, list) else v for k, v in current.items()}
        )
        if saved != current:
            raise ResumeMismatch(
                f"{path} was written with {what} options {saved}, but this run has {current}; "
                "resume with the same options"
            )
    _load_into(bottom, state["bottom"], "bottom")
    _load_into(top, state["top"], "top")
    trunk.load_remote_state_dict(state["trunk"])
    optimizer.load_state_dict(state["optimizer"])
    trunk_optimizer.load_state_dict(state["trunk_optimizer"])
    for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    original = state.get("schedule") or {}
    if schedule is not None and original and original != schedule:
        log.warning(
            "resuming %s with an LR schedule of %s, but the run was started with %s: keeping "
            "the original schedule (its lr stays at the floor past step %d); start a new run "
            "(without --resume) for another schedule",
            path,
            schedule,
            original,
            original.get("steps", 0),
        )
        schedule.update(original)
    torch.random.set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), list(state["history"])


@torch.no_grad()
def _load_into(module: nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    named = dict(module.named_parameters())
    missing = [n for n, p in named.items() if p.requires_grad and n not in state]
    if missing or any(n not in named for n in state):
        raise ValueError(
            f"the checkpoint's {part} does not fit this model (missing {missing[:3]}, "
            f"unknown {[n for n in state if n not in named][:3]})"
        )
    for name, value in state.items():
        named[name].copy_(value)
