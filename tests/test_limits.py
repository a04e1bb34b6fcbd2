"""Every limit is refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and a message naming it;
non-finite numbers never reach the trunk's weights; nothing is lost by a refused call."""

from __future__ import annotations

import copy
import math
import threading

import grpc
import pytest
import torch
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    CodecError,
    ContextNotFound,
    InvalidRequest,
    LimitExceeded,
    Limits,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TrunkError,
)
from remote_autograd._proto import remote_autograd_pb2 as pb


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 4).double()


def _weights(server) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in server.engine.module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("limits", "tensor", "named"),
    [
        (Limits(max_tensor_elements=10), torch.zeros(11), "max_tensor_elements=10"),
        (Limits(max_tensor_bytes=80), torch.zeros(11, dtype=torch.float64), "max_tensor_bytes=80"),
        (Limits(max_ndim=3), torch.zeros(1, 1, 1, 1), "max_ndim=3"),
        (Limits(max_payload_bytes=1000), torch.zeros(300), "max_payload_bytes=1000"),
        (Limits(max_tensors=2), [torch.zeros(1)] * 3, "max_tensors=2"),
        (Limits(max_header_bytes=200), {f"k{i}": i for i in range(50)}, "max_header_bytes=200"),
        (Limits(max_decoded_bytes=1000), [torch.zeros(200)] * 2, "max_decoded_bytes=1000"),
        (Limits(max_depth=4), [[[[torch.zeros(1)]]]], "max_depth=4"),
        (Limits(max_depth=4), ((((1,),),),), "max_depth=4"),
    ],
    ids=[
        "elements",
        "tensor-bytes",
        "ndim",
        "payload",
        "tensors",
        "header",
        "decoded",
        "lists",
        "tuples",
    ],
)
def test_frame_limits_are_named(start_server, limits, tensor, named):
    server = start_server(nn.Identity(), ServerOptions(limits=limits))
    remote = RemoteModule(server.address, options=ClientOptions(compression="none"))
    with pytest.raises(CodecError, match=named) as info:
        remote(tensor)
    assert info.value.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert torch.equal(remote(torch.ones(2)), torch.ones(2))  # still serving
    assert server.stats()["inflight_bytes"] == 0


def test_message_over_the_grpc_size_is_resource_exhausted(start_server):
    server = start_server(nn.Identity(), ServerOptions(unary_payload_bytes=1 << 16))
    channel = grpc.insecure_channel(server.address)
    compute = channel.unary_unary("/remote_autograd.v1.Trunk/Compute")
    big = pb.Frame(header=pb.Header(payload_bytes=4 << 20), payload=bytes(4 << 20))
    with pytest.raises(grpc.RpcError) as info:
        compute(big.SerializeToString(), timeout=30, metadata=(("ra-session", "s"),))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    channel.close()


def test_context_bigger_than_max_context_bytes(start_server):
    server = start_server(_linear(), ServerOptions(max_context_bytes=1000))
    remote = RemoteModule(server.address)
    with pytest.raises(LimitExceeded, match="exceeds max_context_bytes=1000"):
        remote(torch.zeros(100, 4, dtype=torch.float64, requires_grad=True))
    assert server.stats()["contexts"] == 0
    remote(torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)).sum().backward()


def test_max_sessions(start_server):
    server = start_server(_linear(), ServerOptions(max_sessions=2))
    first, second, third = (RemoteModule(server.address) for _ in range(3))
    x = torch.ones(1, 4, dtype=torch.float64)
    first(x), second(x)
    with pytest.raises(LimitExceeded, match="max_sessions=2"):
        third(x)
    assert server.stats()["sessions"] == 2


