"""One codec frame <-> the protobuf Frame messages of a unary call or a stream."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from . import codec, memory
from ._proto import remote_autograd_pb2 as pb
from .errors import CodecError
from .options import Limits

__all__ = [
    "Received",
    "frame_messages",
    "receive",
    "receive_buffer",
    "receive_unary",
    "unary_message",
]


class Received:
    """A frame read off the wire: its header and the buffer holding it."""

    __slots__ = ("buffer", "header")

    def __init__(self, header: pb.Header, buffer: Any) -> None:
        self.header = header
        self.buffer = buffer

    def decode(self, decoder: codec.Decoder, *, device: torch.device | None = None) -> Any:
        buffer = self.buffer
        if isinstance(buffer, bytes) and len(buffer) >= _POOL_MIN_BYTES:
            # The decoder needs writable memory to alias; copy into a warm pooled buffer
            # rather than letting it fault in a fresh one.
            view = _POOL.take(len(buffer))
            view[:] = buffer
            buffer = view
        return decoder.decode(buffer, device=device)


_POOL_MIN_BYTES = 256 << 10  # below this, faulting in fresh memory costs next to nothing


class _BufferPool:
    """Receive buffers, reused once nothing decoded from them is alive.

    Touching fresh memory costs far more than refilling memory already mapped (64 MiB: ~38 ms
    to allocate and fault in, ~6 ms to refill, on the 2-core benchmark machine), and training
    receives frames of the same sizes every step. Decoded tensors alias their buffer (they hold
    a reference through the buffer protocol), so a buffer whose only reference is the pool's
    is free. The pool tracks at most ``max_buffers`` buffers and ``max_bytes`` bytes; a buffer
    dropped from it lives on with its tensors like any other.

    Once the process uses CUDA, new buffers are pinned (page-locked), so decoded tensors reach
    the GPU by an asynchronous DMA copy instead of a staged, blocking one. Such a copy may still
    be reading a buffer after its tensors are gone: ``memory.to_device`` holds their sources
    until the copy has run, so the buffer stays referenced, and busy, until then.
    """

    def __init__(self, max_buffers: int = 4, max_bytes: int = 512 << 20) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._buffers: list[Any] = []  # bytearrays, and numpy arrays over pinned tensors
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        if size < _POOL_MIN_BYTES or size > self.max_bytes:
            return memoryview(bytearray(size))
        pinned = _pin_receive_buffers()
        if pinned:
            memory.reap_copies()  # a buffer whose copies to the GPU have run is free again
        with self._lock:
            buffers = self._buffers
            for index in range(len(buffers)):
                buffer = buffers[index]  # not enumerate(): its reused tuple holds a reference
                # 3 references: the list, this loop's name, getrefcount's argument.
                if (
                    size <= len(buffer) <= 2 * size
                    and (not isinstance(buffer, bytearray)) == pinned
                    and sys.getrefcount(buffer) == 3
                ):
                    buffers.append(buffers.pop(index))  # most recently used last
                    return memoryview(buffer)[:size]
            fresh = self._pinned(size) if pinned else bytearray(size)
            buffers.append(fresh)
            while len(buffers) > self.max_buffers or sum(map(len, buffers)) > self.max_bytes:
                buffers.pop(0)  # least recently used; if in use, its tensors keep it alive
            return memoryview(fresh)[:size]

    def after_fork_in_child(self) -> None:
        # Another thread may have held the lock at the fork; the buffers may be the parent's
        # pinned memory, which a forked child cannot use (CUDA does not survive fork).
        self._lock = threading.Lock()
        self._buffers = []

    @staticmethod
    def _pinned(size: int) -> Any:
        # A numpy array: it exports the buffer protocol (a tensor does not) and keeps the
        # tensor, and with it the page-locked memory, alive.
        return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def _pin_receive_buffers() -> bool:
    # A process that has touched CUDA (a trunk or a caller on a GPU) copies what it receives
    # there; a CPU-only one never pays for page-locked memory.
    return torch.cuda.is_initialized()


_POOL = _BufferPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.after_fork_in_child)


def receive_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes for a frame about to arrive (pooled when large)."""
    return _POOL.take(size)


def unary_message(header: pb.Header, buffers: Sequence[memory.Buffer]) -> pb.Frame:
    payload = codec.join(buffers)
    header.payload_bytes = len(payload)
    return pb.Frame(header=header, payload=payload)


def frame_messages(
    header: pb.Header, buffers: Sequence[memory.Buffer], chunk_bytes: int
) -> Iterator[pb.Frame]:
    """The frame as a stream: the header rides on the first chunk."""
    header.payload_bytes = sum(len(b) for b in buffers)
    first = True
    for chunk in codec.iter_chunks(buffers, chunk_bytes):
        if first:
            yield pb.Frame(header=header, payload=chunk)
            first = False
        else:
            yield pb.Frame(payload=chunk)
    if first:
        yield pb.Frame(header=header)


def receive_unary(message: pb.Frame, limits: Limits) -> Received:
    if not message.HasField("header"):
        raise CodecError("call carries no header")
    if message.header.payload_bytes != len(message.payload):
        raise CodecError(
            f"header declares {message.header.payload_bytes} payload bytes, "
            f"message carries {len(message.payload)}"
        )
    return Received(message.header, message.payload)


def receive(messages: Iterable[pb.Frame], limits: Limits) -> Received:
    """Assemble a streamed frame into one buffer, allocated once after the size is checked."""
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None or not first.HasField("header"):
        raise CodecError("stream carries no header in its first message")
    total = first.header.payload_bytes
    codec.check_frame_size(total, limits)
    view = _POOL.take(total)
    filled = 0
    try:
        for message in _chain(first, iterator):
            size = len(message.payload)
            if filled + size > total:
                raise CodecError(f"stream carries more than the {total} bytes its header declares")
            view[filled : filled + size] = message.payload
            filled += size
        if filled != total:
            raise CodecError(
                f"stream ended after {filled} of the {total} bytes its header declares"
            )
    except BaseException:
        # gRPC keeps the error of a cancelled call, its traceback and so this frame, until its
        # cyclic collector runs: the buffer (up to max_payload_bytes) must not live on with it.
        view.release()
        raise
    return Received(first.header, view)


def _chain(first: pb.Frame, rest: Iterator[pb.Frame]) -> Iterator[pb.Frame]:
    yield first
    yield from rest
