"""Malformed messages against a running server: each gets an error, and the server keeps its
limits, its memory, and its ability to train.

The bulk test sends 10,000 messages as raw bytes on a plain gRPC channel (no client library in
the way, no shrinking), to a child-process server with small limits. The hypothesis test builds
structured frames whose tensor headers lie in every field the codec reads.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

import grpc
import lz4.block
import msgpack
import pytest
import torch
from conftest import rss_bytes, spawn_server
from factories import dropout_trunk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from remote_autograd import (
    ClientOptions,
    Limits,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    codec,
)
from remote_autograd._proto import remote_autograd_pb2 as pb

SEED = 20261126
MESSAGES = 10_000
TRUNK = "/remote_autograd.v1.Trunk/"
# What a refusal may look like. INTERNAL/UNKNOWN would mean the trunk code itself broke.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
LIMITS = [
    "--max-payload-bytes", str(1 << 20),
    "--max-tensor-bytes", str(256 << 10),
    "--max-tensor-elements", str(1 << 15),
    "--max-tensors", "8",
    "--max-contexts", "32",
    "--max-context-bytes", str(2 << 20),
    "--max-sessions", "16",
]  # fmt: skip


def _frame(meta: dict, datas: list[bytes]) -> bytes:
    """A frame laid out exactly like codec.Encoder's, from a meta the test may make lie."""
    meta_bytes = msgpack.packb(meta, use_bin_type=True)
    out = bytearray(b"\xce" + struct.pack(">I", len(meta_bytes)) + meta_bytes)
    for data in datas:
        out += b"\xc0" * ((-(len(out) + 5)) % codec.ALIGN) + b"\xc6" + struct.pack(">I", len(data))
        out += data
    return bytes(out)


