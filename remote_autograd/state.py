"""The state a TrunkService holds, declared once for the mixins that share it.

TrunkService (service.py) sets every attribute in its ``__init__``; compute.py, optimizers.py
and checkpoint.py hold the work behind the RPCs and read this state through ``self``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from . import codec
from .cache import ContextCache, SessionTable, StepTurns
from .options import ServerOptions

__all__ = ["TrunkState"]


class TrunkState:
    """Annotations only: what TrunkService.__init__ provides."""

    options: ServerOptions
    module: torch.nn.Module
    params: list[tuple[str, torch.nn.Parameter]]  # the trainable ones, in module order
    device: torch.device
    dtype: torch.dtype | None  # the trunk's dtype when the server casts (ServerOptions.dtype)
    sessions: SessionTable
    contexts: ContextCache
    turns: StepTurns
    decoder: codec.Decoder
    weights_version: int  # optimizer steps (and loads) applied to the weights
    saved_version: int | None  # weights_version of the last checkpoint
    server_id: str  # this server process; a restart changes it
    _trunk_lock: threading.RLock  # held while the trunk runs or its weights change
    checkpoint: Callable[..., int]  # CheckpointMixin.checkpoint