def test_one_session_cannot_push_out_the_contexts_of_another(start_server):
    options = ServerOptions(max_contexts=8, max_session_contexts=2)
    server = start_server(_linear(), options)
    strict = ClientOptions(recover_contexts=False)  # an evicted context would be an error
    patient, greedy = (RemoteModule(server.address, options=strict) for _ in range(2))
    x = torch.ones(1, 4, dtype=torch.float64, requires_grad=True)
    kept = patient(x)
    outputs = [greedy(x) for _ in range(10)]  # keeps every graph alive: never released
    assert server.stats()["contexts"] == 3  # 2 of greedy's, 1 of patient's
    kept.sum().backward()  # patient's context survived greedy's ten
    outputs[-1].sum().backward()
    with pytest.raises(ContextNotFound, match="max_session_contexts=2"):
        outputs[0].sum().backward()


def test_non_finite_output_gradients_are_refused(start_server):
    """A Backward with NaN/inf gradients accumulates nothing; the client says so (GradScaler
    skips such a step, RemoteOptimizer.step() refuses it): they never reach the weights."""
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    before = _weights(server)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = remote(torch.ones(2, 4, dtype=torch.float64, requires_grad=True))
        y.backward(torch.full_like(y, bad))
        assert server.engine.sessions.values()[0].grads == {}
        with pytest.raises(FloatingPointError, match="not finite"):
            optimizer.step()
        optimizer.zero_grad()
    optimizer.step()  # no gradients: SGD leaves the weights as they were
    assert _same(before, _weights(server))


def test_non_finite_inputs_never_reach_the_weights(start_server):
    """Finite output gradients through a NaN input still give NaN parameter gradients: the
    server checks those before accumulating them."""
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    good = torch.ones(2, 4, dtype=torch.float64)
    remote(good).sum().backward()  # one good backward accumulated
    held = {k: v.clone() for k, v in server.engine.sessions.values()[0].grads.items()}
    bad = good.clone()
    bad[0, 0] = float("nan")
    remote(bad).sum().backward()  # accepted, not accumulated
    grads = server.engine.sessions.values()[0].grads
    assert _same(held, grads)  # the good one is still there, untouched
    with pytest.raises(FloatingPointError, match="not finite"):
        optimizer.step()
    optimizer.zero_grad()
    remote(good).sum().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in _weights(server).values())


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_learning_rates_are_refused(start_server, value):
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    with pytest.raises(TypeError, match="plain numbers"):
        RemoteOptimizer(remote, "SGD", lr=value)
    with pytest.raises(InvalidRequest, match="not a finite number"):  # past the client check
        remote.client.configure_optimizer("SGD", {"lr": value})
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    before = _weights(server)
    optimizer.param_groups[0]["lr"] = value  # what a broken LR scheduler would do
    with pytest.raises(InvalidRequest, match="lr"):
        optimizer.step()
    optimizer.param_groups[0]["betas"] = (0.9, value)
    optimizer.param_groups[0]["lr"] = 0.01
    with pytest.raises(InvalidRequest, match="betas"):
        optimizer.step()
    assert _same(before, _weights(server))
    optimizer.param_groups[0]["betas"] = (0.9, 0.999)
    optimizer.step()  # the step number was not used up by the refusals
    assert not _same(before, _weights(server))


def test_non_finite_grad_scale_and_optimizer_state_are_refused(start_server):
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    before = _weights(server)
    state = optimizer.state_dict()
    state["state"][0]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(InvalidRequest, match="optimizer state holds NaN"):
        optimizer.load_state_dict(state)
    with pytest.raises(InvalidRequest, match="grad_scale must be finite"):
        _raw_step(remote, 2, math.inf)
    assert _same(before, _weights(server))


def _raw_step(remote: RemoteModule, step: int, scale: float) -> None:
    remote.client.scale_grads_later(scale)
    remote.client.step(step, [{}])


