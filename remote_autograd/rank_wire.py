"""What the ranks of a distributed trunk (distributed.py) say to each other besides the
trunk's own collectives: commands and replies as codec frames (msgpack and raw tensor bytes,
the protocol's own format, never pickle), and the small all-reduces of the engine's checks.
Both run over one gloo group, so they work the same beside NCCL."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .codec import Decoder, Encoder
from .options import Limits
from .ranks import Ranks

__all__ = ["GroupRanks", "RankWire"]


def internal_limits(limits: Limits) -> Limits:
    """Limits of the frames between our own ranks: trusted, so only generous sanity limits,
    never below what rank 0 accepts from clients (``limits``), or a call rank 0 took would
    be one another rank cannot read, and the group would stop."""
    return Limits(
        max_payload_bytes=max(1 << 40, limits.max_payload_bytes),
        max_tensor_bytes=max(1 << 40, limits.max_tensor_bytes),
        max_tensor_elements=max(1 << 40, limits.max_tensor_elements),
        max_tensors=max(1 << 20, limits.max_tensors),
        max_ndim=max(64, limits.max_ndim),  # a trunk's outputs too, which no client sent
        max_header_bytes=max(1 << 30, limits.max_header_bytes),
        max_decoded_bytes=max(1 << 40, limits.max_decoded_bytes),
        max_depth=max(64, limits.max_depth + 32),  # a call's values inside a command
    )


class RankWire:
    """Frames between rank 0 and the others, point to point, without copying tensor bytes.

    A frame goes as one message of HEAD bytes and, when it is longer, the rest in pieces: a
    small command is one message; a large one is its total size and piece sizes in the head,
    then each tensor's bytes sent from the tensor's own memory and received into one buffer
    that the decoded tensors alias."""

    HEAD = 8192
    _SMALL = 64 << 10  # pieces below this (msgpack headers) are joined into one message
    _WORD = struct.Struct("<Q")

    def __init__(self, group: Any, limits: Limits | None = None) -> None:
        self.group = group
        self.encoder = Encoder(compression="none")
        self.decoder = Decoder(limits=internal_limits(limits or Limits()))

    def send(self, value: Any, dst: int) -> None:
        buffers = self.encoder.encode_buffers(value)
        total = sum(len(b) for b in buffers)
        head = bytearray(self.HEAD)
        if total <= self.HEAD - 8:
            head[:8] = self._WORD.pack(total)
            head[8 : 8 + total] = b"".join(buffers)
            self._send(head, dst)
            return
        pieces = self._pieces(buffers)
        words = [total, len(pieces), *(len(p) for p in pieces)]
        if 8 * len(words) > self.HEAD:  # more tensors than the head can list: join them
            pieces, words = [bytearray(b"".join(buffers))], [total, 1, total]
        head[: 8 * len(words)] = b"".join(self._WORD.pack(w) for w in words)
        self._send(head, dst)
        for piece in pieces:
            self._send(piece, dst)

    def _pieces(self, buffers: list[bytes | memoryview]) -> list[Any]:
        pieces: list[Any] = []
        small = bytearray()
        for buffer in buffers:
            if len(buffer) < self._SMALL or memoryview(buffer).readonly:
                small += buffer
                continue
            if small:
                pieces.append(small)
                small = bytearray()
            pieces.append(buffer)
        if small:
            pieces.append(small)
        return pieces

    def _send(self, buffer: Any, dst: int) -> None:
        dist.send(torch.frombuffer(buffer, dtype=torch.uint8), dst, group=self.group)

    def recv(self, src: int) -> Any:
        head = torch.empty(self.HEAD, dtype=torch.uint8)
        dist.recv(head, src, group=self.group)
        raw: Any = head.numpy()  # a buffer; numpy's stubs do not say so
        (total,) = self._WORD.unpack_from(raw, 0)
        if total <= self.HEAD - 8:
            return self.decoder.decode(raw[8 : 8 + total])
        (count,) = self._WORD.unpack_from(raw, 8)
        buffer = torch.empty(total, dtype=torch.uint8)
        offset = 0
        for index in range(count):
            (size,) = self._WORD.unpack_from(raw, 16 + 8 * index)
            dist.recv(buffer[offset : offset + size], src, group=self.group)
            offset += size
        return self.decoder.decode(buffer.numpy())  # the tensors alias ``buffer``


class GroupRanks(Ranks):
    """The engine's verdicts over every rank of ``group``: each call is one small all-reduce,
    which every rank makes at the same point of the same engine operation. ``sharded``: each
    rank holds a shard of every tensor (fsdp), so norms combine; else each holds all of it
    (ddp), and a norm is the same on every rank."""

    def __init__(self, group: Any, *, sharded: bool) -> None:
        self.group = group
        self.sharded = sharded
        self.parts = not sharded

    def totals(self, values: Sequence[float]) -> list[float]:
        if not values or not self.parts:
            return [float(v) for v in values]
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def total_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.parts:
            return list(tensors)
        totals = [tensor.clone() for tensor in tensors]
        for total in totals:  # the gradients' own all-reduce (DistributedRunner.combine's)
            dist.all_reduce(total)
        return totals

    def _all_reduce(self, values: Sequence[float], op: Any) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return self._all_reduce([float(flag)], dist.ReduceOp.MAX)[0] > 0

    def max(self, values: Sequence[float]) -> list[float]:
        if not values:
            return []
        return self._all_reduce(super().max(values), dist.ReduceOp.MAX)

    def norms(self, values: Sequence[float], norm_type: float) -> list[float]:
        if not values or not self.sharded:
            return [float(v) for v in values]
        if math.isinf(norm_type):
            return self.max(values) if norm_type > 0 else self._min(values)
        if norm_type == 0:  # the count of non-zeros adds up
            return self._all_reduce(values, dist.ReduceOp.SUM)
        # In float64 tensors: an overflow is inf on every rank, not an error on one of them.
        powered = torch.tensor(list(values), dtype=torch.float64) ** norm_type
        dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=self.group)
        return (powered ** (1.0 / norm_type)).tolist()

    def _min(self, values: Sequence[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MIN)
