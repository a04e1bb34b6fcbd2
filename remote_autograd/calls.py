"""What the engine is asked and what it answers: plain dataclasses, no protobuf.

The gRPC service (service.py) builds a call from a request's header and turns a result into
the reply's header; the engine (engine.py) never sees either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sessions import ZeroGrad
from .turns import StepWait

__all__ = [
    "BackwardCall",
    "BackwardResult",
    "ComputeCall",
    "ComputeResult",
    "StepCall",
    "StepResult",
    "TrunkInfo",
]


@dataclass(frozen=True)
class ComputeCall:
    request_id: str  # names the forward context a Backward will find (when kept)
    training: bool  # the trunk's mode for this forward
    needs_input_grad: list[bool]  # per input tensor; empty: none needs one
    keep_context: bool = False  # keep the graph for a Backward
    recompute: bool = False  # re-create a lost context from these inputs (nothing is run now)
    rng_seed: int = 0  # the forward's RNG seed; 0: the engine picks one
    weights_version: int = 0  # recompute only: the weights the lost forward ran on
    weights_id: str = ""  # recompute only: their id ("": not checked)
    backward_seq: int = 0  # recompute only: backwards the lost context had answered
    autocast: torch.dtype | None = None  # the client's torch.autocast dtype (None: off)


@dataclass
class ComputeResult:
    value: Any  # the trunk's output (None for a recompute: the client has it)
    weights_version: int  # the weights the forward ran on
    seed: int  # the RNG seed it ran with, for a later recompute
    recomputed: bool
    compute_seconds: float
    weights_id: str = ""  # names those weights (TrunkEngine.weights_id)
    # Per output tensor: it needs no gradient (empty: not known, every one may).
    without_grad: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class BackwardCall:
    request_id: str
    seq: int  # 1, 2...: backwards through the same context; a repeat is a retry
    needs_input_grad: list[bool]
    zero_grad: ZeroGrad = ZeroGrad.KEEP  # a deferred zero_grad(), applied first
    grad_scale: float = 0.0  # a deferred clip scale (0 or 1: none), applied after it
    freeze_parameters: bool = False  # the client froze the trunk: input gradients only
    report_nonfinite: bool = False  # non-finite gradients: accumulate nothing, say so


@dataclass
class BackwardResult:
    grads: list[torch.Tensor | None]  # one per input, in the dtype it was sent in
    weights_version: int
    recomputed: bool  # the forward was run again for this Backward
    compute_seconds: float
    nonfinite: bool = False  # the gradients were not finite: nothing was accumulated


@dataclass(frozen=True)
class GradNormCall:
    norm_type: float = 2.0
    zero_grad: int = 0  # a deferred zero_grad() (ZeroGrad) and clip scale, applied first
    grad_scale: float = 0.0
    ops_id: str = ""  # names them: a retry with the same id does not apply them again
    server_id: str = ""  # the process that accumulated the gradients ("": not checked)


@dataclass(frozen=True)
class StepCall:
    step: int  # 1, 2...: the session's step number; a repeat is a replay
    param_groups: list[dict[str, Any]] | None = None  # hyperparameters per group (schedulers)
    zero_grad: ZeroGrad = ZeroGrad.KEEP
    grad_scale: float = 0.0
    server_id: str = ""  # the server process that accumulated the gradients ("" = unknown)
    optimizer_id: str = ""  # the client's configuration it steps ("": not checked)


@dataclass
class StepResult:
    step: int
    weights_version: int
    replayed: bool = False  # applied before: nothing changed
    wait: StepWait = StepWait()  # how long it waited for other sessions' forwards


@dataclass
class TrunkInfo:
    trainable_parameters: list[str]
    trainable_numel: int
    device: str
    module_name: str
    server_id: str
    fingerprint: str = ""  # trunk_fingerprint() of the module as given to the engine
    weights_version: int = 0  # optimizer steps (and loads) applied so far
    buffers: list[str] = field(default_factory=list)  # persistent buffers, state_dict order
    dtype: str = ""  # the floating parameters' dtype ("" when the trunk has none)
    world_size: int = 1  # processes computing the trunk (distributed.py)
    parallel: str = ""  # "ddp", or "" for one process
    batch_statistics: str = ""  # class of a module computing over the batch in training, or ""
