"""Tensors between host and device memory around the wire: the host copies a frame is encoded
from, and decoded tensors moved to the device that wants them.

The wire format (codec.py) reads and writes host memory; it quantizes and dequantizes on the
tensors' device and calls this module to cross: pinned staging, non-blocking copies, and
holding a copy's source until the copy has run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["STAGE_BYTES", "Buffer", "DeviceBytes", "pieces", "reap_copies", "to_device", "to_host"]

STAGE_BYTES = 4 << 20  # a staged tensor crosses to the host this much at a time


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


class DeviceBytes:
    """The bytes of a tensor on a GPU, copied to the host a piece at a time as they are read.

    A frame buffer (``Encoder.encode_buffers(..., staged=True)``) for a large tensor on a GPU:
    its length is known at once, and ``pieces()`` copies ``STAGE_BYTES`` at a time into two
    pinned staging buffers, on a copy stream of the device's own, so that while the reader
    sends one piece (a socket, gRPC) the next one is already crossing to the host. Every
    reading copies again (a retried call sends it again). A piece is valid until the reader
    asks for the next: its staging buffer is then reused.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._flat = tensor  # one dimension of bytes (codec._flat_bytes)
        self._cuda = tensor.device.type == "cuda"
        # Whatever made the tensor was queued on the current stream: the copies wait for it.
        self._ready = _recorded(tensor.device) if self._cuda else None

    def __len__(self) -> int:
        return self._flat.numel()

    def pieces(self) -> Iterator[memoryview]:
        total, stage = len(self), STAGE_BYTES
        count = -(-total // stage)
        stages = [_host_bytes(min(total, stage), self._cuda) for _ in range(min(count, 2))]
        stream = _copy_stream(self._flat.device) if self._cuda else None
        if stream is not None:
            stream.wait_event(self._ready)
        done: list[Any] = [None, None]  # per staging buffer: when its copy has completed

        def start(index: int) -> None:
            begin = index * stage
            size = min(stage, total - begin)
            with _on(stream):
                stages[index % 2][:size].copy_(self._flat[begin : begin + size], non_blocking=True)
            done[index % 2] = _recorded(self._flat.device, stream) if stream is not None else None

        try:
            for index in range(min(count, 2)):
                start(index)
            for index in range(count):
                if done[index % 2] is not None:
                    done[index % 2].synchronize()
                array: Any = stages[index % 2].numpy()  # a buffer; numpy's stubs do not say so
                yield memoryview(array)[: min(stage, total - index * stage)]
                if index + 2 < count:  # the reader is done with this piece: reuse its buffer
                    start(index + 2)
        finally:
            # A reader that stops early (its socket broke) must not free memory a copy uses.
            for event in done:
                if event is not None:
                    event.synchronize()


Buffer = bytes | memoryview | DeviceBytes  # one of a frame's buffers (codec.encode_buffers)


def pieces(buffer: Buffer) -> Iterable[bytes | memoryview]:
    """A frame buffer as bytes-like pieces: itself, or a staged tensor's pieces."""
    return buffer.pieces() if isinstance(buffer, DeviceBytes) else (buffer,)


def _host_bytes(size: int, pinned: bool) -> torch.Tensor:
    # The caching host allocator reuses pinned blocks: staging costs no cudaHostAlloc per frame.
    return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)


def _recorded(device: torch.device, stream: Any = None) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream if stream is not None else torch.cuda.current_stream(device))
    return event


_COPY_STREAMS: dict[torch.device, Any] = {}


def _copy_stream(device: torch.device) -> Any:
    """The device's stream for staged copies: they must not queue behind the next call's
    kernels, which run on the current stream meanwhile."""
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS.setdefault(device, torch.cuda.Stream(device))
    return stream


def _on(stream: Any) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


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
        # The parent's CUDA events and streams mean nothing here, and its lock may have been
        # held.
        self._held = []
        self._lock = threading.Lock()
        _COPY_STREAMS.clear()

    def reap(self) -> None:
        with self._lock:
            if self._held:
                self._held = [(e, t) for e, t in self._held if not e.query()]


_COPIES = _CopiesInFlight()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_COPIES.after_fork_in_child)
