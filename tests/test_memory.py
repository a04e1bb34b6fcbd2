"""Memory bounds that hold: ``max_context_bytes`` counts what a kept forward really holds
(saved activations included), a cancelled or failed stream lets go of its buffer at once, and
neither is logged as a server error. The RSS tests watch a real server in a child process."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from conftest import rss_bytes, spawn_server
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    CodecError,
    LimitExceeded,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TrunkError,
    codec,
    frames,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc

MiB = 1 << 20


def _stop(process) -> str:
    process.kill()
    _, err = process.communicate(timeout=30)
    return err


def test_a_kept_forward_counts_its_saved_activations(start_server):
    # Linear saves its input (the leaf) and weight (the trunk's, not counted), GELU its input
    # h1, the second Linear GELU's output h2: held = x + h1 + h2 + output.
    batch, width = 6, 8
    server = start_server(
        nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)).double()
    )
    remote = RemoteModule(server.address)
    x = torch.randn(batch, width, dtype=torch.float64, requires_grad=True)
    out = remote(x)
    expected = 8 * (batch * width + 2 * batch * 4 * width + batch * width)
    assert server.stats()["context_bytes"] == expected
    out.sum().backward()  # the counted context still works
    # Until released, the context keeps its reply (x's gradient) for a retry: counted too.
    assert x.grad is not None and server.stats()["context_bytes"] in (0, expected + x.nbytes)


def test_views_and_weights_are_not_counted_twice(start_server):
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(10, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # x[:5] and x[5:] are views of the input; both products save the parameter.
            return torch.cat([x[:5] * self.scale, x[5:] * self.scale])

    server = start_server(Views())
    remote = RemoteModule(server.address)
    x = torch.randn(10, 10, dtype=torch.float64, requires_grad=True)
    out = remote(x)
    assert server.stats()["context_bytes"] == 8 * (100 + 100)  # the input once, the output
    out.sum().backward()


def test_weights_gathered_into_fresh_memory_are_not_counted(start_server):
    """As FSDP does for each forward: the weight used is a new Parameter (saved as a view of
    it, ``weight.t()``), not the one the module holds, yet a weight all the same."""

    class Gathered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 64, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gathered = nn.Parameter(self.weight.detach().clone())  # fresh storage
            return nn.functional.linear(x, gathered)

    server = start_server(Gathered())
    remote = RemoteModule(server.address)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    remote(x)
    assert server.stats()["context_bytes"] == 8 * (3 * 64 + 3 * 64)  # the input, the output


def test_activations_push_a_context_over_the_limit(start_server):
    # Inputs and outputs (2 x 2 KiB) fit in 5 KiB, their 8 KiB of activations do not.
    server = start_server(
        nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).double(),
        ServerOptions(max_context_bytes=5 * 1024),
    )
    remote = RemoteModule(server.address)
    with pytest.raises(LimitExceeded, match="max_context_bytes=5120"):
        remote(torch.zeros(32, 8, dtype=torch.float64, requires_grad=True))
    assert server.stats()["contexts"] == 0
    small = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    remote(small).sum().backward()  # still serving
    assert small.grad is not None


class Tabled(nn.Module):
    """Doubles ``x``; takes a ``table`` of plain numbers, which it does not read."""

    def forward(self, x: torch.Tensor, table: list | None = None) -> torch.Tensor:
        return x * 2


def test_plain_values_a_kept_forward_holds_count_against_max_context_bytes(start_server):
    """A list of 100,000 numbers in the arguments is ~3.6 MB of Python objects that the kept
    forward holds for its recompute: over max_context_bytes=2 MiB, refused (only its tensors
    were counted: contexts of a few KiB each held 8 MiB apiece). An ordinary call's tree is
    not counted."""
    server = start_server(Tabled(), ServerOptions(max_context_bytes=2 << 20))
    remote = RemoteModule(server.address)
    x = torch.zeros(2, 4, requires_grad=True)
    with pytest.raises(LimitExceeded, match="max_context_bytes=2097152"):
        remote(x, table=list(range(100_000)))
    assert server.stats()["contexts"] == 0
    remote(x, table=list(range(10))).sum().backward()
    # Until released: the input, the output and the reply kept for a retry (x's gradient).
    assert server.stats()["context_bytes"] in (0, 3 * 2 * 4 * 4)
    assert torch.equal(x.grad, torch.full((2, 4), 2.0))


class Unsendable(nn.Module):
    """Returns what its ``kind`` says: a map keyed by a tensor (the client refuses it), or a
    set (the server cannot encode it)."""

    def forward(self, x: torch.Tensor, kind: str = "") -> object:
        y = x * 2
        return {torch.zeros(1): y} if kind == "tensor key" else {"y": y, "set": {1}}


@pytest.mark.parametrize("kind", ["tensor key", "set"])
def test_a_forward_whose_reply_cannot_be_read_keeps_no_context(start_server, kind):
    """The server cannot encode the trunk's output, or the client refuses it: either way no
    Backward will come, so the kept forward goes at once (it stayed until context_ttl)."""
    server = start_server(Unsendable())
    remote = RemoteModule(server.address)
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises((CodecError, TrunkError), match="map keys|cannot be sent"):
        remote(x, kind=kind)
    wait_for(lambda: server.stats()["contexts"] == 0, timeout=10.0)
    assert server.stats()["context_bytes"] == 0


def test_kept_forwards_stay_within_max_context_bytes_inrss_bytes():
    # Each forward of a 16 MiB input holds 96 MiB (input, GELU's input and output, output);
    # counted as 32 MiB, four would be kept under 128 MiB (384 MiB held).
    process, address = spawn_server("factories:wide_mlp", "--max-context-bytes", str(128 * MiB))
    try:
        remote = RemoteModule(address, options=ClientOptions(compression="none"))
        remote(torch.zeros(4, 256, requires_grad=True)).sum().backward()  # warm up
        before = rss_bytes(process.pid)
        kept = [remote(torch.randn(16384, 256, requires_grad=True)) for _ in range(6)]
        growth = rss_bytes(process.pid) - before
        print(f"RSS growth {growth / MiB:.0f} MiB")
        assert growth < 200 * MiB, f"the server grew by {growth // MiB} MiB"
        kept[-1].sum().backward()  # the newest context is still there
        remote.close()
    finally:
        err = _stop(process)
    assert "Traceback" not in err and " ERROR " not in err, err[-2000:]


def test_used_forwards_leave_nothing_behind_in_rss():
    # Each training step keeps a 32 MiB softmax output for Backward. Counting it must not keep
    # it: eight steps once grew the server by the graph of every step (~100 MiB each).
    process, address = spawn_server("factories:softmax_mlp")
    try:
        remote = RemoteModule(address, options=ClientOptions(compression="none"))
        x = torch.randn(16384, 256)

        def step() -> None:
            remote(x.clone().requires_grad_()).sum().backward()

        step()
        step()  # the allocator and the receive pool warmed up
        before = rss_bytes(process.pid)
        for _ in range(8):
            step()
        wait_for(lambda: rss_bytes(process.pid) - before < 100 * MiB, timeout=30)
        remote.close()
    finally:
        err = _stop(process)
    assert "Traceback" not in err, err[-2000:]


def _stalled_stream(size: int, sent: int, overrun: bool):
    chunk = b"\0" * MiB
    yield pb.Frame(header=pb.Header(request_id="a" * 32, payload_bytes=size), payload=chunk)
    for _ in range(sent // MiB - 1):
        yield pb.Frame(payload=chunk)
    if overrun:  # more than declared: refused by the server (CodecError)
        for _ in range((size - sent) // MiB + 1):
            yield pb.Frame(payload=chunk)
    time.sleep(10)  # then stall until the deadline cancels the call


def test_cancelled_and_failed_streams_free_their_buffers():
    process, address = spawn_server(
        "factories:dropout_trunk", "--max-inflight-bytes", str(100 * MiB)
    )
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = pb_grpc.TrunkStub(channel)
            codes = []
            before = rss_bytes(process.pid)
            for index in range(6):
                frames = _stalled_stream(64 * MiB, 16 * MiB, overrun=index % 2 == 1)
                try:
                    for _ in stub.ComputeStream(frames, timeout=1, metadata=(("ra-session", "s"),)):
                        pass
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            growth = rss_bytes(process.pid) - before
            print(f"RSS growth {growth / MiB:.0f} MiB")
            # One 64 MiB buffer stays pooled for reuse; six kept ones would be 384 MiB.
            assert growth < 200 * MiB, f"the server grew by {growth // MiB} MiB"
            assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
            assert grpc.StatusCode.INVALID_ARGUMENT in codes
            assert set(codes) <= {
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.INVALID_ARGUMENT,
            }
            # Every byte of the in-flight budget came back: a full-size frame still fits.
            remote = RemoteModule(address, options=ClientOptions(bulk=False, compression="none"))
            x = torch.randn(9000, 8, dtype=torch.float64)
            assert remote(x).shape == (9000, 8)
            remote.close()
    finally:
        err = _stop(process)
    # Cancellations and refusals are expected: no ERROR lines, no tracebacks.
    assert "Traceback" not in err and " ERROR " not in err, err[-2000:]


def _aliases(tensor: torch.Tensor, buffer: bytearray) -> bool:
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    return start <= tensor.data_ptr() < start + len(buffer)


def test_a_value_that_views_a_small_part_of_its_frame_is_copied_out():
    """A raw tensor aliases its frame's buffer and keeps all of it alive, but a kept one is
    counted as its own bytes. A 4-byte input beside 1 MiB that no value refers to is copied
    out; a frame of one large tensor is still decoded without a copy."""
    from test_fuzz import _frame, _ref, _tree

    big = bytes(MiB)
    meta = {
        "v": 1,
        "tree": _tree({"args": [_ref(0)], "kwargs": {}}),  # the 1 MiB tensor #1: no value
        "tensors": [
            {"dtype": "float32", "shape": [1], "q": "none", "z": "none", "n": 4, "s": 4},
            {"dtype": "uint8", "shape": [MiB], "q": "none", "z": "none", "n": MiB, "s": MiB},
        ],
    }
    buffer = bytearray(_frame(meta, [torch.tensor([2.5]).numpy().tobytes(), big]))
    small = codec.decode(buffer)["args"][0]
    assert torch.equal(small, torch.tensor([2.5])) and not _aliases(small, buffer)

    whole = torch.arange(MiB // 4, dtype=torch.float32)
    buffer = bytearray(codec.Encoder(compression="none").encode({"args": [whole], "kwargs": {}}))
    decoded = codec.decode(buffer)["args"][0]
    assert torch.equal(decoded, whole) and _aliases(decoded, buffer)
    # A raw tensor beside LZ4 and quantized ones that the values use: no copy either.
    sparse = torch.randn(MiB // 4, generator=torch.Generator().manual_seed(0)).relu()
    lossy = codec.Encoder(compression="none", quantization="bf16")
    for encoder in (codec.Encoder(compression="lz4"), lossy):  # ~600 KiB LZ4; 1 MiB of bf16
        value = {"args": [whole, sparse, torch.arange(9)], "kwargs": {}}
        buffer = bytearray(encoder.encode(value))
        decoded = codec.decode(buffer)["args"]
        raw = decoded[2] if encoder.quantization == "bf16" else decoded[0]
        assert torch.equal(decoded[2], value["args"][2]) and _aliases(raw, buffer)


def test_a_compute_with_values_the_trunk_does_not_read_is_refused(start_server):
    """Another key beside args and kwargs could carry bytes a kept input holds alive
    uncounted: refused, nothing kept."""
    server = start_server(nn.Linear(2, 2).double())
    frame = codec.Encoder().encode(
        {"args": [torch.ones(1, 2, dtype=torch.float64)], "kwargs": {}, "extra": torch.ones(9)}
    )
    header = pb.Header(request_id="a" * 32, payload_bytes=len(frame), keep_context=True)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.TrunkStub(channel).Compute(
            pb.Frame(header=header, payload=frame), metadata=(("ra-session", "s1"),)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Compute expects a map {'args'" in refused.value.details()
    assert server.stats()["contexts"] == 0


def test_a_loaded_optimizer_state_holds_no_frame(start_server):
    """torch keeps loaded tensors as given: the server keeps copies, not views of the frame
    (which would keep every byte of the frame alive for the session's life)."""
    server = start_server(nn.Linear(2, 2).double())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
    remote(torch.ones(3, 2, dtype=torch.float64)).sum().backward()
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
    (session,) = server.engine.sessions.values()
    buffers = [state["momentum_buffer"] for state in session.optimizer.state.values()]
    assert len(buffers) == 2
    # A view of a received buffer has storage that cannot be resized; a copy's can.
    assert all(b.untyped_storage().resizable() for b in buffers)
    remote.close()


def _address(buffer: memoryview) -> int:
    return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()  # the tensor goes at once


def test_a_decoded_tensor_never_keeps_a_pooled_buffer_larger_than_its_frame():
    """The receive pool hands a free buffer of up to twice a frame's size to it, and the frame's
    raw tensors aliased it: a kept input of 1.1 MiB held a 2 MiB buffer, counted as 1.1 MiB
    (a server held up to twice max_context_bytes). A tensor whose buffer is much larger than
    what the frame's values use is copied out; one that fills its buffer still aliases it."""
    x = torch.randn(144 * 1024, dtype=torch.float64)  # 1.125 MiB
    frame = codec.encode({"x": x}, compression="none")
    for spare in (2 * MiB, len(frame)):
        pool = frames._BufferPool(max_buffers=4)  # its own: the process-wide one holds others'
        held = pool.take(spare)
        start = _address(held)
        del held  # free in the pool
        view = pool.take(len(frame))
        assert _address(view) == start  # the same buffer, handed out again
        view[:] = frame
        got = codec.Decoder().decode(view)["x"]
        assert torch.equal(got, x)
        assert (start <= got.data_ptr() < start + spare) == (spare == len(frame)), spare


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_loss_kept_for_logging_does_not_keep_the_trunks_inputs(start_server, micro_batches):
    """``losses.append(loss)`` keeps each step's graph object reachable after its backward,
    as it does locally; the inputs the client kept to resend (for a forward the server lost)
    must go with the backward, or every step's trunk inputs stay in memory."""
    server = start_server(nn.Linear(8, 8).double())
    remote = RemoteModule(server.address, options=ClientOptions(micro_batches=micro_batches))
    losses, storages = [], []
    for _ in range(3):
        x = torch.randn(4, 8, dtype=torch.float64)
        storages.append(x.untyped_storage()._weak_ref())
        loss = remote(x).square().sum()
        loss.backward()
        losses.append(loss)
        del x
    assert all(torch.UntypedStorage._expired(weak) for weak in storages)
    assert len(losses) == 3
