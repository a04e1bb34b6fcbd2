"""Tensors and plain values <-> one msgpack frame.

A frame is a msgpack stream that any msgpack reader can walk::

    uint32               length of the meta object that follows
    map  meta            {"v": 1, "tree": <bytes of the tree>, "tensors": [tensor meta, ...]}
    per tensor:          nil * k  (padding: aligns the tensor's bytes to 64)
                         bin32    the tensor's bytes on the wire

The tree is the call's value (tensors, None, bool, int, float, str, list, tuple, dict) packed
with tensors replaced by ExtType(1, index) and tuples by ExtType(2, packed list), so it
round-trips exactly. Where the receiver reads them (``encode_buffers(value, named=True)``),
named tuples and Hugging Face ``ModelOutput`` values are ExtType(3, packed [kind, module, name,
fields, values]), kind ``"tuple"`` or ``"output"``. The receiver uses the sender's class if it
has loaded ``module.name`` (looked up in that module's namespace: nothing is imported or
evaluated); else a named tuple of that name and fields, made once, or a plain dict for a
``ModelOutput``. A tensor meta is a map::

    dtype  "float32"...    the tensor's dtype (what the receiver gets back)
    shape  [2, 3]          the tensor's shape
    q      "none"          wire quantization: none | bf16 | fp16 | int8 (lossy, floating only)
    z      "none"          compression of the wire bytes: none | lz4
    n      24              bytes after quantization, before compression
    s      24              bytes on the wire (the bin32's length)
    scale  1024.0          fp16 only: power-of-two scale applied before the cast
    block  256             int8 only: elements per quantization block

The decoder checks every meta against :class:`~remote_autograd.options.Limits` and against the
frame's real length before it allocates anything, so a lying header or an LZ4 bomb is refused
with :class:`~remote_autograd.errors.CodecError`. Raw tensors are decoded without a copy
(``torch.frombuffer`` over the received buffer).

Tensors on a GPU are quantized there (quantize.py): only their wire form is copied to the host,
and the frame's bytes are those the CPU would write. Given a GPU ``device``, the decoder copies
quantized wire bytes there and dequantizes them there; raw tensors stay on the host.
"""

from __future__ import annotations

import collections
import math
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, overload

import lz4.block
import msgpack
import torch

from . import memory
from .errors import CodecError
from .memory import Buffer, DeviceBytes, pieces, to_device, to_host
from .options import Limits
from .quantize import QUANTIZATIONS, WIRE_CODECS
from .tree import flatten, is_model_output, is_named_tuple, model_output, unflatten

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "QUANTIZATIONS",
    "Decoder",
    "Encoder",
    "decode",
    "encode",
    "check_frame_size",
    "dtype_name",
    "iter_chunks",
    "join",
]

