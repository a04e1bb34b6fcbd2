"""The wire codecs of floating tensors, registered in one place: ``none`` and the lossy
``bf16``, ``fp16`` and ``int8``.

A wire codec turns a tensor into the bytes a frame carries (plus a few meta fields) and back.
Adding one is one class and one line in :data:`WIRE_CODECS`; the frame format (codec.py) asks
this registry for every tensor it sends or receives and knows nothing of the codecs themselves.

Wire forms (``n`` is the meta's byte count before compression)::

    none   the tensor's own bytes                           n = numel * itemsize
    bf16   bfloat16 values                                   n = numel * 2
    fp16   float16 of x * scale (scale: a power of two)      n = numel * 2, meta "scale"
    int8   per block of ``block`` elements: float32 scales,  n = blocks * 4 + numel, meta "block"
           then int8 round(x / scale), scale = absmax / 127

Every codec is plain torch arithmetic on the tensor's own device: a CUDA tensor is quantized
(and checked for finiteness) on its GPU before its smaller wire form is copied to the host, and
a CUDA destination dequantizes there (codec.py). The GPU's wire bytes are those the CPU writes
for the same values (tests/test_cuda.py), except that bf16 may spell NaN with another payload.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from .errors import CodecError

__all__ = ["QUANTIZATIONS", "WIRE_CODECS", "WireCodec"]

_CHUNK = 1 << 18  # elements quantized at a time on the CPU: the temporaries stay in cache
# On a GPU a piece costs a few kernel launches, not cache misses: large pieces, few launches.
_DEVICE_CHUNK = 1 << 24
_FP16_TARGET = 2.0**14  # scale the largest magnitude to about this: headroom below 65504
_INT8_BLOCK = 256
# The lossy codecs' values pass through float32 (int8's scales, fp16's dequantization,
# bfloat16's exponent range): a tensor whose largest magnitude lies outside float32's normal
# range would come back as inf, NaN or zeros, so it travels as is, like one holding NaN or inf.
_F32_TINY, _F32_HUGE = 2.0**-126, 2.0**127


class WireCodec(Protocol):
    """How one wire form is written and read back."""

    def wire_nbytes(self, numel: int, itemsize: int, meta: dict[str, Any]) -> int:
        """Bytes of the wire form, checking the meta fields it needs (raise CodecError)."""

    def quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """The wire form of a non-empty floating tensor and its extra meta fields, or
        ``(tensor, None)`` where the codec would not be faithful (it then travels as is)."""

    def dequantize(
        self, data: torch.Tensor, meta: dict[str, Any], dtype: torch.dtype, numel: int
    ) -> torch.Tensor:
        """1-D ``numel`` values of ``dtype`` from the wire bytes ``data`` (uint8)."""


class _Raw:
    def wire_nbytes(self, numel: int, itemsize: int, meta: dict[str, Any]) -> int:
        return numel * itemsize

    def quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        return tensor, None

    def dequantize(self, data, meta, dtype, numel):
        return data.view(dtype)


class _BFloat16:
    def wire_nbytes(self, numel: int, itemsize: int, meta: dict[str, Any]) -> int:
        return numel * 2

    def quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if tensor.element_size() <= 2:  # no byte to gain; float16's 65504 would round to inf
            return tensor, None
        # float64 may hold what bfloat16 cannot (a cast, not a check: NaN and inf cast as is)
        if tensor.dtype == torch.float64 and not _float32_range(_amax(tensor), nonfinite=True):
            return tensor, None
        return tensor.to(torch.bfloat16), {}

    def dequantize(self, data, meta, dtype, numel):
        return data.view(torch.bfloat16).to(dtype)


class _Float16:
    def wire_nbytes(self, numel: int, itemsize: int, meta: dict[str, Any]) -> int:
        scale = meta.get("scale")
        if type(scale) is not float or not math.isfinite(scale) or scale <= 0:
            raise CodecError(f"fp16 scale must be a positive finite float, got {scale!r}")
        return numel * 2

    def quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if tensor.element_size() <= 2:  # no byte to gain, and float16's subnormals to lose
            return tensor, None
        amax = _amax(tensor)
        if not math.isfinite(amax):
            return tensor, None  # non-finite values travel losslessly; the receiver decides
        flat = tensor.detach().reshape(-1)
        numel = flat.numel()
        # A power-of-two scale is exact: it moves the exponent range without rounding, so
        # small gradients are not flushed to zero by fp16's narrow range.
        exponent = math.floor(math.log2(_FP16_TARGET) - math.log2(amax)) if amax > 0 else 0
        if not _float32_range(amax) or not -126 <= exponent <= 126:  # scale and 1/scale too
            return tensor, None
        scale = 2.0**exponent
        out = torch.empty(numel, dtype=torch.float16, device=flat.device)
        chunk = _chunk(flat)
        work = torch.empty(min(numel, chunk), dtype=flat.dtype, device=flat.device)
        for start in range(0, numel, chunk):  # cache-sized pieces: no full-size temporary
            piece = flat[start : start + chunk]
            torch.mul(piece, scale, out=work[: piece.numel()])
            out[start : start + piece.numel()].copy_(work[: piece.numel()])
        return out, {"scale": float(scale)}

    def dequantize(self, data, meta, dtype, numel):
        halves = data.view(torch.float16)
        out = torch.empty(numel, dtype=dtype, device=data.device)
        inverse = 1.0 / meta["scale"]  # exact: a power of two
        chunk = _chunk(halves)
        for start in range(0, numel, chunk):  # float32 in cache-sized pieces, straight into out
            piece = halves[start : start + chunk]
            out[start : start + piece.numel()].copy_(piece.to(torch.float32).mul_(inverse))
        return out


class _Int8:
    def wire_nbytes(self, numel: int, itemsize: int, meta: dict[str, Any]) -> int:
        block = meta.get("block")
        if type(block) is not int or not 1 <= block <= 1 << 20:
            raise CodecError(f"int8 block must be an int in [1, 2**20], got {block!r}")
        return -(-numel // block) * 4 + numel

    def quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any] | None]:
        amax = _amax(tensor)
        if not math.isfinite(amax) or not _float32_range(amax):
            return tensor, None  # non-finite values travel losslessly; the receiver decides
        flat = tensor.detach().reshape(-1)
        numel = flat.numel()
        blocks = -(-numel // _INT8_BLOCK)
        full = numel // _INT8_BLOCK
        payload = torch.empty(blocks * 4 + numel, dtype=torch.uint8, device=flat.device)
        scales = payload[: blocks * 4].view(torch.float32)
        q8 = payload[blocks * 4 :].view(torch.int8)
        rows = flat[: full * _INT8_BLOCK].view(full, _INT8_BLOCK)
        parts = [(rows, q8[: full * _INT8_BLOCK].view(full, _INT8_BLOCK), scales[:full])]
        if full < blocks:  # the last, partial block
            parts.append(
                (
                    flat[full * _INT8_BLOCK :].view(1, -1),
                    q8[full * _INT8_BLOCK :].view(1, -1),
                    scales[full:],
                )
            )
        step = max(1, _chunk(flat) // _INT8_BLOCK)
        # On CUDA, dividing by a Python number multiplies by its reciprocal (one bit less
        # exact); a 0-dim tensor on the device divides as the CPU does, for the same bytes.
        levels: float | torch.Tensor = 127.0
        if not flat.is_cpu:
            levels = torch.full((), 127.0, device=flat.device)
        for values, out, block_scales in parts:
            for row in range(0, values.shape[0], step):  # cache-sized: temporaries stay hot
                piece = values[row : row + step].float()
                absmax = piece.abs().amax(dim=1)
                piece_scales = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
                block_scales[row : row + step].copy_(piece_scales)
                scaled = piece / piece_scales[:, None]  # a new chunk: the input is untouched
                out[row : row + step].copy_(scaled.round_().clamp_(-127, 127))
        return payload, {"block": _INT8_BLOCK}

    def dequantize(self, data, meta, dtype, numel):
        block = meta["block"]
        blocks = -(-numel // block)
        scales = data[: blocks * 4].view(torch.float32)
        q8 = data[blocks * 4 :].view(torch.int8)
        out = torch.empty(numel, dtype=dtype, device=data.device)
        full = numel // block
        rows, row_scales = q8[: full * block].view(full, block), scales[:full, None]
        into = out[: full * block].view(full, block)
        step = max(1, _chunk(q8) // block)
        # int8 * float32 is float32 arithmetic: done in cache-sized pieces (no float copy of
        # all the int8s at once) and written straight into out, in its dtype.
        for row in range(0, full, step):
            into[row : row + step].copy_(
                torch.mul(rows[row : row + step], row_scales[row : row + step])
            )
        if full < blocks:
            out[full * block :].copy_(torch.mul(q8[full * block :], scales[full]))
        return out


def _amax(tensor: torch.Tensor) -> float:
    """The largest magnitude (NaN if any value is NaN): the finiteness check and fp16's scale."""
    low, high = torch.aminmax(tensor)  # one pass, no |x| temporary
    if tensor.is_cpu:
        return max(-float(low), float(high))
    # On a GPU: one synchronisation, and only this one number crosses to the host.
    return float(torch.maximum(low.neg(), high))


def _float32_range(amax: float, nonfinite: bool = False) -> bool:
    """Whether a largest magnitude ``amax`` is 0 or within float32's normal range (or, with
    ``nonfinite``, NaN or inf, which the caller sends as they are)."""
    if not math.isfinite(amax):
        return nonfinite
    return amax == 0 or _F32_TINY <= amax < _F32_HUGE


def _chunk(flat: torch.Tensor) -> int:
    return _CHUNK if flat.is_cpu else _DEVICE_CHUNK


WIRE_CODECS: dict[str, WireCodec] = {
    "none": _Raw(),
    "bf16": _BFloat16(),
    "fp16": _Float16(),
    "int8": _Int8(),
}
QUANTIZATIONS = tuple(WIRE_CODECS)
