"""Tensors between host and device memory around the wire: the host copies a frame is encoded
from, and decoded tensors moved to the device that wants them.

The wire format (codec.py) reads and writes host memory; it quantizes and dequantizes on the
tensors' device and calls this module to cross: pinned staging, non-blocking copies, and
holding a copy's source until the copy has run.
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["reap_copies", "to_device", "to_host"]


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of the tensors; CUDA tensors go through pinned buffers, one sync per device."""
    out = []
    devices: set[torch.device] = set()
    for tensor in tensors:
        if tensor.device.type == "cpu":
            out.append(tensor.detach())
        else:
            host = torch.empty(
                tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda"
            )
            host.copy_(tensor.detach(), non_blocking=True)
            out.append(host)
            devices.add(tensor.device)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return out


def to_device(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A decoded tensor on ``device`` (then cast to ``dtype`` there): where the trunk or the
    caller wants it.

    A CPU tensor goes to CUDA without blocking the host. It may alias a pinned receive buffer
    (``frames._BufferPool``), which the pool refills as soon as nothing else references it,
    while the copy may still be reading it: the source is held until the copy has run.
    """
    moved = tensor.to(device, non_blocking=True)
    if tensor.device.type == "cpu" and device.type == "cuda":
        _COPIES.hold(tensor.detach(), device)  # the memory, not the autograd graph
    # Cast after the copy: the cast then runs on the device, and the copy reads the pinned
    # source itself rather than a pageable cast of it.
    return moved if dtype is None else moved.to(dtype)


def reap_copies() -> None:
    """Let go of the sources of host-to-device copies that have completed."""
    _COPIES.reap()


class _CopiesInFlight:
    """Host tensors that asynchronous host-to-device copies may still be reading, each held
    until an event recorded on the copy's stream after it has completed."""

    def __init__(self) -> None:
        self._held: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        self._lock = threading.Lock()

    def hold(self, source: torch.Tensor, device: torch.device) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        with self._lock:
            self._held = [(e, t) for e, t in self._held if not e.query()]
            self._held.append((event, source))

    def after_fork_in_child(self) -> None:
        # The parent's CUDA events mean nothing here, and its lock may have been held.
        self._held = []
        self._lock = threading.Lock()

    def reap(self) -> None:
        with self._lock:
            if self._held:
                self._held = [(e, t) for e, t in self._held if not e.query()]


_COPIES = _CopiesInFlight()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_COPIES.after_fork_in_child)