@pytest.mark.parametrize("request_id", ["a" * 65, "abc\n", "abc/def", ""])
def test_request_ids_are_checked_whole(start_server, request_id):
    from remote_autograd import codec
    from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc

    server = start_server(_linear())
    payload = codec.encode({"args": [torch.zeros(1, 4, dtype=torch.float64)], "kwargs": {}})
    header = pb.Header(
        request_id=request_id,
        keep_context=True,
        training=True,
        payload_bytes=len(payload),
        needs_input_grad=[True],
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compute(pb.Frame(header=header, payload=payload), metadata=(("ra-session", "s"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request id must match" in info.value.details()
    assert server.stats()["contexts"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_load_state_refuses_non_finite_parameters(start_server, value):
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    before = _weights(server)
    state = remote.remote_state_dict()
    state["weight"][1, 2] = value
    with pytest.raises(InvalidRequest, match="parameter weight holds NaN or inf; refused"):
        remote.load_remote_state_dict(state)
    assert _same(before, _weights(server))
    assert server.stats()["weights_version"] == 0  # nothing was loaded
    state["weight"][1, 2] = 0.25
    remote.load_remote_state_dict(state)  # a finite one is loaded
    assert server.engine.module.weight[1, 2].item() == 0.25
    assert server.stats()["weights_version"] == 1


@pytest.mark.parametrize("name", ["0.weight", "1.running_var"], ids=["parameter", "buffer"])
def test_load_state_refuses_values_that_overflow_the_trunks_dtype(start_server, name):
    """A float64 1e300 is finite, and inf once stored in a float32 weight or statistic."""
    torch.manual_seed(0)
    server = start_server(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    remote = RemoteModule(server.address)
    before = {k: v.clone() for k, v in server.engine.module.state_dict().items()}
    state = {k: v.double() if v.is_floating_point() else v for k, v in remote.state_dict().items()}
    state[name][0] = 1e300
    with pytest.raises(RuntimeError, match=f"{name} holds NaN or inf as the trunk.s float32 "):
        remote.load_state_dict(state)
    after = server.engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    state[name][0] = 2.5  # finite as float32 too: loaded
    remote.load_state_dict(state)
    assert torch.all(server.engine.module.state_dict()[name][0] == 2.5)


def test_load_state_refuses_integers_that_overflow_a_half_precision_trunk(start_server):
    """An int32 100000 is finite, and inf in a float16 weight (integers were once let through
    unconverted, and the inf then stopped every checkpoint of the server)."""
    torch.manual_seed(0)
    server = start_server(nn.Linear(4, 4).half())
    remote = RemoteModule(server.address)
    before = {k: v.clone() for k, v in server.engine.module.state_dict().items()}
    state = remote.state_dict()
    state["weight"] = torch.full((4, 4), 100_000, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="weight holds NaN or inf as the trunk.s float16 "):
        remote.load_state_dict(state)
    after = server.engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    state["weight"] = torch.full((4, 4), 3, dtype=torch.int32)  # finite as float16: loaded
    remote.load_state_dict(state)
    assert torch.all(server.engine.module.weight == 3)


def test_an_optimizer_that_cannot_step_is_refused_and_changes_nothing(start_server):
    """An optimizer state of the wrong shape (loaded) or an option this device cannot run:
    the optimizer's own error, as INVALID_ARGUMENT, and nothing changed."""
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = remote.client.get_state(parameters=False, optimizer=True)["optimizer"]
    for entry in state["state"].values():  # no larger than its parameter, or LoadState refuses
        entry["momentum_buffer"] = torch.zeros(1, 3, dtype=torch.float64)
    remote.client.load_state({"optimizer": state})
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    before = _weights(server)
    with pytest.raises(InvalidRequest, match=r"SGD.step\(\) raised RuntimeError: The size"):
        optimizer.step()
    assert _same(before, _weights(server))
    capturable = RemoteOptimizer(remote, "Adam", lr=0.1, capturable=True)  # needs a GPU
    with pytest.raises(InvalidRequest, match=r"Adam.step\(\) raised AssertionError"):
        capturable.step()
    assert _same(before, _weights(server))
    RemoteOptimizer(remote, "SGD", lr=0.1).step()  # configured again: it steps
    assert not _same(before, _weights(server))


def test_a_device_out_of_memory_in_a_step_stays_a_server_error(start_server, monkeypatch):
    """Not the session's doing: answered INTERNAL (and logged), not as a bad request."""
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    before = _weights(server)

    def out_of_memory(self, closure=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.optim.SGD, "step", out_of_memory)
    with pytest.raises(TrunkError, match="out of memory"):
        optimizer.step()
    assert _same(before, _weights(server))


def test_load_state_refuses_unknown_or_misshapen_parameters(start_server):
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    before = _weights(server)
    with pytest.raises(InvalidRequest, match="no trainable parameter named 'nope'"):
        remote.load_remote_state_dict({"nope": torch.zeros(1, dtype=torch.float64)})
    with pytest.raises(InvalidRequest, match=r"parameter bias: expected shape \[4\]"):
        remote.load_remote_state_dict({"bias": torch.zeros(5, dtype=torch.float64)})
    assert _same(before, _weights(server))


def test_a_non_finite_clip_scale_never_reaches_the_gradients(start_server):
    """A clip scale rides on the next Backward, GradNorm or Step; a non-finite one is refused
    by each before it multiplies the session's gradients."""
    server = start_server(_linear())
    remote = RemoteModule(server.address)
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    session = server.engine.sessions.values()[0]
    held = {k: v.clone() for k, v in session.grads.items()}
    remote.client.scale_grads_later(math.inf)
    with pytest.raises(InvalidRequest, match="grad_scale must be finite, got inf"):
        remote.client.grad_norms(2.0)
    assert _same(held, session.grads)
    with pytest.raises(InvalidRequest, match="grad_scale must be finite, got inf"):
        remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()  # the scale still pends
    assert _same(held, session.grads)


def test_what_frames_decode_to_is_bounded_by_max_decoding_bytes(start_server):
    """A small frame can decode to far more (LZ4 of zeros here; a lossy codec too): what all
    calls' frames decode to beyond their own bytes is reserved before decoding, within
    max_decoding_bytes, or refused naming it; a refusal loses nothing."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 64).double()  # its output, so the gradient sent back, is 16x the input
    reference = copy.deepcopy(trunk)
    server = start_server(trunk, ServerOptions(max_decoding_bytes=12 << 20))
    lz4 = ClientOptions(compression="lz4")
    remote = RemoteModule(server.address, options=lz4)
    x = torch.zeros(1 << 14, 4, dtype=torch.float64, requires_grad=True)  # 512 KiB decoded
    out = remote(x)
    assert torch.equal(out, reference(x))
    # Its gradient decodes to 8 MiB from ~32 KiB on the wire, 16 MiB at the peak: never fits.
    with pytest.raises(
        LimitExceeded,
        match=r"Backward: decoding its frame needs \d+ bytes beyond the frame, more than "
        r"max_decoding_bytes=12582912 allows at all",
    ):
        out.backward(torch.zeros_like(out))
    assert server.engine.sessions.values()[0].grads == {}  # nothing accumulated

    # Two calls that fit one at a time: the second waits its turn (refused, "retry later")
    # while the first holds its share; the server's trunk lock keeps the first in flight.
    # LZ4 of zeros: each grows by twice its decoded size at the peak (codec.Decoder.growth).
    first_input = torch.zeros(5 << 15, 4, dtype=torch.float64)  # 5 MiB: grows by 10 MiB
    second_input = torch.zeros(1 << 16, 4, dtype=torch.float64)  # 2 MiB: grows by 4 MiB
    other = RemoteModule(server.address, options=lz4)
    other(torch.zeros(1, 4, dtype=torch.float64))  # its handshake and session before the lock
    first: list[torch.Tensor] = []
    with server.engine.lock:
        worker = threading.Thread(target=lambda: first.append(other(first_input)))
        worker.start()
        wait_for(lambda: server.stats()["decoding_bytes"] > 0)
        with pytest.raises(LimitExceeded, match=r"max_decoding_bytes=12582912 \(\d+ held"):
            remote(second_input)
    worker.join(timeout=60)
    assert torch.equal(first[0], reference(first_input))
    assert server.stats()["decoding_bytes"] == server.stats()["inflight_bytes"] == 0
    assert torch.equal(remote(second_input), reference(second_input))  # its turn now
    y = torch.randn(64, 4, dtype=torch.float64, requires_grad=True)
    remote(y).sum().backward()  # the session goes on
    y_local = y.detach().requires_grad_()
    reference(y_local).sum().backward()
    assert torch.equal(y.grad, y_local.grad)


def test_a_kept_backward_reply_counts_in_max_context_bytes(start_server):
    """A context keeps its last Backward's reply (input gradients as large as its inputs) for
    a retried call: uncounted, a client keeping its graphs (retain_graph) held twice
    max_context_bytes (three contexts of 1 MiB counted under 4 MiB, with 3 MiB of replies
    beside them). Counted, older contexts make room; what is held stays under the limit."""
    limit = 4 << 20
    server = start_server(nn.Linear(1024, 1).double(), ServerOptions(max_context_bytes=limit))
    remote = RemoteModule(server.address)
    kept = []
    for _ in range(4):
        x = torch.randn(128, 1024, dtype=torch.float64, requires_grad=True)  # 1 MiB
        y = remote(x)
        y.sum().backward(retain_graph=True)
        kept.append(y)
        held = 0
        for context in server.engine.contexts.snapshot():
            held += sum(t.numel() * t.element_size() for t in context.inputs)
            if context.last_reply is not None:
                grads = [g for g in context.last_reply.grads if g is not None]
                held += sum(g.numel() * g.element_size() for g in grads)
        assert held <= server.stats()["context_bytes"] <= limit
        assert torch.equal(x.grad, server.engine.module.weight.detach().expand(128, -1))
    remote.close()


def test_a_state_reply_counts_as_a_frame_in_flight(start_server):
    """GetState (state_dict()) holds a copy of the weights until the client has read it all;
    replies a client leaves unread held one copy each, counted in no limit. They count in
    max_inflight_bytes now, as incoming frames do: a state larger than the limit is refused
    by name, one within it is read and lets go of its bytes."""
    trunk = nn.Linear(64, 64).double()  # 33,280 bytes of parameters
    server = start_server(trunk, ServerOptions(max_inflight_bytes=20_000))
    remote = RemoteModule(server.address)
    with pytest.raises(LimitExceeded, match=r"GetState: a reply of 33280 bytes, more than "):
        remote.remote_state_dict()
    roomy = start_server(nn.Linear(64, 64).double(), ServerOptions(max_inflight_bytes=40_000))
    with RemoteModule(roomy.address) as other:
        state = other.remote_state_dict()
        assert torch.equal(state["weight"], roomy.engine.module.weight.detach())
    assert roomy.stats()["inflight_bytes"] == 0
    remote.close()


def test_a_state_larger_than_one_identitys_share_is_fetched(start_server):
    """A GetState reply counts against max_inflight_bytes as a whole, not the token's share
    (max_identity_inflight_bytes, 1 GiB by default): nothing would ever make room for a
    state larger than the share, and it was refused with "retry later"."""
    options = ServerOptions(
        tokens=("tok",), max_inflight_bytes=4 << 20, max_identity_inflight_bytes=512 << 10
    )
    server = start_server(nn.Linear(512, 512).double(), options)  # 2.1 MB of parameters
    with RemoteModule(server.address, options=ClientOptions(token="tok")) as remote:
        state = remote.remote_state_dict()
        assert torch.equal(state["weight"], server.engine.module.weight.detach())
