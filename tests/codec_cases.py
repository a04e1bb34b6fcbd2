"""Tensors for checking that a frame is the same bytes wherever it was encoded (CPU or GPU):
values every machine and device makes alike, in every shape and layout the codec meets.
Shared by tests/test_codec.py (the CPU's frames) and tests/test_cuda.py (the GPU's)."""

from __future__ import annotations

import math

import torch

from remote_autograd import encode

SHAPES = [(), (0,), (1,), (3, 4), (2, 0, 5), (2, 3, 4, 5), (70_000,)]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_POWERS = torch.tensor([2.0**k for k in range(-10, 6)], dtype=torch.float64)


def exact_values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Mixed signs and magnitudes (|x| < 32032) from integer arithmetic and exact powers of
    two only: no generator or libm, so every machine and device makes the same values."""
    i = torch.arange(math.prod(shape), dtype=torch.int64) + seed * 7777
    mantissa = (i * 7919 % 2003 - 1001).to(torch.float64)
    return (mantissa * _POWERS[i * 13 % len(_POWERS)]).reshape(shape).to(dtype)


def codec_cases(dtype: torch.dtype, device: str = "cpu") -> list[tuple[str, torch.Tensor, str]]:
    """(id, tensor on ``device``, compression): every shape, non-contiguous views (made on the
    device), special values, and a compressible tensor (a power of two repeated) for LZ4."""
    base = exact_values(dtype, (6, 300), seed=1).to(device)
    views = {
        "t": base.t(),
        "step3": base[:, ::3],
        "slice-T": base[1:4, 2:].T,
        "expand": base[0].expand(6, 300),
        "one-strided": base[1:2, 3],
        "one-2d": base[2:3, 4:5],
    }
    cases = [(f"shape{list(s)}", exact_values(dtype, s).to(device), "none") for s in SHAPES]
    cases += [(name, view, "none") for name, view in views.items()]
    special = torch.tensor([1.5, float("nan"), -2.0, float("inf"), -0.0], dtype=dtype)
    cases.append(("nan-inf", special.to(device), "none"))
    cases.append(("lz4", torch.full((20_000,), 0.25, dtype=dtype, device=device), "auto"))
    return cases


def case_frame(tensor: torch.Tensor, compression: str, quantization: str) -> bytes:
    """A frame of two tensors (the second a slice of the first) in a dict and a tuple."""
    value = {"x": tensor, "pair": (tensor.reshape(-1)[:3],)}
    return encode(value, compression=compression, quantization=quantization)
