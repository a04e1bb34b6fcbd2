"""RemoteModule: an nn.Module that stands for a trunk running on a server."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import codec
from .client import TrunkClient
from .function import RemoteCall, remote_apply
from .options import ClientOptions
from .tree import flatten, unflatten

__all__ = ["RemoteModule"]

_CPU = torch.device("cpu")
_NO_CAST = (torch.float32, torch.float64)  # what the probes of a cast-free _apply come back as


def _autocast_dtype(device_type: str) -> str:
    """The dtype name of the torch.autocast region the caller is in ("" = none): the trunk
    runs under autocast with it on the server, as it would here."""
    if not torch.is_autocast_enabled(device_type):
        return ""
    return codec.dtype_name(torch.get_autocast_dtype(device_type))


class RemoteModule(nn.Module):
    """Runs the trunk served at ``address``; ``loss.backward()`` reaches it like any layer.

    It holds no parameters (the trunk's live on the server; train them with
    :class:`~remote_autograd.RemoteOptimizer`), so an optimizer over a whole ``nn.Sequential``
    holding it covers exactly the local parts. ``train()``/``eval()`` select the trunk's mode
    per call. Outputs come back on the device of the first input tensor.
    """

    def __init__(
        self,
        address: str,
        *,
        options: ClientOptions | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.address = address
        self.client = TrunkClient(address, options)
        self.device = torch.device(device) if device is not None else None
        # Not a parameter: only there to make autograd call backward (see function.py). Its
        # gradient is the trunk's inf check for GradScaler: 1, times what unscale_ multiplied
        # it by, NaN after a backward whose trunk gradients were not finite (see optim.py).
        self._dummy = torch.zeros(1, requires_grad=True)
        self._dummy.grad = torch.ones(1)
        self._cast_dtype: torch.dtype | None = None  # the last model.to(dtype)/half()/double()

    @property
    def options(self) -> ClientOptions:
        return self.client.options

    # Dynamo must not trace into the RPC (threads, finalizers, sockets): torch.compile of a
    # model holding this module compiles the local parts and breaks the graph here.
    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._cast_dtype is not None:
            self._check_cast()
        template, tensors = flatten((list(args), kwargs))
        grad_on = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        keep = grad_on and (
            any(t.requires_grad for t in tensors) or self.client.info().trainable_numel > 0
        )
        device = self.device or (tensors[0].device if tensors else _CPU)
        call = RemoteCall(
            self.client,
            template,
            keep_context=keep,
            training=self.training,
            device=device,
            autocast=_autocast_dtype(tensors[0].device.type if tensors else "cpu"),
        )
        dummy = self._dummy if keep else self._dummy.detach()
        outputs = remote_apply(call, dummy, tensors)
        return unflatten(call.output_template, outputs)

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
            self._cast_dtype = probes[0].dtype
        return super()._apply(fn, recurse)

    def _check_cast(self) -> None:
        wanted = self._cast_dtype
        served = self.client.info().dtype
        if wanted is None or str(wanted)[6:] == served:
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
        """The trunk's trainable parameters, fetched from the server (for checkpoints)."""
        return self.client.get_state(parameters=True, optimizer=False)["parameters"]

    def load_remote_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trunk's trainable parameters on the server."""
        self.client.load_state({"parameters": dict(state), "optimizer": None, "step": None})

    def remote_info(self) -> dict[str, Any]:
        """What the server says about itself: version, limits, device, trainable parameters."""
        info = self.client.info()
        return {
            "server_version": info.server_version,
            "device": info.device,
            "dtype": info.dtype,
            "module": info.module_repr,
            "trainable_parameters": list(info.trainable_parameters),
            "trainable_numel": info.trainable_numel,
            "max_payload_bytes": info.max_payload_bytes,
        }

    def close(self) -> None:
        """Release the server-side session's contexts and close the channel."""
        self.client.close()

    def extra_repr(self) -> str:
        return f"{self.address!r}"

    def __enter__(self) -> RemoteModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