VERSION = 1
ALIGN = 64
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype a frame can carry ("float32"...)."""
    return _DTYPE_NAMES[dtype]


COMPRESSIONS = ("none", "lz4", "auto")

_EXT_TENSOR = 1
_EXT_TUPLE = 2
_EXT_NAMED = 3
_SAMPLE_BYTES = 64 << 10  # "auto" compression looks at this much of a tensor first
_MIN_COMPRESS_BYTES = 4 << 10  # below this LZ4 cannot pay for its own framing
_WORTH_IT = 0.9  # compress only when it saves at least 10%
_STAGED_DEVICES = ("cuda",)  # where encode_buffers(staged=True) leaves large tensors
_NIL = b"\xc0"
_U32 = struct.Struct(">I")


def _check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


class Encoder:
    """Encodes a value holding tensors into a frame. Reusable; not thread-safe.

    ``quantization`` applies to floating tensors only and is lossy; ``compression="auto"``
    compresses a tensor with LZ4 only when a sample of it shrinks by at least 10%. A tensor on
    a GPU is quantized there, and only its wire form is copied to the host.
    """

    def __init__(self, *, compression: str = "auto", quantization: str = "none") -> None:
        self.compression = _check_choice("compression", compression, COMPRESSIONS)
        self.quantization = _check_choice("quantization", quantization, QUANTIZATIONS)

    def encode(self, obj: Any) -> bytes:
        """The frame as one bytes object."""
        return join(self.encode_buffers(obj))

    @overload
    def encode_buffers(
        self, obj: Any, *, named: bool = ..., staged: Literal[False] = ...
    ) -> list[bytes | memoryview]: ...
    @overload
    def encode_buffers(self, obj: Any, *, named: bool = ..., staged: bool) -> list[Buffer]: ...
    def encode_buffers(self, obj: Any, *, named: bool = False, staged: bool = False) -> list[Any]:
        """The frame as a list of buffers, without copying raw tensor bytes. ``named``: named
        tuples and ModelOutputs keep their names (only for a peer that reads them). ``staged``:
        a large tensor on a GPU stays there as a :class:`~remote_autograd.memory.DeviceBytes`,
        copied to the host piece by piece while it is sent, for a reader that takes
        ``memory.pieces`` of each buffer."""
        tensors: list[torch.Tensor] = []
        tree = _TreePacker(tensors, named).packb(obj)
        # Quantize where each tensor lies, then copy: on a GPU the arithmetic runs there and
        # only the smaller wire form crosses to the host (one synchronisation per device).
        forms = [self._wire_form(tensor) for tensor in tensors]
        metas = [meta for meta, _ in forms]
        wires = [wire for _, wire in forms]
        stays = [self._staged(meta, wire) if staged else None for meta, wire in forms]
        moving = [wire for wire, stay in zip(wires, stays, strict=True) if stay is None]
        if not all(wire.is_cpu for wire in moving):
            crossed = iter(to_host(moving))
            wires = [
                w if s is not None else next(crossed) for w, s in zip(wires, stays, strict=True)
            ]
        datas = [
            stay if stay is not None else self._wire_bytes(meta, wire)
            for meta, wire, stay in zip(metas, wires, stays, strict=True)
        ]
        meta_bytes = msgpack.packb({"v": VERSION, "tree": tree, "tensors": metas})
        buffers: list[Buffer] = [b"\xce" + _U32.pack(len(meta_bytes)), meta_bytes]
        offset = 5 + len(meta_bytes)
        for data in datas:
            pad = (-(offset + 5)) % ALIGN
            buffers.append(_NIL * pad + b"\xc6" + _U32.pack(len(data)))
            buffers.append(data)
            offset += pad + 5 + len(data)
        return buffers

    def _wire_form(self, tensor: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """A tensor's meta so far and its wire form, on the tensor's device."""
        if tensor.layout != torch.strided:
            raise CodecError(
                f"cannot send a {tensor.layout} tensor: only dense (strided) tensors travel; "
                "send tensor.to_dense(), or its indices and values as two tensors"
            )
        name = _DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            raise CodecError(
                f"cannot send a tensor of dtype {tensor.dtype}; supported: {', '.join(DTYPES)}"
            )
        meta: dict[str, Any] = {"dtype": name, "shape": list(tensor.shape), "q": "none"}
        wire = tensor.detach()
        if self.quantization != "none" and wire.is_floating_point() and wire.numel():
            wire, extra = WIRE_CODECS[self.quantization].quantize(wire)
            if extra is not None:
                meta["q"] = self.quantization
                meta.update(extra)
        return meta, wire

    def _staged(self, meta: dict[str, Any], wire: torch.Tensor) -> DeviceBytes | None:
        """A wire form left on its device to be sent a piece at a time (completing meta), if
        it is a large GPU tensor that LZ4 will not compress."""
        size = wire.numel() * wire.element_size()
        if wire.device.type not in _STAGED_DEVICES or size <= memory.STAGE_BYTES:
            return None
        if self.compression == "lz4":  # it compresses a tensor this large, on the host
            return None
        flat = _flat_bytes(wire)
        if self.compression == "auto":
            start = (size - _SAMPLE_BYTES) // 2  # the sample _should_compress takes
            if _pays(_as_bytes(flat[start : start + _SAMPLE_BYTES].cpu())):
                return None
        meta["n"] = size  # the keys in _wire_bytes' order: the same frame, byte for byte
        meta["z"] = "none"
        meta["s"] = size
        return DeviceBytes(flat)

    def _wire_bytes(self, meta: dict[str, Any], wire: torch.Tensor) -> bytes | memoryview:
        """The bytes of a wire form in host memory, compressed if it pays (completes meta)."""
        raw = _as_bytes(wire)
        meta["n"] = len(raw)
        meta["z"] = "none"
        if self._should_compress(raw):
            packed = lz4.block.compress(raw, store_size=False)
            if len(packed) < len(raw):
                meta["z"] = "lz4"
                raw = packed
        meta["s"] = len(raw)
        return raw

    def _should_compress(self, raw: memoryview | bytes) -> bool:
        if self.compression == "none" or len(raw) < _MIN_COMPRESS_BYTES:
            return False
        if self.compression == "lz4" or len(raw) <= _SAMPLE_BYTES:
            return True
        start = (len(raw) - _SAMPLE_BYTES) // 2
        return _pays(raw[start : start + _SAMPLE_BYTES])


def _pays(sample: memoryview | bytes) -> bool:
    """Whether LZ4 shrinks a tensor whose sample this is by enough to be worth it."""
    return len(lz4.block.compress(sample, store_size=False)) < _WORTH_IT * len(sample)


class _Layout(NamedTuple):
    """Where the tensors of a frame lie, as checked for one frame header (see Decoder)."""

    limits: Limits  # the limits it was checked against
    length: int  # bytes of the whole frame
    tree: bytes
    # per tensor: its checked meta, its element count, where its bytes start, how many there
    # are, and the frame's bytes just before them (the nil padding and the bin32 head)
    tensors: list[tuple[dict[str, Any], int, int, int, bytes]]


_LAYOUTS = 64  # frame headers one decoder remembers; a training loop repeats a handful
_LAYOUT_HEADER_BYTES = 4096  # only small headers are remembered (64 x 4 KiB at most)


def check_frame_size(size: int, limits: Limits) -> None:
    """Refuse a frame over ``limits.max_payload_bytes``: checked before anything is allocated
    for it, whichever way it arrives (one message, a stream, the bulk channel)."""
    if size > limits.max_payload_bytes:
        raise CodecError(
            f"frame of {size} bytes exceeds max_payload_bytes={limits.max_payload_bytes}"
        )


class Decoder:
    """Decodes frames, refusing anything over ``limits``. Reusable and thread-safe.

    Training sends frames of the same shapes again and again, so the decoder remembers the
    layout of recent small frame headers: a frame whose header, length, padding and bin32
    heads are byte-for-byte those of a frame it has checked is not unpacked and checked again
    (the checks would find the same tensors at the same places). Each tensor's bytes are
    still decoded, LZ4 sizes checked and the values unpacked every time.
    """

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._layouts: dict[bytes, _Layout] = {}

    def decode(self, buf: Any, *, device: torch.device | str | None = None) -> Any:
        """Decode a frame from any buffer. Raw tensors alias ``buf`` when it is writable;
        otherwise they are copied.

        With a non-CPU ``device`` (where the tensors are wanted), quantized tensors travel there
        in their wire form and are dequantized there: fewer bytes cross to the GPU, and the GPU
        does the arithmetic. Raw tensors stay on the host for the caller to move.
        """
        view = memoryview(buf).cast("B")
        if view.readonly:
            view = memoryview(bytearray(view))
        layout = self._checked_layout(view)
        if isinstance(device, str):
            device = torch.device(device)
        if device is not None and device.type == "cpu":
            device = None
        tensors = [
            _decode_tensor(view, start, size, meta, numel, device)
            for meta, numel, start, size, _ in layout.tensors
        ]
        value = _unpack(layout.tree, "frame values", tensors, max_depth=self.limits.max_depth)
        if device is not None:  # its raw tensors are copied to the GPU, not kept as views
            return value
        return _unpinned(value, _held_bytes(view), tensors, layout.tensors)

    def growth(self, buf: Any) -> int:
        """Bytes that decoding the frame in ``buf`` allocates beyond ``buf`` itself, at most at
        once (raw tensors alias the buffer). The frame is checked as ``decode`` checks it, so
        a server can count these bytes before any of them is allocated."""
        view = memoryview(buf).cast("B")
        extra = len(view) if view.readonly else 0  # decode copies it into writable memory
        for meta, numel, _, _, _ in self._checked_layout(view).tensors:
            if meta["z"] == "lz4":
                extra += 2 * meta["n"]  # python-lz4 decompresses, then copies to a bytearray
            if meta["q"] != "none":  # dequantized in cache-sized pieces into the output
                extra += numel * DTYPES[meta["dtype"]].itemsize
        return extra

    def _checked_layout(self, view: memoryview) -> _Layout:
        """The layout of the frame in ``view``, checked against the limits (or remembered)."""
        limits = self.limits
        check_frame_size(len(view), limits)
        if len(view) < 5 or view[0] != 0xCE:
            raise CodecError("not a remote_autograd frame: it must start with a msgpack uint32")
        (meta_len,) = _U32.unpack(view[1:5])
        if meta_len > limits.max_header_bytes or 5 + meta_len > len(view):
            raise CodecError(
                f"frame header claims {meta_len} bytes; frame has {len(view) - 5}, "
                f"max_header_bytes={limits.max_header_bytes}"
            )
        key = bytes(view[5 : 5 + meta_len]) if meta_len <= _LAYOUT_HEADER_BYTES else None
        layout = self._layouts.get(key) if key is not None else None
        if layout is None or not _same_layout(view, layout, limits):
            layout = self._layout(view, meta_len, limits)
            if key is not None:
                if len(self._layouts) >= _LAYOUTS:
                    self._layouts.clear()  # atomic from any thread, unlike evicting one
                self._layouts[key] = layout
        return layout

    def _layout(self, view: memoryview, meta_len: int, limits: Limits) -> _Layout:
        """Unpack and check a frame's header and find its tensors, refusing what is wrong."""
        meta = _unpack(view[5 : 5 + meta_len], "frame header", max_depth=limits.max_depth)
        if not isinstance(meta, dict) or meta.get("v") != VERSION:
            raise CodecError(f"unsupported frame version {_get(meta, 'v')!r}; expected {VERSION}")
        metas = meta.get("tensors")
        tree = meta.get("tree")
        if not isinstance(metas, list) or not isinstance(tree, bytes):
            raise CodecError("frame header must hold 'tensors' (a list) and 'tree' (bytes)")
        if len(metas) > limits.max_tensors:
            raise CodecError(f"frame holds {len(metas)} tensors; max_tensors={limits.max_tensors}")
        checked = [self._check_meta(i, m) for i, m in enumerate(metas)]
        decoded = sum(numel * DTYPES[m["dtype"]].itemsize for m, numel in checked)
        if decoded > limits.max_decoded_bytes:
            raise CodecError(
                f"frame's tensors decode to {decoded} bytes; max_decoded_bytes="
                f"{limits.max_decoded_bytes}"
            )
        offset = 5 + meta_len
        tensors = []
        for i, (m, numel) in enumerate(checked):
            # Skip the nil padding (at most up to the alignment point) in one slice, not a
            # byte at a time.
            pad_start = offset
            pad = bytes(view[offset : offset + (ALIGN - 5 - offset) % ALIGN])
            offset += len(pad) - len(pad.lstrip(_NIL))
            if offset + 5 > len(view) or view[offset] != 0xC6:
                raise CodecError(f"tensor {i}: expected a bin32 at byte {offset} of the frame")
            (size,) = _U32.unpack(view[offset + 1 : offset + 5])
            if size != m["s"] or offset + 5 + size > len(view):
                raise CodecError(
                    f"tensor {i}: header says {m['s']} bytes, frame holds {size} "
                    f"(frame is {len(view)} bytes)"
                )
            tensors.append((m, numel, offset + 5, size, bytes(view[pad_start : offset + 5])))
            offset += 5 + size
        if offset != len(view):
            raise CodecError(f"frame has {len(view) - offset} trailing bytes after the last tensor")
        return _Layout(limits, len(view), tree, tensors)

    def _check_meta(self, index: int, meta: Any) -> tuple[dict[str, Any], int]:
        limits = self.limits
        if not isinstance(meta, dict):
            raise CodecError(f"tensor {index}: meta must be a map, got {type(meta).__name__}")
        name = meta.get("dtype")
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise CodecError(
                f"tensor {index}: unknown dtype {meta.get('dtype')!r}; "
                f"supported: {', '.join(DTYPES)}"
            )
        shape = meta.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_ndim
            or not all(type(d) is int and d >= 0 for d in shape)
            # a 0 makes the count 0 whatever the others are, but torch still sizes the others
            # (strides, in int64): an empty [0, 8192, 152064] is fine, [2**62, 4, 0] is not
            or (0 in shape and math.prod(d for d in shape if d) > _MAX_SHAPE_PRODUCT)
        ):
            raise CodecError(
                f"tensor {index}: shape must be a list of at most max_ndim={limits.max_ndim} "
                f"non-negative ints (an empty one's other sizes multiplying to at most 2**48), "
                f"got {shape!r}"
            )
        numel = math.prod(shape)
        itemsize = dtype.itemsize
        if numel > limits.max_tensor_elements:
            raise CodecError(
                f"tensor {index}: {numel} elements exceed max_tensor_elements="
                f"{limits.max_tensor_elements}"
            )
        if numel * itemsize > limits.max_tensor_bytes:
            raise CodecError(
                f"tensor {index}: {numel * itemsize} bytes exceed max_tensor_bytes="
                f"{limits.max_tensor_bytes}"
            )
        q, z, n, s = meta.get("q"), meta.get("z"), meta.get("n"), meta.get("s")
        if q not in QUANTIZATIONS or z not in ("none", "lz4"):
            raise CodecError(f"tensor {index}: unknown codec q={q!r} z={z!r}")
        if q != "none" and not dtype.is_floating_point:
            raise CodecError(f"tensor {index}: quantization {q} on non-floating dtype {dtype}")
        expected = WIRE_CODECS[q].wire_nbytes(numel, itemsize, meta)
        if type(n) is not int or n != expected:
            raise CodecError(
                f"tensor {index}: {meta['dtype']}{shape} with q={q} is {expected} bytes, "
                f"header says {n!r}"
            )
        if type(s) is not int or s < 0 or (z == "none" and s != n) or (z == "lz4" and s > n):
            raise CodecError(f"tensor {index}: wire size {s!r} does not fit {n} bytes with z={z}")
        return meta, numel


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _same_layout(view: memoryview, layout: _Layout, limits: Limits) -> bool:
    """Whether ``view`` (whose header is the one ``layout`` was found for) has the same length
    and the same bytes around its tensors, so checking it again would find the same layout."""
    if layout.limits is not limits or layout.length != len(view):
        return False
    for _, _, start, _, before in layout.tensors:
        if view[start - len(before) : start] != before:
            return False
    return True


