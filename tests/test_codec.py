"""The wire codec: exact round trips, lossy codecs within bounds, hostile frames refused."""

from __future__ import annotations

import collections
import hashlib
import struct

import hypothesis.strategies as st
import lz4.block
import msgpack
import pytest
import torch
from codec_cases import FLOATS, SHAPES, case_frame, codec_cases
from hypothesis import given, settings

from remote_autograd import CodecError, Decoder, Encoder, Limits, decode, encode
from remote_autograd.codec import DTYPES, iter_chunks


def _example(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(
        dtype
    )


@pytest.mark.parametrize("compression", ["none", "lz4", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_every_dtype_and_shape_round_trips_exactly(dtype, shape, compression):
    tensor = _example(dtype, shape)
    out = decode(encode(tensor, compression=compression))
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_non_contiguous_and_grad_tensors(requires_grad):
    base = torch.randn(6, 8, dtype=torch.float64, requires_grad=requires_grad)
    # base[1:2, 3] and base[2:3, 4:5] are contiguous one-element views with strides other than 1
    views = (
        base.t(),
        base[:, ::3],
        base[1:4, 2:].T,
        base.expand(6, 8),
        base[1:2, 3],
        base[2:3, 4:5],
    )
    for view in views:
        out = decode(encode(view))
        assert torch.equal(out, view.detach()) and not out.requires_grad


def test_special_float_values_survive():
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out = decode(encode(tensor))
    assert torch.equal(out.view(torch.int32), tensor.view(torch.int32))


def test_values_round_trip_with_their_types():
    value = {
        "none": None,
        "flags": [True, False],
        "ints": (1, -(2**63), 2**64 - 1),
        "float": 2.5,
        "text": "héllo",
        "nested": [{"t": torch.arange(3)}, (torch.ones(2), [None])],
        7: "int key",
    }
    out = decode(encode(value))
    assert out.keys() == value.keys()
    assert isinstance(out["ints"], tuple) and out["ints"] == value["ints"]
    assert isinstance(out["nested"][1], tuple)
    assert torch.equal(out["nested"][0]["t"], torch.arange(3))
    assert out[7] == "int key" and out["text"] == "héllo" and out["none"] is None


@pytest.mark.parametrize("value", [object(), torch.randn(2).numpy(), {1, 2}, 1 + 2j])
def test_unsupported_values_are_refused(value):
    with pytest.raises(CodecError):
        encode({"x": value})


def test_unsupported_dtype_is_refused():
    with pytest.raises(CodecError, match="complex64"):
        encode(torch.zeros(2, dtype=torch.complex64))


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(list(DTYPES.values())),
    shape=st.lists(st.integers(0, 6), max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
    compression=st.sampled_from(["none", "lz4", "auto"]),
)
def test_round_trip_property(dtype, shape, seed, compression):
    tensor = _example(dtype, shape, seed)
    out = decode(encode([tensor, tensor.float()], compression=compression))
    assert torch.equal(out[0], tensor) and torch.equal(out[1], tensor.float())


@pytest.mark.parametrize(
    ("quantization", "bound"),
    # Round to nearest: half a unit in the last place of bf16 / fp16, half a step of int8's
    # (max|x| / 127, float32 rounding on top: see the int8 test below for its exact bound).
    [("bf16", 2**-8), ("fp16", 2**-11), ("int8", (1 / 254) * (1 + 2**-14))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lossy_codecs_stay_within_their_error_bound(quantization, bound, dtype):
    tensor = torch.randn(4096, dtype=dtype)
    out = decode(encode(tensor, quantization=quantization))
    assert out.dtype == dtype and out.shape == tensor.shape
    scale = tensor.abs().max() if quantization == "int8" else tensor.abs()
    assert bool(((out - tensor).abs() <= bound * scale + 1e-30).all())
    assert len(encode(tensor, quantization=quantization)) < 0.6 * len(encode(tensor))


@pytest.mark.parametrize("numel", [4096, 4096 + 100, 37], ids=["full-blocks", "partial", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_int8_rounds_to_nearest_within_half_a_step_of_its_block(numel, dtype):
    """int8 (codec.py): per block of 256 elements, scale = max|x| / 127 and each element is
    round(x / scale) * scale, so its error is at most scale / 2 (plus float32 rounding)."""
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(numel, generator=generator, dtype=torch.float64).to(dtype) * 10
    tensor[5] = 0.0
    out = decode(encode(tensor, quantization="int8"))
    blocks = torch.nn.functional.pad(tensor.float(), (0, -numel % 256)).view(-1, 256)
    scales = (blocks.abs().amax(1) / 127).repeat_interleave(256)[:numel].double()
    error = (out.double() - tensor.double()).abs()
    slack = tensor.double().abs() * 2**-23  # float32 rounding of x, x / scale and q * scale
    assert bool((error <= scales / 2 + slack).all()), float((error / scales).max())
    assert float((error / scales).max()) > 0.4  # the bound is tight: it is what the codec gives
    assert out[5] == 0.0
    block_max = tensor.float().view(-1)[: (numel // 256) * 256].view(-1, 256).abs().amax(1)
    if len(block_max):  # each block's largest magnitude is exact: it maps to +-127
        for index, peak in enumerate(block_max.tolist()):
            block = out.float()[index * 256 : (index + 1) * 256].abs()
            assert float(block.max()) == pytest.approx(peak, rel=2**-22)


@pytest.mark.parametrize("quantization", ["bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_two_byte_floats_go_as_they_are_under_the_two_byte_codecs(quantization, dtype):
    """bfloat16 would round float16's largest finite values to inf (65408 and up), and fp16
    would flush its subnormals, to save no byte: they travel as they are. int8 still halves
    them."""
    info = torch.finfo(dtype)
    values = [info.max, -info.max, 65440.0, 1000.1, 1.001, info.tiny, info.smallest_normal / 8]
    tensor = torch.tensor(values, dtype=dtype)
    raw = encode(tensor)
    frame = encode(tensor, quantization=quantization)
    assert len(frame) == len(raw)
    assert torch.equal(decode(frame), tensor)
    assert torch.isfinite(decode(frame)).all()
    big = torch.randn(4096, dtype=dtype)
    assert len(encode(big, quantization="int8")) < 0.6 * len(encode(big))


def test_fp16_scaling_keeps_tiny_gradients():
    tensor = torch.randn(1000) * 1e-9  # would flush to zero in plain fp16
    out = decode(encode(tensor, quantization="fp16"))
    assert (out != 0).all()
    torch.testing.assert_close(out, tensor, rtol=2**-10, atol=0)


def test_lossy_codecs_leave_integers_and_non_finite_alone():
    ints = torch.arange(10)
    assert torch.equal(decode(encode(ints, quantization="int8")), ints)
    bad = torch.tensor([1.0, float("inf")])
    for quantization in ("fp16", "int8"):
        assert torch.equal(decode(encode(bad, quantization=quantization)), bad)


@pytest.mark.parametrize(
    ("values", "dtype", "quantizations"),
    [
        ([1e-36, -5e-37, 0.0], torch.float32, ("fp16",)),  # fp16's scale would overflow
        ([4e-35, 1e-35, 0.0], torch.float32, ("fp16",)),
        ([1e60, -3e59, 0.0], torch.float64, ("bf16", "fp16", "int8")),  # past float32
        ([1e-50, 5e-51, 0.0], torch.float64, ("bf16", "fp16", "int8")),  # below it
        ([1e-310, 0.0, 5e-311], torch.float64, ("bf16", "fp16", "int8")),  # subnormal
    ],
)
def test_lossy_codecs_send_values_beyond_float32_as_they_are(values, dtype, quantizations):
    """The lossy codecs' values pass through float32: a finite tensor they cannot carry
    travels raw (exact), not as inf, NaN or zeros."""
    tensor = torch.tensor(values, dtype=dtype)
    for quantization in quantizations:
        assert torch.equal(decode(encode(tensor, quantization=quantization)), tensor)
    near = torch.tensor([1e-30, -5e-31, 0.0], dtype=dtype)  # within range: still quantized
    assert len(encode(near, quantization="fp16")) < len(encode(near, quantization="none"))


def test_auto_compresses_only_what_shrinks():
    dense = torch.randn(1 << 16)
    sparse = torch.zeros(1 << 16)
    assert len(encode(dense, compression="auto")) > dense.numel() * 4
    assert len(encode(sparse, compression="auto")) < 0.1 * sparse.numel() * 4


def test_decode_accepts_any_buffer_without_copying_raw_tensors():
    frame = bytearray(encode(torch.arange(1000, dtype=torch.float32), compression="none"))
    out = decode(memoryview(frame))
    frame[-4:] = struct.pack("<f", 7.0)  # the decoded tensor aliases the buffer
    assert out[-1].item() == 7.0
    assert torch.equal(decode(bytes(frame))[:3], torch.arange(3, dtype=torch.float32))


def test_iter_chunks_reassembles_the_frame():
    buffers = Encoder(compression="none").encode_buffers([torch.randn(1000), "x", torch.ones(7)])
    chunks = list(iter_chunks(buffers, 333))
    assert all(len(c) == 333 for c in chunks[:-1])
    assert b"".join(chunks) == b"".join(buffers)


# -- hostile frames -----------------------------------------------------------------------------


def _frame(meta: dict, segments: list[bytes], tree: bytes | None = None) -> bytes:
    meta = {"v": 1, "tree": tree if tree is not None else msgpack.packb(None), **meta}
    head = msgpack.packb(meta)
    out = b"\xce" + struct.pack(">I", len(head)) + head
    for data in segments:
        out += b"\xc0" * ((-(len(out) + 5)) % 64) + b"\xc6" + struct.pack(">I", len(data)) + data
    return out


def _meta(**overrides):
    meta = {"dtype": "float32", "shape": [4], "q": "none", "z": "none", "n": 16, "s": 16}
    meta.update(overrides)
    return meta


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "must start"),
        (b"\x00" * 10, "must start"),
        (b"\xce\xff\xff\xff\xff", "max_header_bytes"),
        (b"\xce\x00\x00\x00\x01\x81", "not valid msgpack"),
        (_frame({"v": 2}, []), "version"),
        (_frame({"tensors": [_meta(dtype="complex128")]}, [b"0" * 16]), "unknown dtype"),
        (_frame({"tensors": [_meta(shape=[-1])]}, [b"0" * 16]), "non-negative"),
        (_frame({"tensors": [_meta(shape=[4.0])]}, [b"0" * 16]), "non-negative"),
        (_frame({"tensors": [_meta(shape=[1] * 17)]}, [b"0" * 16]), "max_ndim"),
        (_frame({"tensors": [_meta(shape=[2**40, 2**40])]}, [b"0" * 16]), "max_tensor_elements"),
        (_frame({"tensors": [_meta(n=8, s=8)]}, [b"0" * 8]), "header says 8"),
        (_frame({"tensors": [_meta(s=15)]}, [b"0" * 15]), "wire size"),
        (_frame({"tensors": [_meta()]}, [b"0" * 12]), "frame holds 12"),
        (_frame({"tensors": [_meta()]}, [b"0" * 16 + b"extra"]), "frame holds 21"),
        (_frame({"tensors": [_meta()]}, [b"0" * 16]) + b"\x00", "trailing"),
        (_frame({"tensors": [_meta(q="int4")]}, [b"0" * 16]), "unknown codec"),
        (
            _frame({"tensors": [_meta(dtype="int32", q="bf16", n=8, s=8)]}, [b"0" * 8]),
            "non-floating",
        ),
        (_frame({"tensors": [_meta(z="lz4", s=5)]}, [b"\xff" * 5]), "corrupt LZ4"),
        (
            _frame({"tensors": []}, [], tree=msgpack.packb(msgpack.ExtType(1, b"\0\0\0\1"))),
            "reference",
        ),
        (_frame({"tensors": []}, [], tree=msgpack.packb(msgpack.ExtType(9, b""))), "extension"),
        (_frame({"tensors": "x"}, []), "'tensors'"),
    ],
)
def test_malformed_and_lying_frames_are_refused(frame, message):
    with pytest.raises(CodecError, match=message):
        decode(frame)


def _nested(levels: int, ext: bool) -> bytes:
    """A frame whose values are ``levels`` tuples (msgpack extensions) or lists, one in another."""
    if not ext:
        return _frame({"tensors": []}, [], tree=b"\x91" * (levels - 1) + b"\x90")
    inner = msgpack.packb(msgpack.ExtType(2, msgpack.packb([])))
    for _ in range(levels - 1):
        inner = msgpack.packb(msgpack.ExtType(2, b"\x91" + inner))
    return _frame({"tensors": []}, [], tree=inner)


@pytest.mark.parametrize("ext", [True, False], ids=["tuples", "lists"])
def test_values_nested_past_max_depth_are_refused_without_recursing(ext):
    # 250 levels of tuples took ~10 MB of C stack to decode (one msgpack unpack per level):
    # enough to kill the process, whichever thread decodes.
    for levels in (33, 250):
        with pytest.raises(CodecError, match="max_depth=32"):
            decode(_nested(levels, ext))
    with pytest.raises(CodecError):  # lists: msgpack's own stack of 1024 levels refuses first
        decode(_nested(5000, ext))
    value = decode(_nested(32, ext))
    for _ in range(31):
        (value,) = value
    assert value in ((), [])
    with pytest.raises(CodecError, match="max_depth=8"):
        Decoder(limits=Limits(max_depth=8)).decode(_nested(9, ext))


def test_a_frame_that_decodes_past_max_decoded_bytes_is_refused_before_decoding():
    # LZ4 shrinks zeros ~250-fold: the wire size says nothing of what decoding allocates.
    frame = encode([torch.zeros(1 << 18)] * 4, compression="lz4")
    assert len(frame) < (1 << 16)
    with pytest.raises(CodecError, match=f"decode to {4 << 20} bytes; max_decoded_bytes=4194303"):
        Decoder(limits=Limits(max_decoded_bytes=(4 << 20) - 1)).decode(frame)
    assert len(Decoder(limits=Limits(max_decoded_bytes=4 << 20)).decode(frame)) == 4


def test_a_reused_decoder_checks_every_frame_whose_header_it_has_seen():
    # The decoder remembers the layout of headers it has checked: frames sharing a header still
    # decode their own values, and are refused when the bytes around their tensors lie.
    decoder, encoder = Decoder(), Encoder(compression="none")
    for seed in range(3):
        value = {"x": _example(torch.float32, (3, 4), seed), "n": [seed, 2]}
        out = decoder.decode(encoder.encode(value))
        assert torch.equal(out["x"], value["x"]) and out["n"] == [seed, 2]
    good = _frame({"tensors": [_meta(), _meta()]}, [b"0" * 16, b"1" * 16])
    first_head = good.index(b"\xc6")
    lying = {
        "expected a bin32": good[: first_head - 1] + b"\x00" + good[first_head:],  # padding
        "frame holds 12": _frame({"tensors": [_meta(), _meta()]}, [b"0" * 16, b"1" * 12]),
        "trailing": good + b"\x00",
    }
    for _ in range(2):
        assert decoder.decode(good) is None
        for message, frame in lying.items():
            with pytest.raises(CodecError, match=message):
                decoder.decode(frame)
    decoder.limits = Limits(max_tensors=1)
    with pytest.raises(CodecError, match="max_tensors=1"):
        decoder.decode(good)


def test_lz4_bomb_is_refused_before_it_is_decompressed():
    bomb = lz4.block.compress(b"\0" * (64 << 20), store_size=False)  # 64 MiB of zeros
    limits = Limits(max_tensor_bytes=1 << 20)
    meta = _meta(dtype="uint8", shape=[64 << 20], z="lz4", n=64 << 20, s=len(bomb))
    with pytest.raises(CodecError, match="max_tensor_bytes=1048576"):
        Decoder(limits=limits).decode(_frame({"tensors": [meta]}, [bomb]))
    # A header that under-declares the size cannot make it decompress more than declared.
    meta = _meta(dtype="uint8", shape=[1024], z="lz4", n=1024, s=len(bomb))
    with pytest.raises(CodecError):
        decode(_frame({"tensors": [meta]}, [bomb]))


def test_limits_are_named_in_the_message():
    frame = encode([torch.zeros(10)] * 5)
    with pytest.raises(CodecError, match="max_tensors=4"):
        Decoder(limits=Limits(max_tensors=4)).decode(frame)
    with pytest.raises(CodecError, match="max_payload_bytes=100"):
        Decoder(limits=Limits(max_payload_bytes=100)).decode(frame)


# -- frames are the same bytes wherever the tensor was (the CPU half; GPU: test_cuda.py) -------


def frames_digest(quantization: str, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for _, tensor, compression in codec_cases(dtype):
        digest.update(case_frame(tensor, compression, quantization))
    return digest.hexdigest()[:16]


# sha256 of the frames of codec_cases, as written by the CPU codec before tensors were
# quantized on their own device (main at 6e6774c): the CPU's frames must not change. Since
# then, one change on purpose: two-byte floats go as they are under bf16 and fp16 (their
# frames are the "none" ones).
CPU_FRAME_DIGESTS = {
    ("none", "torch.float32"): "d80e500cf5c7edda",
    ("none", "torch.float64"): "59aa89ef3fcf0f4f",
    ("none", "torch.float16"): "0971c2de8cfbed9f",
    ("none", "torch.bfloat16"): "82e39d29bc8f7fb7",
    ("bf16", "torch.float32"): "65b9ba7d9536562d",
    ("bf16", "torch.float64"): "6b5dffc0b378347f",
    ("bf16", "torch.float16"): "0971c2de8cfbed9f",
    ("bf16", "torch.bfloat16"): "82e39d29bc8f7fb7",
    ("fp16", "torch.float32"): "df6801d6e2555198",
    ("fp16", "torch.float64"): "a06691790b74424c",
    ("fp16", "torch.float16"): "0971c2de8cfbed9f",
    ("fp16", "torch.bfloat16"): "82e39d29bc8f7fb7",
    ("int8", "torch.float32"): "b2cb1b19ff5e821a",
    ("int8", "torch.float64"): "41b490d45a0385f1",
    ("int8", "torch.float16"): "bec088c4e7e0ea16",
    ("int8", "torch.bfloat16"): "71b02f91e9aaf86c",
}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("quantization", ["none", "bf16", "fp16", "int8"])
def test_cpu_frames_are_byte_for_byte_unchanged(quantization, dtype):
    assert frames_digest(quantization, dtype) == CPU_FRAME_DIGESTS[quantization, str(dtype)]


@pytest.mark.parametrize("quantization", ["none", "bf16", "fp16", "int8"])
def test_decoding_for_the_cpu_device_is_the_plain_decode(quantization):
    for name, tensor, compression in codec_cases(torch.float32):
        frame = encode([tensor], compression=compression, quantization=quantization)
        (plain,) = decode(frame)
        for device in ("cpu", torch.device("cpu")):
            (out,) = decode(frame, device=device)
            assert out.device.type == "cpu", name
            assert torch.equal(out.view(torch.int32), plain.view(torch.int32)), name


def test_growth_counts_what_decoding_allocates_beyond_the_frame():
    """What a server reserves before decoding (Decoder.growth): raw tensors alias a writable
    frame, LZ4 decompresses to its stated size, a lossy codec widens to the dtype's size."""
    raw = encode([torch.ones(1000), torch.zeros(10, dtype=torch.int64)], compression="none")
    assert Decoder().growth(bytearray(raw)) == 0
    assert Decoder().growth(raw) == len(raw)  # read-only: decode copies it first
    zeros = torch.zeros(1 << 16)
    lz4_frame = bytearray(encode([zeros], compression="lz4"))
    assert Decoder().growth(lz4_frame) == 2 * zeros.nbytes  # python-lz4 copies what it made
    int8 = bytearray(encode([torch.randn(4096)], compression="none", quantization="int8"))
    assert Decoder().growth(int8) == 4096 * 4  # the float32 values dequantized
    both = bytearray(encode([zeros], compression="lz4", quantization="bf16"))
    assert Decoder().growth(both) == 2 * (zeros.nbytes // 2) + zeros.nbytes  # bf16, float32
    with pytest.raises(CodecError, match="max_decoded_bytes"):  # checked as decode checks
        Decoder(limits=Limits(max_decoded_bytes=100)).growth(bytearray(raw))


def test_an_empty_tensor_with_large_other_sizes_travels():
    """An empty batch of long sequences over a large vocabulary: 0 elements, though its other
    sizes multiply past max_tensor_elements (sizes that would overflow torch's strides do not
    travel: test_fuzz.py's examples)."""
    empty = torch.empty(0, 8192, 152064, dtype=torch.float16)
    assert decode(encode(empty)).shape == empty.shape


# -- named tuples and ModelOutputs ----------------------------------------------------------------

Point = collections.namedtuple("Point", ["x", "y"])


def test_named_values_keep_their_class_only_where_the_receiver_reads_them():
    from transformers.modeling_outputs import CausalLMOutput

    t = torch.arange(4.0)
    value = {"p": Point(t, (Point(1, 2),)), "o": CausalLMOutput(logits=t, loss=t.sum())}
    named = decode(b"".join(Encoder().encode_buffers(value, named=True)))
    assert type(named["p"]) is Point and type(named["p"].y[0]) is Point
    assert type(named["o"]) is CausalLMOutput and list(named["o"]) == ["loss", "logits"]
    assert torch.equal(named["o"].logits, t) and named["p"].y[0].y == 2
    plain = decode(encode(value))  # a peer of the first protocol version
    assert type(plain["p"]) is tuple and type(plain["p"][1][0]) is tuple
    assert type(plain["o"]) is dict and list(plain["o"]) == ["loss", "logits"]


def _named_frame(*named) -> bytes:
    return _frame({"tensors": []}, [], tree=msgpack.packb(msgpack.ExtType(3, msgpack.packb(named))))


def test_a_named_class_the_receiver_has_not_loaded_is_made_or_left_a_dict():
    """Nothing is imported for a name the peer sent: a named tuple of a module not loaded here
    is made with the same name and fields; a ModelOutput unknown here arrives as a dict."""
    made = decode(_named_frame("tuple", "no_such_module", "Point", ["x", "y"], [1, 2]))
    assert type(made) is not Point and type(made).__name__ == "Point" and made.y == 2
    again = decode(_named_frame("tuple", "no_such_module", "Point", ["x", "y"], [3, 4]))
    assert type(again) is type(made)  # made once
    output = decode(_named_frame("output", "transformers", "NoSuchOutput", ["a"], [1]))
    assert output == {"a": 1}
    # A loaded class whose fields differ (another version of it) is not used.
    other = decode(_named_frame("tuple", __name__, "Point", ["x", "z"], [1, 2]))
    assert type(other) is not Point and other._fields == ("x", "z")


@pytest.mark.parametrize(
    ("named", "message"),
    [
        (("tuple", "m", "Point", ["x"]), r"\[kind, module, name, fields, values\]"),
        (("list", "m", "Point", ["x"], [1]), r"\[kind, module"),
        (("tuple", "m", "Point", ["x", "y"], [1]), r"\[kind, module"),
        (("tuple", "m", "Point", [1], [1]), r"\[kind, module"),
        (("tuple", "m", "a b", ["x"], [1]), "identifiers"),
        (("tuple", "m", "Point", ["class"], [1]), "keyword"),
        (("tuple", "m", "Point", ["x", "x"], [1, 2]), "duplicate"),
        (("tuple", "m", "Point", ["_x"], [1]), "underscore"),
        (("tuple", "m", "P" * 129, ["x"], [1]), "128 characters"),
        (("tuple", "m", "Point", ["x", "f" * 129], [1, 2]), "128 characters"),
        (("tuple", "m" * 257, "Point", ["x"], [1]), "module name of more than 256"),
        (("tuple", "m", "Wide", [f"f{i}" for i in range(257)], [0] * 257), "256 fields"),
    ],
)
def test_malformed_named_values_are_refused(named, message):
    with pytest.raises(CodecError, match=message):
        decode(_named_frame(*named))


def test_values_nested_in_named_values_count_against_max_depth():
    inner: bytes = msgpack.packb([])
    for _ in range(40):
        inner = b"\x91" + inner  # a list in a list
    tree = msgpack.packb(
        msgpack.ExtType(
            3,
            b"\x95"
            + msgpack.packb("tuple")
            + msgpack.packb("m")
            + msgpack.packb("P")
            + msgpack.packb(["x"])
            + b"\x91"
            + inner,
        )
    )
    with pytest.raises(CodecError, match="max_depth=32"):
        decode(_frame({"tensors": []}, [], tree=tree))


def test_map_keys_must_be_plain():
    """A tensor or tuple as a map key would be held, with the frame it views, by whatever keeps
    the value (a kept forward's arguments), unseen by what counts tensors: refused."""
    plain = {1: torch.ones(2), "a": None, 2.5: True, None: 0, b"k": 1, (0, "a"): 2}
    assert decode(encode(plain))[1].sum() == 2 and decode(encode(plain))[(0, "a")] == 2
    for key in (torch.ones(2), (1, torch.ones(1)), ((1, 2), 3), Point(1, 2)):
        frame = b"".join(Encoder().encode_buffers({"kwargs": {key: 1}}, named=True))
        with pytest.raises(CodecError, match="map keys must be str, bytes, int, float, bool"):
            decode(frame)


def test_a_frame_may_make_few_named_tuple_classes():
    """Each class made is an eval in collections.namedtuple: a frame of hundreds of new ones
    cost a second of the server's CPU. Sixteen per frame, then refused."""

    def frame(count: int, prefix: str) -> bytes:
        named = [
            msgpack.ExtType(3, msgpack.packb(["tuple", "m", f"{prefix}{i}", ["x"], [i]]))
            for i in range(count)
        ]
        return _frame({"tensors": []}, [], tree=msgpack.packb(named))

    assert [p.x for p in decode(frame(16, "Few"))] == list(range(16))
    with pytest.raises(CodecError, match="more than 16 named tuple classes"):
        decode(frame(17, "Many"))
    assert len(decode(frame(16, "Few"))) == 16  # made already: found, not made again