def _tree(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _ref(index: int) -> msgpack.ExtType:
    return msgpack.ExtType(1, struct.pack(">I", index))


_ARGS_TREE = _tree({"args": [_ref(0)], "kwargs": {}})
_GRADS_TREE = _tree({"grads": [_ref(0)]})


def _tensor_meta(rng: random.Random) -> tuple[dict, bytes]:
    """One tensor meta with one field made to lie, and the bytes that follow it."""
    meta = {"dtype": "float64", "shape": [2, 8], "q": "none", "z": "none", "n": 128, "s": 128}
    data = bytes(128)
    lie = rng.randrange(12)
    if lie == 0:
        meta["dtype"] = rng.choice(
            ["float128", "object", "torch.float32", "", 7, None, "complex64"]
        )
    elif lie == 1:
        meta["shape"] = rng.choice(
            [
                [-1, 8],
                [2**40, 2**40],
                [1] * 40,
                ["a"],
                5,
                None,
                [2**31] * 3,
                [2**63 - 1],
                [-(2**63)],
            ]
        )
    elif lie == 2:
        meta["n"] = rng.choice([0, 127, 129, 2**40, -1, "128", None])
    elif lie == 3:
        meta["s"] = rng.choice([0, 127, 129, 2**32 - 1, -5, 1.5])
    elif lie == 4:  # LZ4 bomb: a few bytes that claim (or expand to) far more than declared
        bomb = lz4.block.compress(bytes(rng.choice([1 << 20, 8 << 20])), store_size=False)
        big = rng.choice([1 << 14, 1 << 17, 1 << 24])
        meta.update(z="lz4", shape=[big], dtype="uint8", n=big, s=len(bomb))
        data = bomb
    elif lie == 5:  # corrupt LZ4 stream
        meta.update(z="lz4", s=40)
        data = rng.randbytes(40)
    elif lie == 6:
        meta["q"] = rng.choice(["int4", "fp8", 3, "int8"])
        if meta["q"] == "int8":
            meta["block"] = rng.choice([0, -1, 2**40, "x", None])
    elif lie == 7:
        meta.update(q="fp16", n=32, s=32, scale=rng.choice([0.0, -1.0, float("nan"), "s", None]))
        data = bytes(32)
    elif lie == 8:  # bytes shorter than declared: the frame ends early
        data = data[: rng.randrange(128)]
    elif lie == 9:
        meta["z"] = rng.choice(["zstd", "gzip", None, 1])
    elif lie == 10:  # int tensor with quantization, or bool with a float codec
        meta.update(dtype=rng.choice(["int64", "bool"]), q="bf16")
    else:
        meta = rng.choice([[], "meta", 3, None, {"dtype": "float64"}])
    return meta, data


def _malformed_payload(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    valid = _frame({"v": 1, "tree": _ARGS_TREE, "tensors": [_good_meta()]}, [bytes(128)])
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:  # truncated msgpack
        return valid[: rng.randrange(0, len(valid) - 1)]
    if kind == 2:  # a lying header length
        return b"\xce" + struct.pack(">I", rng.choice([2**32 - 1, 2**24, 10_000])) + valid[5:]
    if kind == 3:
        meta, data = _tensor_meta(rng)
        return _frame({"v": 1, "tree": _ARGS_TREE, "tensors": [meta]}, [data])
    if kind == 4:  # tree refers to tensors the frame lacks, or to unknown extensions
        tree = rng.choice(
            [
                _tree({"args": [_ref(5)], "kwargs": {}}),
                _tree({"args": [msgpack.ExtType(9, b"x")], "kwargs": {}}),
                _tree({"args": [msgpack.ExtType(1, b"\x00")], "kwargs": {}}),
                b"\x91" * 5000 + b"\xc0",  # deeply nested lists
                b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
                rng.randbytes(20),
            ]
        )
        return _frame({"v": 1, "tree": tree, "tensors": [_good_meta()]}, [bytes(128)])
    if kind == 5:  # wrong version or shape of the frame header
        meta = rng.choice(
            [{"v": 2, "tree": _ARGS_TREE, "tensors": []}, {"v": 1, "tree": "x", "tensors": 3}, [1]]
        )
        return _frame(meta, [])
    if kind == 6:  # too many tensors
        count = rng.choice([9, 100, 5000])
        meta = {"v": 1, "tree": _ARGS_TREE, "tensors": [_good_meta()] * count}
        return _frame(meta, [])
    if kind == 7:  # trailing garbage after a valid frame
        return valid + rng.randbytes(rng.randrange(1, 64))
    if kind == 8:  # a valid frame of the wrong structure for Compute
        value = rng.choice(
            [[1, 2], {"args": 3, "kwargs": {}}, {"args": [], "kwargs": {1: 2}}, None]
        )
        return codec.encode(value)
    # well-formed, but a tensor over the element limit
    big = {"dtype": "uint8", "shape": [1 << 16], "q": "none", "z": "none", "n": 1 << 16}
    big["s"] = 1 << 16
    return _frame({"v": 1, "tree": _ARGS_TREE, "tensors": [big]}, [bytes(1 << 16)])


def _good_meta() -> dict:
    return {"dtype": "float64", "shape": [2, 8], "q": "none", "z": "none", "n": 128, "s": 128}


def _message(rng: random.Random, live: list[str]) -> tuple[str, bytes, bool]:
    """(method, serialized request, whether it is malformed)."""
    roll = rng.random()
    request_id = rng.choice([*live[-4:], "f" * 32, "", "../../etc", "x" * 100]) if live else "a"
    if roll < 0.05:  # not a protobuf message at all, or one of the wrong type
        return rng.choice(["Compute", "Backward"]), rng.randbytes(rng.randrange(1, 200)), True
    if roll < 0.10:  # the header lies about the payload size
        payload = codec.encode({"args": [torch.ones(2, 8, dtype=torch.float64)], "kwargs": {}})
        header = pb.Header(request_id="b" * 32, payload_bytes=len(payload) + rng.randrange(1, 99))
        return "Compute", pb.Frame(header=header, payload=payload).SerializeToString(), True
    if roll < 0.13:  # a valid forward kept for a Backward that never comes: fills the cache
        request_id = f"{rng.getrandbits(128):032x}"
        live.append(request_id)
        payload = codec.encode(
            {"args": [torch.randn(2, 8, dtype=torch.float64)], "kwargs": {}}, compression="none"
        )
        header = pb.Header(
            request_id=request_id,
            keep_context=True,
            training=True,
            payload_bytes=len(payload),
            needs_input_grad=[True],
        )
        return "Compute", pb.Frame(header=header, payload=payload).SerializeToString(), False
    if roll < 0.25 and live:  # Backward on a real context with NaN, inf, wrong shape, wrong seq
        grad = rng.choice(
            [
                torch.full((2, 8), float("nan"), dtype=torch.float64),
                torch.full((2, 8), float("-inf"), dtype=torch.float64),
                torch.ones(3, 8, dtype=torch.float64),
                torch.ones(2, 8, dtype=torch.int64),
            ]
        )
        seq = rng.choice([1, 1, 1, 0, 7, 2**32 - 1])
        payload = codec.encode({"grads": [grad]}, compression="none")
        header = pb.Header(
            request_id=rng.choice(live),
            backward_seq=seq,
            payload_bytes=len(payload),
            needs_input_grad=rng.choice([[True], [], [True, True], [False]]),
        )
        return "Backward", pb.Frame(header=header, payload=payload).SerializeToString(), True
    if roll < 0.35:  # Backward for ids that do not exist (or belong to nobody here)
        payload = _frame({"v": 1, "tree": _GRADS_TREE, "tensors": [_good_meta()]}, [bytes(128)])
        header = pb.Header(request_id=request_id, backward_seq=1, payload_bytes=len(payload))
        return "Backward", pb.Frame(header=header, payload=payload).SerializeToString(), True
    payload = _malformed_payload(rng)
    method = rng.choice(["Compute", "Compute", "Backward"])
    header = pb.Header(
        request_id="c" * 32,
        keep_context=rng.random() < 0.5,
        backward_seq=1,
        payload_bytes=len(payload),
        needs_input_grad=rng.choice([[], [True], [False] * 3]),
    )
    return method, pb.Frame(header=header, payload=payload).SerializeToString(), True


def _train_one_step_and_compare(address: str) -> None:
    """A correct step after the storm: outputs and gradients match the same trunk run here."""
    local = dropout_trunk().eval()
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))
    with RemoteModule(address, options=ClientOptions(retries=0)) as remote:
        remote.eval()
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.5)
        xr = x.clone().requires_grad_()
        out = remote(xr)
        out.square().sum().backward()
        xl = x.clone().requires_grad_()
        local(xl).square().sum().backward()
        assert torch.equal(out, local(x))
        assert torch.equal(xr.grad, xl.grad)
        optimizer.step()
        with torch.no_grad():
            for param in local.parameters():
                param -= 0.5 * param.grad
        remote_state = remote.remote_state_dict()
        for name, param in local.named_parameters():
            assert torch.equal(remote_state[name], param), name