def _decode_tensor(
    view: memoryview,
    start: int,
    size: int,
    meta: dict[str, Any],
    numel: int,
    device: torch.device | None,
) -> torch.Tensor:
    dtype = DTYPES[meta["dtype"]]
    shape = meta["shape"]
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if meta["z"] == "lz4":
        try:
            raw = lz4.block.decompress(
                view[start : start + size], uncompressed_size=meta["n"], return_bytearray=True
            )
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"corrupt LZ4 data for a {meta['dtype']}{shape} tensor") from exc
        if len(raw) != meta["n"]:
            raise CodecError(f"LZ4 data decompressed to {len(raw)} bytes, header says {meta['n']}")
        data = torch.frombuffer(raw, dtype=torch.uint8)
    else:
        data = torch.frombuffer(view, dtype=torch.uint8, count=size, offset=start)
    if device is not None and meta["q"] != "none":
        data = to_device(data, device)  # the wire bytes, held until the copy has read them
    values = WIRE_CODECS[meta["q"]].dequantize(data, meta, dtype, numel)  # 1-D, numel elements
    return values if len(shape) == 1 else values.reshape(shape)


_MAX_SHAPE_PRODUCT = 1 << 48  # of a shape's non-zero sizes: far from int64 strides' overflow

# Bytes of a frame that none of its values uses (its header, tensors no value refers to) and
# that a raw tensor viewing the frame may keep alive: above this, and above 1/16 of the bytes
# its values use, the views are copied out (see _unpinned).
_PIN_SLACK = 16 << 10


