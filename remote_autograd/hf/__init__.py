"""Split a Hugging Face causal LM (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2/3, Gemma, Phi-3, or a
family you register) into bottom, remote trunk and top, and train all three with LoRA adapters
(peft): ``remote-autograd serve --model-type ...`` runs the trunk, ``remote-autograd train`` the
rest. See docs/tutorial.md.

The names below are imported on first use (PEP 562; no submodule is named like one of them,
or importing it would shadow the name), so that ``import remote_autograd.hf.cli``
(which the core command line does to list the ``train`` and ``demo`` commands) costs no
transformers import: ``remote-autograd serve --module ...`` starts as fast without the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .families import (
        FAMILIES,
        DecoderFamily,
        GPT2Family,
        GPTNeoXFamily,
        LlamaFamily,
        Phi3Family,
        get_family,
        register_family,
    )
    from .lora import LoraOptions, add_lora, lora_state
    from .models import (
        ModelSpec,
        build_client_parts,
        build_config,
        build_model,
        build_tokenizer,
        build_trunk,
    )
    from .split import Bottom, SplitModel, Top, Trunk, causal_lm_loss, split_causal_lm
    from .training import TrainConfig, TrainResult, lr_factor, train, unique_parameters

__all__ = [
    "Bottom",
    "DecoderFamily",
    "FAMILIES",
    "GPT2Family",
    "GPTNeoXFamily",
    "LlamaFamily",
    "LoraOptions",
    "ModelSpec",
    "Phi3Family",
    "SplitModel",
    "Top",
    "TrainConfig",
    "TrainResult",
    "Trunk",
    "add_lora",
    "build_client_parts",
    "build_config",
    "build_model",
    "build_tokenizer",
    "build_trunk",
    "causal_lm_loss",
    "get_family",
    "lora_state",
    "lr_factor",
    "register_family",
    "split_causal_lm",
    "train",
    "unique_parameters",
]

# submodule -> the public names it defines (the same names as __all__; a test checks)
_MODULES = {
    "families": (
        "FAMILIES",
        "DecoderFamily",
        "GPT2Family",
        "GPTNeoXFamily",
        "LlamaFamily",
        "Phi3Family",
        "get_family",
        "register_family",
    ),
    "lora": (
        "LoraOptions",
        "add_lora",
        "lora_state",
    ),
    "models": (
        "ModelSpec",
        "build_client_parts",
        "build_config",
        "build_model",
        "build_tokenizer",
        "build_trunk",
    ),
    "split": (
        "Bottom",
        "SplitModel",
        "Top",
        "Trunk",
        "causal_lm_loss",
        "split_causal_lm",
    ),
    "training": (
        "TrainConfig",
        "TrainResult",
        "lr_factor",
        "train",
        "unique_parameters",
    ),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
