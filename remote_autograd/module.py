"""RemoteModule: an nn.Module that stands for a trunk running on a server."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .client import TrunkClient
from .function import RemoteCall, remote_apply
from .options import ClientOptions
from .tree import flatten, unflatten

__all__ = ["RemoteModule"]

_CPU = torch.device("cpu")


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
        # Not a parameter: only there to make autograd call backward (see function.py).
        self._dummy = torch.empty(0, requires_grad=True)

    @property
    def options(self) -> ClientOptions:
        return self.client.options

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        template, tensors = flatten((list(args), kwargs))
        grad_on = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        keep = grad_on and (
            any(t.requires_grad for t in tensors) or self.client.info().trainable_numel > 0
        )
        device = self.device or (tensors[0].device if tensors else _CPU)
        call = RemoteCall(
            self.client, template, keep_context=keep, training=self.training, device=device
        )
        dummy = self._dummy if keep else self._dummy.detach()
        outputs = remote_apply(call, dummy, tensors)
        return unflatten(call.output_template, outputs)

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
            "module": info.module_repr,
            "trainable_parameters": list(info.trainable_parameters),
            "trainable_numel": info.trainable_numel,
            "max_payload_bytes": info.max_payload_bytes,
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
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        options = state.pop("client")
        super().__setstate__(state)
        self.client = TrunkClient(self.address, options)

    def extra_repr(self) -> str:
        return f"{self.address!r}"

    def __enter__(self) -> RemoteModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
