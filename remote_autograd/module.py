"""RemoteModule: an nn.Module that stands for a trunk running on a server."""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from . import codec
from .chunks import ChunkedCall
from .client import TrunkClient
from .function import RemoteCall, remote_apply
from .options import ClientOptions
from .tree import flatten, unflatten
from .trunk_state import load_trunk_state, save_trunk_state, split_trunk_state

__all__ = ["RemoteModule"]

_CPU = torch.device("cpu")
_NO_CAST = (torch.float32, torch.float64)  # what the probes of a cast-free _apply come back as


def _autocast_dtype(device_type: str) -> str:
    """The dtype name of the torch.autocast region the caller is in ("" = none): the trunk
    runs under autocast with it on the server, as it would here."""
    if not torch.is_autocast_enabled(device_type):
        return ""
    return codec.dtype_name(torch.get_autocast_dtype(device_type))


# torch.utils.checkpoint runs a checkpointed forward again inside the backward, restoring the
# client's RNG state first; the trunk's randomness is drawn on the server from the seed its
# Compute carries. So each training forward's seeds are remembered under the client's RNG
# state (what the checkpoint restores): a forward inside a backward finds its first run's.
_RECOMPUTED = (
    "a RemoteModule ran its forward inside a backward pass (torch.utils.checkpoint recomputing "
    "it) in training mode, and its first run's dropout seed could not be told (two forwards "
    "with the same RNG state, or one too long ago): the trunk's randomness (dropout) is drawn "
    "anew on the server, so if the trunk has any, the recomputed output is not the one the "
    "loss used and the gradients are wrong (docs/habits.md, 'Activation checkpointing')"
)
_SEEDS_KEPT = 1024  # training forwards whose seeds a recompute may ask for
_AMBIGUOUS: list[int] = []  # two forwards from one RNG state: no seed to give back


def _rng_state() -> int:
    """The client's CPU RNG state, which torch.utils.checkpoint always restores for its
    recompute (a device's only where the checkpointed function's arguments are on it, so it
    is left out): a few microseconds. Two forwards that only a device's RNG tells apart are
    ambiguous, and their recompute warns."""
    return hash(torch.default_generator.get_state().numpy().tobytes())


_SAMPLED = 16  # elements of each input a forward's key reads


