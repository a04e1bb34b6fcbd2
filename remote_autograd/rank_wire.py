"""What the ranks of a distributed trunk (distributed.py) say to each other besides the
trunk's own collectives: commands and replies as codec frames (msgpack and raw tensor bytes,
the protocol's own format, never pickle), and the small all-reduces of the engine's checks.
Both run over one gloo group, so they work the same beside NCCL."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .codec import Decoder, Encoder
from .options import Limits
from .ranks import Ranks

__all__ = ["GroupRanks", "RankWire"]

# Frames between our own ranks: trusted, so only generous sanity limits.
_INTERNAL_LIMITS = Limits(
    max_payload_bytes=1 << 40,
    max_tensor_bytes=1 << 40,
    max_tensor_elements=1 << 40,
    max_tensors=1 << 20,
    max_header_bytes=1 << 30,
)


class RankWire:
    """Frames between rank 0 and the others, point to point."""

    # A frame goes as one message of HEAD bytes (its length, then its start) and, when longer,
    # a second with the rest: a small command costs one message, not a length and a payload.
    HEAD = 8192

    def __init__(self, group: Any) -> None:
        self.group = group
        self.encoder = Encoder(compression="none")
        self.decoder = Decoder(limits=_INTERNAL_LIMITS)

    def send(self, value: Any, dst: int) -> None:
        data = self.encoder.encode(value)
        head = bytearray(self.HEAD)
        head[:8] = len(data).to_bytes(8, "little")
        first = data[: self.HEAD - 8]
        head[8 : 8 + len(first)] = first
        dist.send(torch.frombuffer(head, dtype=torch.uint8), dst, group=self.group)
        if len(data) > len(first):
            rest = bytearray(data[len(first) :])
            dist.send(torch.frombuffer(rest, dtype=torch.uint8), dst, group=self.group)

    def recv(self, src: int) -> Any:
        head = torch.empty(self.HEAD, dtype=torch.uint8)
        dist.recv(head, src, group=self.group)
        raw = head.numpy()
        size = int.from_bytes(raw[:8].tobytes(), "little")
        if size <= self.HEAD - 8:
            return self.decoder.decode(raw[8 : 8 + size])
        rest = torch.empty(size - (self.HEAD - 8), dtype=torch.uint8)
        dist.recv(rest, src, group=self.group)
        return self.decoder.decode(raw[8:].tobytes() + rest.numpy().tobytes())


class GroupRanks(Ranks):
    """The engine's verdicts over every rank of ``group``: each call is one small all-reduce,
    which every rank makes at the same point of the same engine operation. ``sharded``: each
    rank holds a shard of every tensor (fsdp), so norms combine; else each holds all of it
    (ddp), and a norm is the same on every rank."""

    def __init__(self, group: Any, *, sharded: bool) -> None:
        self.group = group
        self.sharded = sharded

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
        powered = self._all_reduce([v**norm_type for v in values], dist.ReduceOp.SUM)
        return [v ** (1.0 / norm_type) for v in powered]

    def _min(self, values: Sequence[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MIN)