def test_ten_thousand_malformed_messages(tmp_path):
    process, address = spawn_server("factories:dropout_trunk", *LIMITS)
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=30)
        calls = {m: channel.unary_unary(TRUNK + m) for m in ("Compute", "Backward")}
        rng = random.Random(SEED)
        print(f"fuzz seed {SEED}")
        sessions = [f"fuzz{i}" for i in range(4)]
        live: list[str] = []
        codes: Counter[str] = Counter()
        unexpected = []
        rss_after_warmup = 0
        sent_malformed = index = 0
        # Eight calls in flight at a time: the server's workers see concurrent garbage too.
        while sent_malformed < MESSAGES:
            if index == 3000:  # after the cache filled and the allocator warmed up
                rss_after_warmup = rss_bytes(process.pid)
            batch = []
            for index in range(index, index + 8):  # noqa: B020 - continues the count
                method, request, malformed = _message(rng, live)
                sent_malformed += malformed
                session = rng.choice(sessions) if rng.random() > 0.02 else "bad session id!"
                metadata = (("ra-session", session),)
                future = calls[method].future(request, timeout=60, metadata=metadata)
                batch.append((index, method, malformed, future))
            for index, method, malformed, future in batch:
                exc = future.exception()
                if exc is None:
                    codes["OK"] += 1
                    if malformed:
                        unexpected.append((index, method, "OK", "a malformed message passed"))
                    continue
                code = exc.code()
                codes[code.name] += 1
                if code not in REFUSALS:
                    unexpected.append((index, method, code, exc.details()))
            index += 1
        print(dict(codes))
        assert not unexpected, unexpected[:10]
        assert process.poll() is None, "the server died"
        assert codes["OK"] > 100  # the valid forwards went through, so the cache was exercised
        growth = rss_bytes(process.pid) - rss_after_warmup
        # Limits: 2 MiB of contexts, 1 MiB frames; allocator slack on top, nothing per message
        # (40,000 messages plateau at the same size as 10,000).
        assert growth < 80 << 20, f"server memory grew by {growth >> 20} MiB"
        end_session = channel.unary_unary(TRUNK + "EndSession")
        for session in sessions:  # the fuzzer hangs up: its kept forwards go with its sessions
            end = pb.EndSessionRequest().SerializeToString()
            end_session(end, metadata=(("ra-session", session),), timeout=30)
        _train_one_step_and_compare(address)
        channel.close()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


class _Echo(nn.Module):
    def forward(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return [x * 2 for x in xs]


_metas = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*codec.DTYPES, "float128", "object"])
        | st.integers(-(2**63), 2**63),
        "shape": st.lists(st.integers(-(2**63), 2**64 - 1), max_size=20) | st.none(),
        "q": st.sampled_from(["none", "bf16", "fp16", "int8", "nope"]),
        "z": st.sampled_from(["none", "lz4", "zip"]),
        "n": st.integers(-1, 2**40),
        "s": st.integers(-1, 2**40),
    },
    optional={
        "scale": st.floats(allow_nan=True, allow_infinity=True),
        "block": st.integers(-5, 2**40),
    },
)


_ECHO_LIMITS = Limits(max_tensor_bytes=1 << 16, max_tensor_elements=1 << 14, max_tensors=4)