def _inputs_key(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """A cheap stand-in for the forward's input values: each tensor's shape, dtype and up to
    16 evenly spaced elements. A checkpoint's recompute gives the trunk the values of its first
    run again; two checkpoints from one RNG state (nothing drawn on this side between them)
    give it other values, so each still finds its own seeds."""
    key: list[Any] = []
    for tensor in tensors:
        key += [tuple(tensor.shape), tensor.dtype]
        count = tensor.numel()
        if count and tensor.layout == torch.strided and tensor.device.type != "meta":
            taken = min(count, _SAMPLED)  # whole-number indices: no float rounding past the end
            flat = torch.arange(taken) * (count - 1) // max(taken - 1, 1)
            sample = (
                tensor.detach()[torch.unravel_index(flat, tensor.shape)]
                if tensor.dim()
                else tensor.detach()
            )
            key.append(sample.reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return tuple(key)


class RemoteModule(nn.Module):
    """Runs the trunk served at ``address``; ``loss.backward()`` reaches it like any layer.

    It holds no parameters (the trunk's live on the server; train them with
    :class:`~remote_autograd.RemoteOptimizer`), so an optimizer over a whole ``nn.Sequential``
    holding it covers exactly the local parts. ``train()``/``eval()`` select the trunk's mode
    per call. Outputs come back on the device of the first input tensor. ``state_dict()`` and
    ``load_state_dict()`` (its own or a parent's) carry the trunk's trainable parameters and
    persistent buffers, fetched from and sent to the server (trunk_state.py).
    ``requires_grad_(False)`` freezes the trunk for this client.
    """

    def __init__(
        self,
        address: str,
        *,
        options: ClientOptions | None = None,
        device: torch.device | str | None = None,
        micro_batches: int | None = None,
    ) -> None:
        super().__init__()
        if micro_batches is not None and (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches  # None: ClientOptions.micro_batches (see chunks.py)
        self.address = address
        self.client = TrunkClient(address, options)
        self.device = torch.device(device) if device is not None else None
        # Not a parameter: only there to make autograd call backward (see function.py). Its
        # gradient is the trunk's inf check for GradScaler: 1, times what unscale_ multiplied
        # it by, inf after a backward whose trunk gradients were not finite (see optim.py).
        # On the CPU whatever device a `with torch.device(...)` block makes the default: a
        # model built under one (meta, then to_empty) never moves it, and its backward's
        # gradient (function.py) is a CPU tensor.
        self._new_stand_in()
        self._cast_dtype: torch.dtype | None = None  # the last model.to(dtype)/half()/double()
        # Seeds of recent training forwards by the client's RNG state then (see _rng_state).
        self._seeds: OrderedDict[tuple[Any, ...], tuple[int, list[int]]] = OrderedDict()
        self.trunk_requires_grad = True  # requires_grad_(False) freezes the trunk (below)

    @property
    def options(self) -> ClientOptions:
        return self.client.options

    # Dynamo must not trace into the RPC (threads, finalizers, sockets): torch.compile of a
    # model holding this module compiles the local parts and breaks the graph here.
    @torch.compiler.disable(
        reason="a RemoteModule's forward is a call to the trunk server, which Dynamo cannot "
        "trace: with fullgraph=True, compile the parts before and after it on their own "
        "(docs/habits.md, torch.compile)"
    )
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._cast_dtype is not None:
            self._check_cast()
        template, tensors = flatten((list(args), kwargs))
        rng = (_rng_state(), _inputs_key(tensors)) if self.training else None
        again = rng is not None and torch._C._current_graph_task_id() != -1  # a recompute
        # Read, not taken: a retain_graph backward runs the recompute again from the same state.
        kept = self._seeds.get(rng) if rng is not None and again else None
        seeds = kept[1] if kept else None
        if again and not seeds:
            warnings.warn(_RECOMPUTED, stacklevel=2)
        if any(t.device.type == "meta" for t in tensors):
            raise ValueError(
                "a RemoteModule computes on its server: meta tensors hold no data to send (to "
                "infer shapes, run the trunk itself on the meta device)"
            )
        grad_on = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        keep = grad_on and (
            any(t.requires_grad for t in tensors)
            or (self.trunk_requires_grad and self.client.info().trainable_numel > 0)
        )
        device = self.device or (tensors[0].device if tensors else _CPU)
        kwargs = {
            "keep_context": keep,
            "training": self.training,
            "device": device,
            "autocast": _autocast_dtype(tensors[0].device.type if tensors else "cpu"),
            # Frozen at the forward stays frozen, as a local layer's parameters that took no
            # part in the graph; one frozen by the backward counts too (see _trunk_frozen).
            "frozen": functools.partial(_frozen, not self.trunk_requires_grad, self),
        }
        slices = self.micro_batches or self.client.options.micro_batches
        if slices > 1 and self.training and self.batch_statistics():
            warnings.warn(
                f"micro_batches={slices}: the trunk at {self.address} holds "
                f"{self.batch_statistics()}, which a training forward runs over the batch: "
                "each slice is normalised by its own statistics and moves the running ones, "
                "so the outputs are not the whole batch's (docs/pipeline.md, micro_batches)",
                stacklevel=2,
            )
        call: RemoteCall | ChunkedCall = (
            ChunkedCall(self.client, template, micro_batches=slices, **kwargs)
            if slices > 1
            else RemoteCall(self.client, template, **kwargs)
        )
        call.given_seeds = seeds or None  # the first run's, for a recompute
        dummy = self._dummy if keep else self._dummy.detach()
        outputs = remote_apply(call, dummy, tensors)
        # Servers before protocol 2 seed kept forwards only (not a no_grad training forward).
        if rng is not None and not again and (keep or self.client.info().protocol_version > 1):
            self._remember_seeds(rng, call.seeds())
        return unflatten(call.output_template, outputs)

    def batch_statistics(self) -> str:
        """The class of a trunk module that a training forward runs over the batch
        (BatchNorm), as the server says; "" if none (or a server too old to say)."""
        return self.client.info().batch_statistics

    def _remember_seeds(self, rng: tuple[Any, ...], seeds: list[int]) -> None:
        # Two forwards from one RNG state with no backward between (nothing drawn on this
        # side): a recompute could not tell whose seeds it needs. One before a backward is
        # another step's, replaced.
        events = self.client.grad_events
        kept = self._seeds.get(rng)
        if kept is not None and kept[0] == events and kept[1] != seeds:
            seeds = _AMBIGUOUS
        self._seeds[rng] = (events, seeds)
        self._seeds.move_to_end(rng)
        while len(self._seeds) > _SEEDS_KEPT:
            self._seeds.popitem(last=False)

    def _apply(self, fn: Any, recurse: bool = True) -> RemoteModule:
        # nn.Module.to()/half()/double()/float() land here. A move to another device concerns
        # only where outputs go (they follow the inputs); a cast cannot reach the trunk's
        # weights (they live on the server, shared by every session). Refusing here would leave
        # the parts before this module cast and the rest not, so the cast is remembered and
        # the next forward says what to do unless the trunk is served in that dtype.
        try:
            probes = fn(torch.zeros(1)), fn(torch.zeros(1, dtype=torch.float64))
        except (RuntimeError, AssertionError):  # .cuda() on a machine without one, etc.
            probes = None
        if probes is not None and (probes[0].dtype, probes[1].dtype) != _NO_CAST:
            # .float() is the uncast model (float32 is what a model holds unless cast), also
            # beside a trunk served in another dtype, which casts float32 inputs as before.
            cast_back = probes[0].dtype == probes[1].dtype == torch.float32
            self._cast_dtype = None if cast_back else probes[0].dtype
        return super()._apply(fn, recurse)

    def _check_cast(self) -> None:
        wanted = self._cast_dtype
        served = self.client.info().dtype
        # A trunk without floating parameters computes in its inputs' dtype, as a local one
        # that a cast leaves unchanged.
        if wanted is None or not served or str(wanted)[6:] == served:
            return
        name = str(wanted)[6:]
        raise TypeError(
            f"this model was cast to {wanted}, but the remote trunk at {self.address} is served "
            f"in {served or 'no floating dtype'}: its weights live on the server, so a cast "
            f"cannot reach them. Serve it in {wanted} (ServerOptions(dtype={name!r}), "
            f"remote-autograd serve --dtype {name}), use torch.autocast for mixed precision, "
            f"or cast the model back (.to({served and 'torch.' + served}))"
        )

    def remote_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's trainable parameters and persistent buffers, fetched from the server
        (what ``state_dict()`` holds of the trunk, without this module's prefix)."""
        state: dict[str, torch.Tensor] = {}
        save_trunk_state(self.client, state, "")
        return state

    def load_remote_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trunk's trainable parameters and/or buffers on the server (any subset
        of ``remote_state_dict()``; an unknown name or shape is refused, nothing loaded)."""
        self.client.load_state(split_trunk_state(self.client, dict(state)))

    def _trunk_frozen(self) -> bool:
        return not self.trunk_requires_grad

    def requires_grad_(self, requires_grad: bool = True) -> RemoteModule:
        """``requires_grad_(False)`` freezes the trunk for this client, as it would a local
        layer: gradients still flow through it to the inputs, but the server accumulates none
        for its parameters in this session, so the trunk's optimizer steps change nothing.
        A parent's ``requires_grad_()`` does not reach it (it walks parameters, and this
        module holds none): call it on the RemoteModule itself."""
        self.trunk_requires_grad = bool(requires_grad)
        return self

    def _new_stand_in(self) -> None:
        # Ordinary tensors even when made under inference_mode (a module built for inference
        # and trained later): an inference tensor has no autograd edge to carry a backward.
        with torch.inference_mode(False):
            self._dummy = torch.zeros(1, device=_CPU, requires_grad=True)
        self.reset_flag()

    def reset_flag(self) -> torch.Tensor:
        """The stand-in's gradient as no backward has touched it (1: nothing to unscale)."""
        with torch.inference_mode(False):
            self._dummy.grad = flag = torch.ones(1, device=_CPU)
        return flag

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear this session's trunk gradients, as ``RemoteOptimizer.zero_grad()`` does (sent
        with the next Backward, GradNorm or Step). A parent's ``zero_grad()`` does not reach
        it (it walks parameters, and this module holds none): call the trunk optimizer's
        ``zero_grad()``, or this one."""
        self.client.zero_grad_later(set_to_none)
        self.reset_flag()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_trunk_state(self.client, destination, prefix)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Not super()'s: it would call every trunk key unexpected (this module holds none).
        # PyTorch passes strict=True to every module and applies the caller's strict itself.
        load_trunk_state(self.client, state_dict, prefix, missing_keys, unexpected_keys, error_msgs)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's LoRA adapter (on a ``--adapters per-client`` server: this identity's
        own) under peft's saved names (``...lora_A.weight``), ready for peft's
        ``set_peft_model_state_dict`` on a local copy of the trunk (docs/adapters.md)."""
        from .adapters import to_peft_names

        state = to_peft_names(self.remote_state_dict())
        if not state:
            raise ValueError(
                f"the trunk at {self.address} has no LoRA adapter (no trainable lora_* "
                "parameter): serve it with LoRA, or use remote_state_dict()"
            )
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Upload an adapter (peft's saved names, as :meth:`adapter_state_dict` gives) to
        resume from it; every tensor is checked against the server's before any is loaded. An
        adapter is whole: one missing some of the trunk's LoRA weights (trained with fewer
        target modules) is refused, as it would leave those layers as they were
        (``load_remote_state_dict`` loads a part on purpose)."""
        from .adapters import from_peft_names

        named = from_peft_names(dict(state))
        lora = {n for n in self.client.info().trainable_parameters if "lora_" in n}
        missing = sorted(lora - set(named))
        if missing:
            raise ValueError(
                f"the adapter lacks {len(missing)} of the trunk's LoRA weights "
                f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}): it was "
                "trained with other target modules; upload a whole adapter, or load the part "
                "with load_remote_state_dict()"
            )
        self.load_remote_state_dict(named)

    def save_adapter(self, path: str) -> None:
        """Download the adapter into a safetensors file (peft's saved names)."""
        from safetensors.torch import save_file

        state = {n: t.detach().cpu().contiguous() for n, t in self.adapter_state_dict().items()}
        save_file(state, path, metadata={"format": "pt"})

    def load_adapter(self, path: str) -> None:
        """Upload the adapter saved at ``path`` (safetensors, peft's saved names)."""
        from safetensors.torch import load_file

        self.load_adapter_state_dict(load_file(path))

    def remote_info(self) -> dict[str, Any]:
        """What the server says about itself: version, limits, device, trainable parameters,
        persistent buffers, the trunk's fingerprint."""
        info = self.client.info()
        return {
            "server_version": info.server_version,
            "device": info.device,
            "dtype": info.dtype,
            "module": info.module_repr,
            "trainable_parameters": list(info.trainable_parameters),
            "trainable_numel": info.trainable_numel,
            "buffers": list(info.buffers),
            "fingerprint": info.fingerprint,  # see remote_autograd.trunk_fingerprint
            "max_payload_bytes": info.max_payload_bytes,
            "batch_statistics": info.batch_statistics,  # see batch_statistics()
        }

    def close(self) -> None:
        """Release the server-side session's contexts and close the channel."""
        self.client.close()

    def __getstate__(self) -> dict[str, Any]:
        # pickle, copy.deepcopy, torch.save(model), AveragedModel: the address and options
        # travel, the connection does not; a copy opens a new session on the same server.
        # (Local only: nothing pickled is ever sent over the network.)
        state = super().__getstate__()  # type: ignore[misc]
        state = dict(state)
        state["client"] = self.client.options
        # A copy continues this run (EMA, AveragedModel): the trunk's steps so far are its own,
        # so it is not warned as a fresh run that finds a stepped trunk (SteppedTrunkWarning).
        state["run_started"] = self.client._started
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        options = state.pop("client")
        started = state.pop("run_started", False)
        super().__setstate__(state)
        self.client = TrunkClient(self.address, options)
        self.client._started = started
        self._new_stand_in()  # on the CPU: a load's map_location may have moved the saved one

    def extra_repr(self) -> str:
        return f"{self.address!r}"

    def __enter__(self) -> RemoteModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _frozen(at_forward: bool, module: RemoteModule) -> bool:
    return at_forward or module._trunk_frozen()
