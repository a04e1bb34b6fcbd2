"""Split a Hugging Face causal LM (GPT-2 now) into bottom, remote trunk and top, and train all
three with LoRA adapters (peft): ``remote-autograd serve`` runs the trunk, ``remote-autograd
train`` the rest. See docs/tutorial.md."""

from .lora import LoraOptions, add_lora, lora_state
from .models import ModelSpec, build_client_parts, build_model, build_tokenizer, build_trunk
from .split import (
    FAMILIES,
    Bottom,
    DecoderFamily,
    GPT2Family,
    LlamaFamily,
    SplitModel,
    Top,
    Trunk,
    causal_lm_loss,
    split_causal_lm,
)
from .train import TrainConfig, TrainResult, lr_factor, train, unique_parameters

__all__ = [
    "FAMILIES",
    "Bottom",
    "DecoderFamily",
    "GPT2Family",
    "LlamaFamily",
    "LoraOptions",
    "ModelSpec",
    "SplitModel",
    "Top",
    "TrainConfig",
    "TrainResult",
    "Trunk",
    "add_lora",
    "build_client_parts",
    "build_model",
    "build_tokenizer",
    "build_trunk",
    "causal_lm_loss",
    "lora_state",
    "lr_factor",
    "split_causal_lm",
    "train",
    "unique_parameters",
]