@pytest.fixture(scope="module")
def echo_server():
    from remote_autograd import serve

    server = serve(_Echo(), options=ServerOptions(limits=_ECHO_LIMITS))
    channel = grpc.insecure_channel(server.address)
    yield (
        server,
        channel.stream_stream(TRUNK + "ComputeStream"),
        channel.unary_unary(TRUNK + "Release"),
    )
    channel.close()
    server.stop(grace=None)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(metas=st.lists(_metas, min_size=1, max_size=3), body=st.binary(max_size=512))
# Frames that tell the truth, so the test sees the server accept too (not only refuse).
@example(metas=[_good_meta()], body=bytes(range(128)))
@example(
    metas=[{**_good_meta(), "dtype": "int32", "shape": [4, 8]}, {**_good_meta(), "shape": [16]}],
    body=bytes(range(128)),
)
@example(metas=[{**_good_meta(), "n": 127}], body=bytes(128))  # and one that lies
# Lies of the wrong type or size, once answered INTERNAL with a logged traceback:
@example(metas=[{**_good_meta(), "dtype": ["float32"]}], body=bytes(128))  # unhashable
@example(metas=[{**_good_meta(), "dtype": {"x": 1}}], body=bytes(128))
@example(metas=[{**_good_meta(), "shape": [2**63, 0], "n": 0, "s": 0}], body=b"")  # 0 elements
@example(metas=[{**_good_meta(), "shape": [2**62, 4, 0], "n": 0, "s": 0}], body=b"")
@example(metas=[{**_good_meta(), "z": "lz4", "n": 128.0, "s": 16}], body=bytes(16))  # float n
def test_lying_tensor_headers_are_refused_before_allocating(echo_server, metas, body):
    """Streamed (so the frame holds bytes of max_inflight_bytes while it is checked) and kept
    for a Backward (so an accepted frame leaves a context). The local codec is the oracle: the
    server accepts exactly the frames it decodes, and answers each tensor doubled."""
    server, compute, release = echo_server
    refs = [_ref(i) for i in range(len(metas))]
    payload = _frame(
        {"v": 1, "tree": _tree({"args": refs, "kwargs": {}}), "tensors": metas},
        [body[: m["s"]] if 0 <= m["s"] < len(body) else body for m in metas],
    )
    try:
        expected = codec.Decoder(limits=_ECHO_LIMITS).decode(bytearray(payload))
    except codec.CodecError:
        expected = None
    header = pb.Header(
        request_id="hyp", keep_context=True, training=True, payload_bytes=len(payload)
    )
    request = pb.Frame(header=header, payload=payload)
    metadata = (("ra-session", "hyp"),)
    try:
        replies = list(compute(iter([request.SerializeToString()]), timeout=30, metadata=metadata))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert expected is None, f"the server refused a valid frame: {exc.details()}"
        assert server.stats()["contexts"] == 0
    else:
        assert expected is not None, "the server accepted a frame the codec refuses"
        reply = pb.Frame.FromString(replies[0])
        out = codec.decode(b"".join(pb.Frame.FromString(r).payload for r in replies))
        assert reply.header.request_id == "hyp"
        assert len(out) == len(expected["args"])
        for got, sent in zip(out, expected["args"], strict=True):
            assert torch.equal(got, sent * 2)
        assert server.stats()["contexts"] == 1  # kept for its Backward
        request_ids = pb.ReleaseRequest(request_ids=["hyp"]).SerializeToString()
        assert pb.ReleaseReply.FromString(release(request_ids, metadata=metadata)).released == 1
        assert server.stats()["contexts"] == 0
    assert server.stats()["inflight_bytes"] == 0  # its reservation ended with the call


def test_streamed_frame_declaring_too_much_is_refused_before_allocating(start_server):
    server = start_server(_Echo(), ServerOptions(max_inflight_bytes=1 << 20))
    channel = grpc.insecure_channel(server.address)
    stream = channel.stream_stream(TRUNK + "ComputeStream")
    metadata = (("ra-session", "s1"),)
    cases = {
        # over max_payload_bytes (1 GiB default): refused by the frame check
        4 << 30: "max_payload_bytes",
        # under it, but over what the server lets calls in flight hold together: at all
        64 << 20: "more than max_inflight_bytes=1048576 allows at all",
    }
    for declared, limit in cases.items():
        first = pb.Frame(header=pb.Header(payload_bytes=declared), payload=b"x" * 10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([first.SerializeToString()]), timeout=30, metadata=metadata))
        assert info.value.code() in REFUSALS
        assert limit in info.value.details()
    assert server.stats()["inflight_bytes"] == 0
    channel.close()
