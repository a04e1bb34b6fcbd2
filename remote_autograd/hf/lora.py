"""LoRA adapters on any part of a split model, with peft (base weights frozen)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["LoraOptions", "add_lora", "lora_config", "lora_state"]


@dataclass(frozen=True)
class LoraOptions:
    """The adapters every part gets; the server and the client take the same ones."""

    rank: int = 8  # r of each adapter; 0 turns LoRA off (every weight trains)
    alpha: int = 16  # scaling numerator: updates are scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input
    # Module names to adapt; None: the model family's defaults (DecoderFamily.lora_targets,
    # applied by build_trunk / build_client_parts)
    target_modules: tuple[str, ...] | None = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def add_lora(
    module: nn.Module, options: LoraOptions, *, seed: int, part: str = "part"
) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place and freeze everything else.

    ``seed`` makes the adapters' random initialisation repeatable without touching the global
    generator. ``part`` names the module in errors.
    """
    if options.target_modules is None:
        raise ValueError(
            f"LoRA on the {part}: LoraOptions.target_modules is None; name the modules to adapt "
            "(build_trunk and build_client_parts fill in the model family's defaults)"
        )
    targets = set(options.target_modules)
    config = lora_config(
        module, targets, rank=options.rank, alpha=options.alpha, dropout=options.dropout
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return inject_adapter_in_model(config, module)
        except ValueError as exc:
            raise ValueError(
                f"LoRA on the {part}: none of the target modules {sorted(targets)} is in it "
                f"({exc}); move the split points so every part holds at least one block, or "
                "change --lora-targets"
            ) from exc


def lora_config(
    module: nn.Module, targets: set[str], *, rank: int, alpha: int, dropout: float
) -> LoraConfig:
    """peft's configuration of adapters on the ``targets`` of ``module`` (a part here, or the
    trunk of a per-client adapter server)."""
    # GPT-2 stores its linear layers transposed (transformers' Conv1D); peft wants to be told.
    fan_in_fan_out = any(
        isinstance(m, Conv1D)
        for name, m in module.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    )
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(targets),
        fan_in_fan_out=fan_in_fan_out,
    )


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapter weights of ``module`` (what changes when LoRA trains)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