def _held_bytes(view: memoryview) -> int:
    """The bytes a view of a frame keeps alive: all of its buffer, which may be larger (a
    pooled receive buffer serves frames of half its size and more)."""
    try:
        return max(len(view), memoryview(view.obj).nbytes)
    except TypeError:  # no owner that exports a buffer
        return len(view)


def _unpinned(value: Any, frame_bytes: int, decoded: list[torch.Tensor], layout: list) -> Any:
    """``value``, its tensors that view the frame copied out of it where the frame holds much
    more than its values use.

    A raw tensor aliases the frame's buffer and keeps all of it alive, while a server counts a
    kept tensor as its own bytes (max_context_bytes, an optimizer's loaded state): a frame of a
    4-byte input beside 1 MiB that no value refers to would hold the MiB as 4 bytes. A frame
    whose bytes its values use (raw, compressed or quantized: the ``decoded`` tensors and
    their ``layout`` entries) keeps its views, with no copy."""
    template, tensors = flatten(value)
    referenced = {id(t) for t in tensors}
    used = sum(entry[3] for t, entry in zip(decoded, layout, strict=True) if id(t) in referenced)
    if frame_bytes - used <= max(_PIN_SLACK, used // 16):
        return value
    views = {
        id(t): t
        for t, (meta, numel, *_) in zip(decoded, layout, strict=True)
        if id(t) in referenced and numel and meta["q"] == "none" and meta["z"] != "lz4"
    }
    if not views:
        return value
    copies = {key: t.clone() for key, t in views.items()}
    return unflatten(template, [copies.get(id(t), t) for t in tensors])


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    array: Any = _flat_bytes(tensor).numpy()  # a buffer; numpy's stubs do not say so
    return memoryview(array).cast("B")


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes in memory order, as one dimension of uint8, on its device."""
    flat = tensor.detach()
    if flat.is_conj() or flat.is_neg() or not flat.is_contiguous():
        flat = flat.resolve_conj().resolve_neg().contiguous()
    if flat.dim() != 1 or flat.stride(0) != 1:
        # Contiguous by now, so its elements are dense from its offset on; a one-element view
        # may still carry any stride (x[0:1, 0]), which reshape(-1) would keep.
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)


# What a frame's values may be besides tensors, None and tuples; bool before its base int.
_PLAIN_TYPES: tuple[type[Any], ...] = (bool, int, float, str, dict, list)


class _TreePacker:
    """msgpack ``default`` hook collecting tensors (a bound method, not a recursive closure,
    so no reference cycle keeps the tensors alive)."""

    def __init__(self, tensors: list[torch.Tensor], named: bool = False) -> None:
        self.tensors = tensors
        self.named = named

    def packb(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value, default=self.default, strict_types=True, use_bin_type=True)
        except CodecError:
            raise
        except (OverflowError, ValueError, TypeError) as exc:
            raise CodecError(f"cannot encode value: {exc}") from exc

    def default(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            return msgpack.ExtType(_EXT_TENSOR, _U32.pack(len(self.tensors) - 1))
        if self.named and (is_named_tuple(value) or is_model_output(value)):
            kind, cls = ("tuple" if isinstance(value, tuple) else "output"), type(value)
            fields = list(cls._fields if isinstance(value, tuple) else value.keys())
            values = list(value) if isinstance(value, tuple) else list(value.values())
            named = [kind, cls.__module__, cls.__name__, fields, values]
            return msgpack.ExtType(_EXT_NAMED, self.packb(named))
        if isinstance(value, tuple):
            return msgpack.ExtType(_EXT_TUPLE, self.packb(list(value)))
        # Subclasses (IntEnum, OrderedDict...) travel as their base type (bool before int).
        for base in _PLAIN_TYPES:
            if isinstance(value, base):
                return base(value)
        hint = ""
        if type(value).__name__.endswith("Cache"):  # transformers' past_key_values
            hint = (
                "; a Hugging Face model returns its key/value cache unless called with "
                "use_cache=False (or config.use_cache = False): the cache stays where it is made"
            )
        raise CodecError(
            f"cannot send a value of type {type(value).__name__}: frames carry tensors, None, "
            f"bool, int, float, str, and lists, tuples and dicts of these{hint}"
        )


class _TreeUnpacker:
    """msgpack ``ext_hook`` putting decoded tensors back in place (see _TreePacker).

    A tuple is a msgpack document inside the extension, so each level of tuples is one more
    ``unpackb`` on the C stack (~40 KB each): the levels are counted and refused past
    ``max_depth`` before they can exhaust a thread's stack."""

    def __init__(self, what: str, tensors: list[torch.Tensor] | None, max_depth: int) -> None:
        self.what = what
        self.tensors = tensors
        self.max_depth = max_depth
        self.tuples = 0  # tuple levels open now
        self.made = 0  # named tuple classes this frame made (each is an eval in namedtuple)

    def unpackb(self, data: Any) -> Any:
        try:
            return msgpack.unpackb(
                data, ext_hook=self.ext_hook, raw=False, strict_map_key=False, use_list=True
            )
        except CodecError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            raise CodecError(f"{self.what} is not valid msgpack: {exc}") from exc

    def ext_hook(self, code: int, payload: bytes) -> Any:
        tensors = self.tensors
        if code == _EXT_TENSOR and tensors is not None and len(payload) == 4:
            (index,) = _U32.unpack(payload)
            if index < len(tensors):
                return tensors[index]
            raise CodecError(f"{self.what}: reference to tensor {index}; frame has {len(tensors)}")
        if code in (_EXT_TUPLE, _EXT_NAMED) and tensors is not None:
            if self.tuples >= self.max_depth:
                raise _too_deep(self.what, self.max_depth)
            self.tuples += 1
            try:
                items = self.unpackb(payload)
            finally:
                self.tuples -= 1
            return tuple(items) if code == _EXT_TUPLE else _named(self, items)
        raise CodecError(f"{self.what}: unknown msgpack extension type {code}")


def _unpack(
    data: Any, what: str, tensors: list[torch.Tensor] | None = None, *, max_depth: int
) -> Any:
    value = _TreeUnpacker(what, tensors, max_depth).unpackb(data)
    _check_tree(value, max_depth, what)
    return value


def _named(unpacker: _TreeUnpacker, items: Any) -> Any:
    """A named tuple or ModelOutput from [kind, module, name, fields, values]."""
    what = unpacker.what
    if not (
        isinstance(items, list)
        and len(items) == 5
        and items[0] in ("tuple", "output")
        and all(isinstance(part, str) for part in items[1:3])
        and isinstance(items[3], list)
        and isinstance(items[4], list)
        and len(items[3]) == len(items[4])
        and all(isinstance(field, str) for field in items[3])
    ):
        raise CodecError(f"{what}: a named value must be [kind, module, name, fields, values]")
    kind, module, name, fields, values = items
    if kind == "tuple":
        tuple_class: Any = named_tuple_class(unpacker, module, name, tuple(fields))
        try:
            return tuple_class._make(values)
        except Exception as exc:  # noqa: BLE001 - a loaded class may check its values
            raise CodecError(f"{what}: {module}.{name} refused its values: {exc}") from exc
    output_class = _model_output_class(module, name)
    mapping = dict(zip(fields, values, strict=True))
    if output_class is not None:
        try:
            return model_output(output_class, mapping)
        except Exception:  # noqa: BLE001 - another version of the class (other checks)
            pass
    return mapping


_MAX_NAMED_FIELDS = 256  # a named tuple's fields: one class is made per name and fields
_MAX_NAME_CHARS = 128  # a named tuple's name and each field's; with the fields' limit, one class
# made is at most ~0.25 MB, so the classes kept (below) hold at most ~60 MB
_MAX_MODULE_CHARS = 256  # the module named beside it (kept in the classes' keys)
_MAX_NAMED_CLASSES = 256  # classes made for named tuples received, kept for reuse
_MAX_MADE_PER_FRAME = 16  # classes one frame may make (each costs ~100 us of eval)
_named_tuples: dict[tuple[str, str, tuple[str, ...]], type] = {}
_named_lock = threading.Lock()


def named_tuple_class(
    unpacker: _TreeUnpacker, module: str, name: str, fields: tuple[str, ...]
) -> type:
    """The sender's class ``module.name`` if this process has loaded it with these fields;
    else a named tuple class of that name and fields, made once."""
    what, key = unpacker.what, (module, name, fields)
    with _named_lock:
        found = _named_tuples.get(key) or _loaded_class(module, name)
    if found is not None and issubclass(found, tuple) and getattr(found, "_fields", None) == fields:
        return found
    longest = max(map(len, fields), default=0)
    if len(fields) > _MAX_NAMED_FIELDS or max(len(name), longest) > _MAX_NAME_CHARS:
        raise CodecError(
            f"{what}: a named tuple may have at most {_MAX_NAMED_FIELDS} fields, and names of "
            f"at most {_MAX_NAME_CHARS} characters (its own and each field's)"
        )
    if len(module) > _MAX_MODULE_CHARS:
        raise CodecError(f"{what}: a module name of more than {_MAX_MODULE_CHARS} characters")
    unpacker.made += 1
    if unpacker.made > _MAX_MADE_PER_FRAME:
        raise CodecError(
            f"{what}: more than {_MAX_MADE_PER_FRAME} named tuple classes that this process "
            "does not have in one frame"
        )
    try:  # namedtuple checks that name and fields are identifiers, not keywords, unique
        cls = collections.namedtuple(name, fields)  # type: ignore[misc]
    except ValueError as exc:
        raise CodecError(f"{what}: named tuple {name!r}{fields!r}: {exc}") from exc
    with _named_lock:
        if len(_named_tuples) >= _MAX_NAMED_CLASSES:
            _named_tuples.pop(next(iter(_named_tuples)), None)  # the oldest
        _named_tuples[key] = cls
    return cls


def _model_output_class(module: str, name: str) -> type | None:
    """The loaded ``ModelOutput`` subclass ``module.name``, if any."""
    generic = sys.modules.get("transformers.utils.generic")
    base = getattr(generic, "ModelOutput", None)
    cls = _loaded_class(module, name)
    return cls if base is not None and cls is not None and issubclass(cls, base) else None


def _loaded_class(module: str, name: str) -> type | None:
    # The module's own namespace: nothing is imported, and no module __getattr__ (a lazy
    # module's imports on demand) runs for a name the peer chose.
    found = getattr(sys.modules.get(module), "__dict__", {}).get(name)
    return found if isinstance(found, type) else None


# What msgpack and our extensions decode to (named tuples and ModelOutputs are subclasses).
_CONTAINERS = (dict, list, tuple)


# What a map's keys may be: plain values, and tuples of them. A tensor as a key would be kept
# whole (pinning its frame) by everything that holds the value, unseen by the trees that count
# and move tensors.
_KEY_TYPES = (str, bytes, int, float, bool, type(None))


def _plain_key(key: Any) -> bool:
    kind = type(key)
    return kind in _KEY_TYPES or (kind is tuple and all(type(k) in _KEY_TYPES for k in key))


def _check_tree(value: Any, limit: int, what: str) -> None:
    """Refuse lists, tuples and maps nested in ``value`` more than ``limit`` levels deep, and
    map keys that are not plain: one level at a time, without recursion (the tree came from
    the peer), keeping containers only (a long list of numbers costs one pass of C-speed type
    checks)."""
    level = [value] if isinstance(value, _CONTAINERS) else []  # the containers at depth 1
    for _ in range(limit):
        children = []
        for node in level:
            items: Any = node
            if isinstance(node, dict):
                if not all(map(_plain_key, node)):
                    raise CodecError(
                        f"{what}: map keys must be str, bytes, int, float, bool, None, or tuples "
                        "of these (not tensors)"
                    )
                items = node.values()
            children += [child for child in items if isinstance(child, _CONTAINERS)]
        if not children:
            return
        level = children
    raise _too_deep(what, limit)  # containers at depth limit + 1


def _too_deep(what: str, limit: int) -> CodecError:
    return CodecError(f"{what} nest lists, tuples or maps deeper than max_depth={limit}")


def iter_chunks(buffers: Sequence[Buffer], chunk_bytes: int) -> Iterator[bytes]:
    """Re-slice a frame's buffers into chunks of ``chunk_bytes`` (one bounded copy each)."""
    pending: list[bytes | memoryview] = []
    pending_len = 0
    for buffer in buffers:
        for piece in pieces(buffer):
            view = memoryview(piece).cast("B")
            while len(view):
                take = min(len(view), chunk_bytes - pending_len)
                pending.append(view[:take])
                pending_len += take
                view = view[take:]
                if pending_len == chunk_bytes:
                    yield b"".join(pending)
                    pending, pending_len = [], 0
            if pending_len and isinstance(buffer, DeviceBytes):
                pending[-1] = bytes(pending[-1])  # the piece's buffer is reused
    if pending_len:
        yield b"".join(pending)


def join(buffers: Sequence[Buffer]) -> bytes:
    """A frame's buffers as one bytes object."""
    parts: list[bytes | memoryview] = []
    for buffer in buffers:
        if isinstance(buffer, DeviceBytes):  # each piece's staging buffer is reused: copy it
            parts.extend(bytes(piece) for piece in buffer.pieces())
        else:
            parts.append(buffer)
    return b"".join(parts)


def encode(obj: Any, *, compression: str = "auto", quantization: str = "none") -> bytes:
    """Encode ``obj`` into one frame (see :class:`Encoder`)."""
    return Encoder(compression=compression, quantization=quantization).encode(obj)


def decode(
    buf: Any, *, limits: Limits | None = None, device: torch.device | str | None = None
) -> Any:
    """Decode one frame from any buffer (see :class:`Decoder`)."""
    return Decoder(limits=limits).decode(buf, device=device)
