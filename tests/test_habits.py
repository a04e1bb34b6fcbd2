"""Everyday PyTorch habits around a model holding a RemoteModule: torch.compile, autocast,
GradScaler, parameter groups, clipping and dtype casts. Each case runs the same computation
locally and compares (exactly, where the dtype allows it)."""

from __future__ import annotations

import copy
import math

import factories
import grpc
import models
import pytest
import torch
from conftest import spawn_server
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    Encoder,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    clip_grad_norm_,
    decode,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc
from remote_autograd.engine import TrunkEngine
from remote_autograd.errors import CodecError, InvalidRequest, NotConfigured


def _parts(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Linear(6, 16), nn.GELU())
    trunk = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16))
    top = nn.Linear(16, 3)
    return bottom.to(dtype), trunk.to(dtype), top.to(dtype)


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(8, 6, generator=generator, dtype=dtype) for _ in range(n)]


class Split:
    """bottom -> trunk -> top twice: served (split, trunk on a real server) and local."""

    def __init__(self, start_server, *, dtype=torch.float32, options=None, **sgd) -> None:
        bottom, trunk, top = _parts(dtype=dtype)
        self.local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
        self.server = start_server(trunk, options)
        self.remote = RemoteModule(self.server.address)
        self.model = nn.Sequential(bottom, self.remote, top)
        self.sgd = sgd or {"lr": 0.1}

    def optimizers(self):
        """(trunk, split local parts, local trunk, local rest): one optimizer per part, so
        that a GradScaler decides per part on both sides alike."""
        return (
            RemoteOptimizer(self.remote, "SGD", **self.sgd),
            torch.optim.SGD([*self.model[0].parameters(), *self.model[2].parameters()], **self.sgd),
            torch.optim.SGD(self.local[1].parameters(), **self.sgd),
            torch.optim.SGD([*self.local[0].parameters(), *self.local[2].parameters()], **self.sgd),
        )

    def assert_same_weights(self) -> None:
        remote = self.remote.remote_state_dict()
        for name, param in self.local[1].named_parameters():
            assert torch.equal(remote[name], param.detach()), name
        for index in (0, 2):
            mine, theirs = self.model[index].parameters(), self.local[index].parameters()
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b)

    def close(self) -> None:
        self.remote.close()


# -- torch.compile ------------------------------------------------------------------------------


# Inductor's own imports use torch.jit APIs that torch deprecates (not this library's doing).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compile_of_the_whole_model_breaks_the_graph_at_the_remote_module(start_server, backend):
    torch._dynamo.reset()
    split = Split(start_server)
    trunk_opt, split_opt, local_trunk_opt, local_opt = split.optimizers()
    compiled = torch.compile(split.model, backend=backend)
    for x in _batches(3):
        out = compiled(x)
        expected = split.local(x)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        out.square().mean().backward()
        expected.square().mean().backward()
        for opt in (trunk_opt, split_opt, local_trunk_opt, local_opt):
            opt.step()
            opt.zero_grad()
    if backend == "eager":  # the same kernels as the unsplit model: bit-exact
        split.assert_same_weights()
    else:
        remote = split.remote.remote_state_dict()
        for name, param in split.local[1].named_parameters():
            torch.testing.assert_close(remote[name], param.detach(), rtol=1e-5, atol=1e-6)
    split.close()


def test_compile_with_fullgraph_is_refused_with_the_way_out(start_server):
    """fullgraph=True cannot hold the trunk's RPC: Dynamo's refusal names why and what to do
    (it once told users to remove the library's own torch.compiler.disable)."""
    torch._dynamo.reset()
    split = Split(start_server)
    x = next(iter(_batches(1)))
    with pytest.raises(Exception, match=r"compile the parts before and after it on their own"):
        torch.compile(split.model, backend="eager", fullgraph=True)(x)
    compiled_bottom = torch.compile(split.model[0], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_bottom(x), split.local[0](x), rtol=0, atol=0)
    split.close()


# -- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["graph-kept", "recompute", "lost"])
def test_autocast_reaches_the_trunk(start_server, context):
    # float32 master weights everywhere, bfloat16 compute under CPU autocast on both sides.
    split = Split(start_server, options=ServerOptions(recompute=context == "recompute"))
    trunk_opt, split_opt, local_trunk_opt, local_opt = split.optimizers()
    for x in _batches(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = split.model(x)
            expected = split.local(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expected)
        if context == "lost":  # the client re-creates it, under the same autocast
            for session in split.server.engine.sessions.values():
                split.server.engine.contexts.drop_session(session.key)
        out.float().square().mean().backward()
        expected.float().square().mean().backward()
        for index in (0, 2):
            mine, theirs = split.model[index].parameters(), split.local[index].parameters()
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a.grad, b.grad)
        for opt in (trunk_opt, split_opt, local_trunk_opt, local_opt):
            opt.step()
            opt.zero_grad()
    split.assert_same_weights()
    assert all(p.dtype == torch.float32 for p in split.server.engine.module.parameters())
    # Outside the region the trunk runs in float32 again.
    with torch.no_grad():
        x = _batches(1)[0]
        assert torch.equal(split.model(x), split.local(x))
    split.close()


# -- dtype casts --------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["double", "half", "to-bfloat16"])
def test_a_cast_the_trunk_is_not_served_in_is_refused_with_what_to_do(start_server, cast):
    split = Split(start_server)
    split.model.to("cpu").float()  # no dtype change: fine
    x = _batches(1)[0]
    assert torch.equal(split.model(x), split.local(x))
    dtype = {"double": torch.float64, "half": torch.float16, "to-bfloat16": torch.bfloat16}[cast]
    if cast == "double":
        split.model.double()
    elif cast == "half":
        split.model.half()
    else:
        split.model.to(torch.bfloat16)
    # The local parts are cast as asked; the trunk cannot be, which the forward says.
    assert all(p.dtype == dtype for p in split.model.parameters())
    with pytest.raises(TypeError, match=r"ServerOptions\(dtype=.*serve --dtype .*autocast"):
        split.model(x.to(dtype))
    # Cast back, the model runs again (the float32 copy of a float64 cast loses nothing).
    split.model.float()
    if cast == "double":
        assert torch.equal(split.model(x), split.local(x))
    else:
        assert split.model(x).dtype == torch.float32
    split.close()


def test_float_is_no_cast_beside_a_trunk_served_in_another_dtype(start_server):
    """A float32 model beside a trunk served in float64 (which casts inputs in and outputs
    back): .float(), a no-op, changes nothing and is not refused."""
    split = Split(start_server, options=ServerOptions(dtype="float64"))
    x = _batches(1)[0]
    before = split.model(x)
    split.model.float()
    assert torch.equal(split.model(x), before) and before.dtype == torch.float32
    split.model.double().float()  # and back from a cast
    assert torch.equal(split.model(x), before)
    split.close()


class _IdsAndHalf(nn.Module):
    """Token ids in (no floating input); a float32 output and a float16 one made on purpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embedding = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(self.embedding(ids))
        return h, h.detach().half()


@pytest.mark.parametrize(
    ("module_dtype", "served", "expected"),
    [
        (torch.float32, "bfloat16", [torch.float32, torch.float16]),  # narrower: cast back
        (torch.float16, "float32", [torch.float32, torch.float16]),  # wider: kept
        (torch.float32, "float64", [torch.float64, torch.float16]),  # wider: kept
    ],
    ids=["f32-as-bf16", "f16-as-f32", "f32-as-f64"],
)
def test_outputs_of_a_served_dtype_given_token_ids(start_server, module_dtype, served, expected):
    """A trunk given token ids only has no floating input to say what dtype its caller uses.
    Served narrower than its module (a float32 model in bfloat16) its outputs came back in
    bfloat16; they go back in the module's dtype. Served wider (a float16 checkpoint in
    float32) they keep the served dtype, the precision it was chosen for. An output the
    trunk makes in another dtype on purpose (a .half()) comes back as it is."""
    module = _IdsAndHalf()
    module.linear.to(module_dtype)
    module.embedding.to(module_dtype)
    server = start_server(module, ServerOptions(dtype=served))
    remote = RemoteModule(server.address)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert [o.dtype for o in remote(ids)] == expected
    remote.close()


def test_double_works_when_the_trunk_is_served_in_float64(start_server):
    split = Split(start_server, options=ServerOptions(dtype="float64"))
    assert split.remote.remote_info()["dtype"] == "float64"
    split.model.double()
    split.local.double()
    trunk_opt, split_opt, local_trunk_opt, local_opt = split.optimizers()
    for x in _batches(2, torch.float64):
        out, expected = split.model(x), split.local(x)
        assert out.dtype == torch.float64
        assert torch.equal(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        for opt in (trunk_opt, split_opt, local_trunk_opt, local_opt):
            opt.step()
            opt.zero_grad()
    split.assert_same_weights()
    split.close()


@pytest.mark.parametrize("cast", ["double", "half"])
def test_a_cast_beside_a_trunk_without_floating_parameters_computes_as_locally(start_server, cast):
    """A trunk with no floating parameters (a GELU, a LayerNorm without affine weights)
    computes in its inputs' dtype, and a cast changes nothing of it locally. The cast was
    refused, saying to cast the model back to an empty dtype."""
    trunk = nn.Sequential(nn.GELU(), nn.LayerNorm(4, elementwise_affine=False))
    local = copy.deepcopy(trunk)
    server = start_server(trunk)
    dtype = torch.float64 if cast == "double" else torch.float16
    x = torch.randn(3, 4).to(dtype).requires_grad_()
    with RemoteModule(server.address) as remote:
        getattr(remote, cast)()
        getattr(local, cast)()
        out = remote(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, local(x), rtol=0, atol=0)


# -- GradScaler ---------------------------------------------------------------------------------


def _scaled_steps(
    split, scaler_split, scaler_local, batches, *, clip=None, overflow_at=-1, overlap=False
):
    trunk_opt, split_opt, local_trunk_opt, local_opt = split.optimizers()
    for index, x in enumerate(batches):
        big = 1e38 if index == overflow_at else 1.0  # loss * scale overflows float32
        scaler_split.scale(split.model(x).square().mean() * big).backward()
        scaler_local.scale(split.local(x).square().mean() * big).backward()
        if clip is not None:
            # unscale_ first, then clip the unscaled gradients: the AMP recipe for clipping.
            scaler_split.unscale_(trunk_opt)
            scaler_split.unscale_(split_opt)
            clip_split = clip_grad_norm_(
                [*split.model[0].parameters(), split.remote, *split.model[2].parameters()], clip
            )
            scaler_local.unscale_(local_trunk_opt)
            scaler_local.unscale_(local_opt)
            clip_local = torch.nn.utils.clip_grad_norm_(
                [
                    *split.local[0].parameters(),
                    *split.local[1].parameters(),
                    *split.local[2].parameters(),
                ],
                clip,
            )
            torch.testing.assert_close(clip_split, clip_local, rtol=1e-6, atol=0, equal_nan=True)
        for scaler, opts in (
            (scaler_split, (trunk_opt, split_opt)),
            (scaler_local, (local_trunk_opt, local_opt)),
        ):
            if overlap and scaler is scaler_split:  # the trunk's step beside the client's
                with trunk_opt.stepping(scaler):
                    scaler.step(split_opt)
            else:
                for opt in opts:
                    scaler.step(opt)
            scaler.update()
            for opt in opts:
                opt.zero_grad()
        assert scaler_split.get_scale() == scaler_local.get_scale()
    return trunk_opt


@pytest.mark.parametrize(
    ("clip", "overlap"),
    [(None, False), (0.5, False), (0.5, True)],
    ids=["plain", "unscale-then-clip", "unscale-then-clip-stepping"],
)
def test_grad_scaler_steps_and_skips_the_trunk_like_local_training(start_server, clip, overlap):
    split = Split(start_server)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    before = split.remote.remote_state_dict()
    trunk_opt = _scaled_steps(
        split, *scalers, _batches(4), clip=clip, overflow_at=1, overlap=overlap
    )
    assert scalers[0].get_scale() == 2.0**9  # one overflow: backed off once
    assert trunk_opt._step_count == 3  # the overflowed step was skipped on the server too
    split.assert_same_weights()
    assert not torch.equal(before["0.weight"], split.remote.remote_state_dict()["0.weight"])
    split.close()


def test_grad_scaler_skips_accumulated_gradients_that_overflow_only_summed(start_server):
    """Gradient accumulation: two Backwards, each finite, whose sum overflows float32 in the
    trunk (local .grad becomes inf). GradScaler skips the step and backs off on both sides
    alike; the next, finite, step equals local training."""
    split = Split(start_server)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1.0) for _ in range(2)]
    x = _batches(1)[0]
    optimizers = split.optimizers()
    for model, scaler, opts in (
        (split.model, scalers[0], optimizers[:2]),
        (split.local, scalers[1], optimizers[2:]),
    ):
        for big in (2.75e37, 2.75e37):  # the trunk's largest gradient: 2.2e38 each time
            out = model(x)
            scaler.scale(((out - out.detach()) * big).sum()).backward()
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        for opt in opts:
            opt.zero_grad()
        model(x).square().mean().backward()
        for opt in opts:
            opt.step()
    assert split.local[1][0].bias.grad is not None
    assert scalers[0].get_scale() == scalers[1].get_scale() == 0.5
    assert optimizers[0]._step_count == 1
    split.assert_same_weights()
    split.close()


def test_a_non_finite_step_without_grad_scaler_is_refused_loudly(start_server):
    split = Split(start_server)
    trunk_opt = split.optimizers()[0]
    before = split.remote.remote_state_dict()
    x = _batches(1)[0]
    (split.model(x).square().mean() * math.inf).backward()  # accepted, nothing accumulated
    assert split.server.engine.sessions.values()[0].grads == {}
    assert math.isinf(float(clip_grad_norm_([split.remote], 1.0)))  # an overflow: inf
    with pytest.raises(FloatingPointError, match="not finite.*zero_grad.*GradScaler"):
        trunk_opt.step()
    trunk_opt.zero_grad()
    split.model(x).square().mean().backward()
    trunk_opt.step()  # goes on from there
    assert trunk_opt._step_count == 1
    assert not torch.equal(before["0.weight"], split.remote.remote_state_dict()["0.weight"])
    split.close()


# -- parameter groups ---------------------------------------------------------------------------


def test_param_groups_by_name_with_schedulers_equal_local(start_server, tmp_path):
    path = str(tmp_path / "trunk.ckpt")
    split = Split(start_server, options=ServerOptions(checkpoint_path=path))
    trunk_opt = RemoteOptimizer(
        split.remote,
        "AdamW",
        lr=1e-2,
        weight_decay=0.1,
        param_groups=[
            {"params": "0.*", "lr": 1e-3},  # the first Linear
            {"params": ["3.weight"], "lr": 5e-2, "betas": (0.8, 0.9), "weight_decay": 0.0},
        ],
    )
    assert [g["trunk_params"] for g in trunk_opt.param_groups] == [
        ["0.weight", "0.bias"],
        ["3.weight"],
        ["1.weight", "1.bias", "3.bias"],  # named by no group: the defaults
    ]
    assert trunk_opt.param_groups[1]["betas"] == (0.8, 0.9)
    t = split.local[1]
    local_trunk_opt = torch.optim.AdamW(
        [
            {"params": [t[0].weight, t[0].bias], "lr": 1e-3},
            {"params": [t[3].weight], "lr": 5e-2, "betas": (0.8, 0.9), "weight_decay": 0.0},
            {"params": [t[1].weight, t[1].bias, t[3].bias]},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    rest = [*split.model[0].parameters(), *split.model[2].parameters()]
    split_opt = torch.optim.AdamW(rest, lr=1e-2)
    local_opt = torch.optim.AdamW(
        [*split.local[0].parameters(), *split.local[2].parameters()], lr=1e-2
    )
    lambdas = [lambda s: 0.5**s, lambda s: 1.0 / (1 + s), lambda s: 1.0]
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(trunk_opt, lambdas),
        torch.optim.lr_scheduler.LambdaLR(local_trunk_opt, lambdas),
    ]
    for x in _batches(3):
        split.model(x).square().mean().backward()
        split.local(x).square().mean().backward()
        for opt in (trunk_opt, split_opt, local_trunk_opt, local_opt):
            opt.step()
            opt.zero_grad()
        used = [g["lr"] for g in trunk_opt.param_groups]  # what the server's last step used
        for scheduler in schedulers:
            scheduler.step()
        lrs = [g["lr"] for g in trunk_opt.param_groups]
        assert lrs == [g["lr"] for g in local_trunk_opt.param_groups]
    split.assert_same_weights()
    state = trunk_opt.state_dict()
    assert [g["lr"] for g in state["param_groups"]] == lrs
    assert len(state["param_groups"]) == 3
    # The server's checkpoint keeps the groups: a restarted server rebuilds them.
    split.remote.client.checkpoint()
    restored = TrunkEngine(_parts()[1], ServerOptions(checkpoint_path=path))
    optimizer = restored.sessions.values()[0].optimizer
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1, 3]
    assert [g["lr"] for g in optimizer.param_groups] == used
    split.close()


def test_param_groups_that_name_nothing_or_twice_are_refused(start_server):
    split = Split(start_server)
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no trainable parameter.*0\.weight"):
        RemoteOptimizer(split.remote, "SGD", lr=0.1, param_groups=[{"params": "blocks.*"}])
    with pytest.raises(InvalidRequest, match="'0.bias' is in param groups 0 and 1"):
        RemoteOptimizer(
            split.remote,
            "SGD",
            lr=0.1,
            param_groups=[{"params": "0.*"}, {"params": ["0.bias"], "lr": 0.5}],
        )
    with pytest.raises(TypeError, match="trunk parameter names or patterns"):
        RemoteOptimizer(split.remote, "SGD", lr=0.1, param_groups=[{"params": [torch.ones(1)]}])
    split.close()


# -- clipping -----------------------------------------------------------------------------------


def test_clip_grad_norm_of_the_whole_model_includes_the_trunk(start_server):
    split = Split(start_server)
    trunk_opt, split_opt, local_trunk_opt, local_opt = split.optimizers()
    for x in _batches(2):
        split.model(x).square().sum().backward()
        split.local(x).square().sum().backward()
        # torch's own function cannot see the trunk (no parameters here): a smaller norm.
        local_only = torch.nn.utils.get_total_norm([p.grad for p in split.model.parameters()])
        total = clip_grad_norm_(split.model, 0.5)
        expected = torch.nn.utils.clip_grad_norm_(split.local.parameters(), 0.5)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
        assert local_only < total
        for opt in (trunk_opt, split_opt, local_trunk_opt, local_opt):
            opt.step()
            opt.zero_grad()
    remote = split.remote.remote_state_dict()
    for name, param in split.local[1].named_parameters():
        torch.testing.assert_close(remote[name], param.detach(), rtol=1e-6, atol=1e-7)
    split.close()


def test_a_clip_coefficient_of_zero_reaches_the_trunk(start_server):
    """max_norm=0 (or an infinite total norm) makes torch's coefficient 0: every gradient is
    zeroed, and momentum alone moves the weights. 0 on the wire means "no scale", so the trunk
    once stepped unclipped; now it equals local training, bit for bit."""
    split = Split(start_server, dtype=torch.float64, lr=0.1, momentum=0.9)
    optimizers = split.optimizers()
    for max_norm in (1.0, 0.0, 0.5):
        for model, opts in ((split.model, optimizers[:2]), (split.local, optimizers[2:])):
            model(_batches(1, torch.float64)[0]).square().sum().backward()
            if model is split.model:
                clip_grad_norm_(model, max_norm)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            for opt in opts:
                opt.step()
                opt.zero_grad()
        split.assert_same_weights()
    split.close()


def _poisoned_step(split, scaler, poison: str) -> tuple[RemoteOptimizer, torch.optim.SGD]:
    """x -> trunk -> top (no bottom) under the AMP recipe with clipping, one gradient made
    non-finite: the trunk's output gradient ("trunk"), or the top's weight's ("local")."""
    trunk_opt = RemoteOptimizer(split.remote, "SGD", lr=0.1)
    top = split.model[2]
    top_opt = torch.optim.SGD(top.parameters(), lr=0.1)
    out = split.remote(_batches(1)[0].matmul(torch.ones(6, 16)))
    loss = top(out).square().mean()
    bad = torch.zeros(1)
    bad[0] = math.inf if poison == "trunk" else math.nan
    if poison == "trunk":
        loss = loss + (out[0, 0] * bad).sum()
    else:
        loss = loss + (top.weight[0, 0] * bad).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(trunk_opt)
    scaler.unscale_(top_opt)
    clip_grad_norm_([split.remote, *top.parameters()], 1.0)
    return trunk_opt, top_opt


def test_amp_clipping_when_only_the_trunk_overflows_keeps_the_local_weights_finite(start_server):
    """The trunk's overflow counts as an infinite norm (as inf gradients do in torch): the
    coefficient is 0, the top's gradients are zeroed, and its optimizer, whose GradScaler saw
    no overflow of its own, steps with zeros. It once got NaN and wrote NaN into the weights."""
    split = Split(start_server)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    before = split.remote.remote_state_dict()
    top_before = [p.clone() for p in split.model[2].parameters()]
    trunk_opt, top_opt = _poisoned_step(split, scaler, "trunk")
    scaler.step(trunk_opt)  # skipped: its stand-in says overflow
    scaler.step(top_opt)
    scaler.update()
    assert scaler.get_scale() == 0.5 and trunk_opt._step_count == 0
    for now, was in zip(split.model[2].parameters(), top_before, strict=True):
        assert torch.equal(now, was)  # a step of zeros: plain SGD stays
    after = split.remote.remote_state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    split.close()


def test_amp_clipping_with_a_nan_local_gradient_refuses_the_trunks_step(start_server):
    """A NaN local gradient makes the coefficient NaN, which locally would make the trunk's
    gradients NaN. The trunk's step is refused with the FloatingPointError of a non-finite
    step (it once sent grad_scale=NaN and failed with an InvalidRequest that stuck to every
    later step); after zero_grad() training goes on."""
    split = Split(start_server)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    before = split.remote.remote_state_dict()
    trunk_opt, top_opt = _poisoned_step(split, scaler, "local")
    scaler.step(top_opt)  # skipped: its own unscale_ found the NaN
    with pytest.raises(FloatingPointError, match="not finite"):
        scaler.step(trunk_opt)
    after = split.remote.remote_state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
    trunk_opt.zero_grad()
    split.remote(_batches(1)[0].matmul(torch.ones(6, 16))).square().sum().backward()
    trunk_opt.step()
    assert trunk_opt._step_count == 1


def _dropout_trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)).double()


@pytest.mark.parametrize("backwards", [1, 2], ids=["one_backward", "retain_graph_twice"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("how", ["plain", "reentrant", "non_reentrant"])
def test_a_checkpointed_trunk_with_dropout_trains_as_without_checkpoint(
    start_server, how, micro_batches, backwards
):
    """torch.utils.checkpoint runs the RemoteModule's forward again in the backward, after
    restoring the client's RNG state: the forward finds the seeds its first run had under that
    state, so the trunk draws the same dropout masks. Three steps with ClientOptions(seed=...)
    equal the same steps without checkpoint, bit for bit (the recompute drew new masks: the
    gradients belonged to neither forward), and nothing is warned. Two backwards through one
    graph (retain_graph) run the recompute twice: the second found no seeds (the first had
    taken them), drew new masks and warned."""
    from torch.utils.checkpoint import checkpoint

    results = {}
    for run in ("plain", how):
        server = start_server(_dropout_trunk())
        options = ClientOptions(seed=7, micro_batches=micro_batches)
        remote = RemoteModule(server.address, options=options)
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        for _ in range(3):
            optimizer.zero_grad()
            x.grad = None

            def part(t, remote=remote):
                return remote(t * 1.0) * 2

            y = part(x) if run == "plain" else checkpoint(part, x, use_reentrant=run == "reentrant")
            for left in reversed(range(backwards)):
                y.sum().backward(retain_graph=left > 0)
            optimizer.step()
        results[run] = (x.grad, remote.remote_state_dict())
        remote.close()
    (grad, weights), (plain_grad, plain_weights) = results[how], results["plain"]
    assert torch.equal(grad, plain_grad)
    # Slices' Backwards reach the server in either order: two terms add up alike either way,
    # four (two backwards of two slices) may round differently in the last bit.
    exact = {"rtol": 0 if micro_batches * backwards <= 2 else 1e-13, "atol": 0}
    for name, value in weights.items():
        torch.testing.assert_close(value, plain_weights[name], **exact, msg=name)


def test_a_recomputed_forward_without_a_seed_option_gets_its_first_runs_masks(start_server):
    """Without ClientOptions(seed=...) the server picks each forward's seed; the recompute is
    given the one the first run got: its output is the first run's, for either checkpoint."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    remote = RemoteModule(start_server(_dropout_trunk()).address)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for reentrant in (True, False):
        seen: list[torch.Tensor] = []

        def part(t, seen=seen):
            out = remote(t)
            seen.append(out.detach().clone())
            return out * 2

        with set_checkpoint_early_stop(False):  # the recompute runs all of part
            checkpoint(part, x, use_reentrant=reentrant).sum().backward()
        assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    remote.close()


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("how", ["non_reentrant", "copying_hooks"])
def test_forwards_released_before_their_backward_leave_no_context_behind(
    start_server, how, micro_batches
):
    """A non-reentrant checkpoint, or saved-tensor hooks that copy, drop the forward's marker
    at the forward: its context is released there, and the backward has the server re-create
    it. Nothing released the re-created one, and every step left a context (the trunk's
    inputs and activations) on the server until context_ttl."""
    from torch.utils.checkpoint import checkpoint

    server = start_server(nn.Linear(4, 4).double())
    options = ClientOptions(micro_batches=micro_batches)
    remote = RemoteModule(server.address, options=options)
    for _ in range(3):
        x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
        if how == "non_reentrant":
            y = checkpoint(lambda t: remote(t) * 2, x, use_reentrant=False)
        else:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                y = remote(x) * 2
        y.sum().backward()
        assert torch.equal(x.grad, 2 * server.engine.module.weight.detach().sum(0).expand(4, 4))
    wait_for(lambda: server.stats()["contexts"] == 0)
    remote.close()


def test_a_training_forward_under_a_half_precision_default_dtype(start_server):
    """The key of a forward's dropout seeds samples its inputs at whole-number indices: under
    torch.set_default_dtype(torch.float16) an input of more than 65504 elements made every
    training forward fail (the indices were computed in the default dtype)."""
    server = start_server(nn.Linear(256, 8))
    remote = RemoteModule(server.address)
    x = torch.randn(300, 256, requires_grad=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        out = remote(x)
    finally:
        torch.set_default_dtype(default)
    assert out.dtype == torch.float32 and out.shape == (300, 8)
    remote.close()


def test_a_recompute_whose_seeds_cannot_be_told_warns(start_server):
    """The trunk twice on the same input in one checkpointed function, nothing drawn here
    between: both forwards start from one RNG state with the same values, so the recompute
    cannot tell which seeds are its own, and says so. In eval mode there is nothing to tell."""
    from torch.utils.checkpoint import checkpoint

    server = start_server(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).double())
    remote = RemoteModule(server.address)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for reentrant in (True, False):
        y = checkpoint(lambda t: remote(t) - remote(t), x, use_reentrant=reentrant)
        with pytest.warns(UserWarning, match="inside a backward pass"):
            y.sum().backward()
    remote.eval()
    y = checkpoint(lambda t: remote(t) - remote(t), x, use_reentrant=False)
    y.sum().backward()  # no warning: the filter turns any into an error
    remote.close()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("apart", [True, False], ids=["two_checkpoints", "one_checkpoint"])
def test_two_trunk_calls_from_one_rng_state_find_their_seeds(start_server, reentrant, apart):
    """A siamese step: the trunk (dropout inside, ClientOptions(seed=...)) on two inputs, in
    two checkpoints or nested in one, nothing drawn on this side between them. Both forwards
    start from one RNG state; their inputs tell them apart, so each recompute finds its first
    run's seeds: equal bit for bit to the same steps without checkpoint (they warned, and the
    gradients were off by up to 1.5e-3)."""
    from torch.utils.checkpoint import checkpoint

    def trunk() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 4))

    results = []
    for checkpointed in (False, True):
        server = start_server(trunk().double())
        remote = RemoteModule(server.address, options=ClientOptions(seed=7))
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            x1, x2 = (torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in "ab")
            x1.requires_grad_()
            x2.requires_grad_()  # a reentrant checkpoint of inputs that need none warns
            if not checkpointed:
                y = remote(x1) - remote(remote(x2))
            elif apart:
                first = checkpoint(remote, x1, use_reentrant=reentrant)
                twice = lambda t, m=remote: m(m(t))  # noqa: E731
                y = first - checkpoint(twice, x2, use_reentrant=reentrant)
            else:
                y = checkpoint(
                    lambda a, b, m=remote: m(a) - m(m(b)), x1, x2, use_reentrant=reentrant
                )
            y.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append((x1.grad, remote.remote_state_dict()))
        remote.close()
    (grad, weights), (checkpointed_grad, checkpointed_weights) = results
    assert torch.equal(grad, checkpointed_grad)
    for name, value in weights.items():
        assert torch.equal(value, checkpointed_weights[name]), name


def test_what_a_remote_optimizer_cannot_do_is_refused_by_name(start_server):
    """Groups are fixed by trunk parameter name at construction, and a sparse tensor does
    not travel: each says so, where they failed later or in a torch kernel."""
    server = start_server(nn.Linear(4, 4).double())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    with pytest.raises(TypeError, match="param_groups="):
        optimizer.add_param_group({"params": []})
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()  # still whole
    sparse = torch.eye(4, dtype=torch.float64).to_sparse()
    with pytest.raises(CodecError, match="sparse_coo tensor"):
        remote(sparse)
    remote.close()


def test_a_session_the_server_dropped_is_named_when_its_optimizer_is_missed(start_server):
    server = start_server(nn.Linear(4, 4).double(), ServerOptions(session_ttl=0.2))
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    wait_for(lambda: server.stats()["sessions"] == 0)  # idle past session_ttl
    with pytest.raises(NotConfigured, match="no longer holds this session"):
        optimizer.state_dict()
    remote(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    with pytest.raises(NotConfigured, match="no longer holds this session"):
        optimizer.step()
    remote.close()


# -- double backward ----------------------------------------------------------------------------


def test_double_backward_through_the_trunk_is_refused_and_a_penalty_at_its_output_works(
    start_server,
):
    """create_graph=True across the trunk (a gradient penalty at the input, a Hessian) raises,
    where its second-order terms were once dropped without a word, also when the incoming
    gradient needs none (loss.sum()) or the top is frozen. A penalty on the trunk's output
    keeps its second-order terms in the top, and trains as locally, bit for bit."""
    split = Split(start_server, dtype=torch.float64)
    x = _batches(1, torch.float64)[0].requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph=True crosses a RemoteModule"):
        torch.autograd.grad(split.model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True crosses a RemoteModule"):
        torch.autograd.functional.hessian(lambda v: split.model(v).square().sum(), x[:2])
    split.model[2].requires_grad_(False)
    with pytest.raises(RuntimeError, match="create_graph=True crosses a RemoteModule"):
        torch.autograd.grad(split.model(x).square().sum(), x, create_graph=True)
    split.model[2].requires_grad_(True)
    optimizers = split.optimizers()
    for model, opts in ((split.model, optimizers[:2]), (split.local, optimizers[2:])):
        h = model[1](model[0](x))
        y = model[2](h)
        (grad_h,) = torch.autograd.grad(y.square().sum(), h, create_graph=True)
        (y.square().mean() + grad_h.square().sum()).backward()
        for opt in opts:
            opt.step()
    split.assert_same_weights()
    split.close()


# -- device contexts, anomaly mode, freezing ------------------------------------------------------


def test_a_model_built_under_a_device_context_trains_as_one_built_plainly(start_server):
    """``with torch.device("meta")``, then ``to_empty``: the way large models are built. The
    RemoteModule's stand-in stays on the CPU, so the backward's gradient for it fits (every
    backward failed after the server had added the trunk's gradients). Meta inputs are refused
    by name."""
    split = Split(start_server, dtype=torch.float64)
    with torch.device("meta"):
        bottom, top = nn.Linear(6, 16).double(), nn.Linear(16, 3).double()
        model = nn.Sequential(bottom, RemoteModule(split.server.address), top)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for mine, local in ((bottom, split.local[0][0]), (top, split.local[2])):
            for a, b in zip(mine.parameters(), local.parameters(), strict=True):
                a.copy_(b)
    x = _batches(1, torch.float64)[0]
    model(x).square().sum().backward()
    reference = nn.Sequential(split.local[0][0], split.local[1], split.local[2])
    reference(x).square().sum().backward()
    for mine, local in ((bottom, split.local[0][0]), (top, split.local[2])):
        for a, b in zip(mine.parameters(), local.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="meta tensors hold no data"):
        model[1](torch.zeros(2, 16, device="meta"))
    model[1].close()
    split.close()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled:UserWarning")
def test_a_grad_scaler_overflow_under_anomaly_detection_is_skipped(start_server):
    """torch.autograd.detect_anomaly() refuses a backward that returns NaN: the trunk's
    overflow flag is inf, so the overflowed step is skipped as locally, not raised. (Positive
    weights and inputs: the overflow stays inf in the trunk's own backward, which anomaly mode
    checks too in this one process.)"""
    trunk = nn.Linear(4, 4)
    with torch.no_grad():
        trunk.weight.fill_(0.1)
        trunk.bias.fill_(0.1)
    remote = RemoteModule(start_server(trunk).address)
    trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    with torch.autograd.detect_anomaly():
        out = remote(torch.ones(2, 4))
        scaler.scale(out.sum() + out[0, 0] * torch.tensor(math.inf)).backward()
    scaler.step(trunk_opt)
    scaler.update()
    assert scaler.get_scale() == 0.5 and trunk_opt._step_count == 0
    remote.close()


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_trunk_frozen_at_its_forward_gets_no_gradient(start_server, micro_batches):
    """Frozen at the forward, unfrozen before the backward: a local layer's parameters took
    no part in that graph and get nothing; neither does the trunk (it once did)."""
    server = start_server(nn.Linear(4, 4).double())
    remote = RemoteModule(server.address, options=ClientOptions(micro_batches=micro_batches))
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    remote.requires_grad_(False)
    out = remote(x)
    remote.requires_grad_(True)
    out.sum().backward()
    assert x.grad is not None
    assert server.engine.sessions.values()[0].grads == {}
    remote.close()


# -- named tuples and ModelOutputs -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["in_process", "child_process"])
def test_named_tuples_and_model_outputs_arrive_as_the_trunk_returned_them(start_server, where):
    """A trunk returning a named tuple and a Hugging Face ModelOutput, and taking a named tuple:
    each side gets the class the other sent where it has loaded it (the ModelOutput, the
    input's Bias), else a named tuple of the same name and fields (the trunk's Pair, defined
    inside its forward); values and gradients are those of the local trunk, bit for bit."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    server = None
    if where == "in_process":
        server = start_server(models.make_named_outputs_trunk())
        address, process = server.address, None
    else:
        process, address = spawn_server("models:make_named_outputs_trunk")
    local = models.make_named_outputs_trunk()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(4, dtype=torch.float64)
    results = []
    try:
        with RemoteModule(address) as remote:
            for module in (remote, local):
                leaf = x.clone().requires_grad_()
                pair, out = module(leaf, models.Bias(bias))
                (pair.hidden.sum() + pair.norms.sum() + out.hidden_states[1].sum()).backward()
                results.append((pair, out, leaf.grad))
    finally:
        if process is not None:
            process.kill()
            process.communicate(timeout=60)
    (pair, out, grad), (local_pair, local_out, local_grad) = results
    if server is not None:
        assert server.engine.module.received is models.Bias
    assert type(pair).__name__ == "Pair" and pair._fields == ("hidden", "norms")
    assert type(out) is BaseModelOutputWithPast  # attribute access, to_tuple(), indexing
    assert out.past_key_values is None and list(out.keys()) == list(local_out.keys())
    torch.testing.assert_close(pair.hidden, local_pair.hidden, rtol=0, atol=0)
    torch.testing.assert_close(pair.norms, local_pair.norms, rtol=0, atol=0)
    torch.testing.assert_close(out[0], local_out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out["aux"], local_out["aux"], rtol=0, atol=0)
    for mine, theirs in zip(out.hidden_states, local_out.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(grad, local_grad, rtol=0, atol=0)


def test_a_client_that_does_not_ask_for_named_values_gets_plain_ones(start_server):
    """A client of the first protocol version does not read named values (codec ExtType 3):
    without Header.named_values its Compute is answered with plain tuples and maps."""
    server = start_server(models.make_named_outputs_trunk())
    x = torch.randn(3, 4, dtype=torch.float64)
    value = {"args": [x, (torch.zeros(4, dtype=torch.float64),)], "kwargs": {}}
    payload = Encoder().encode(value)  # named=False: what a first-version client sends
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.TrunkStub(channel).Compute(
            pb.Frame(
                header=pb.Header(request_id="plain", payload_bytes=len(payload)), payload=payload
            ),
            metadata=(("ra-session", "plain-client"),),
            timeout=30,
        )
    (pair, out) = decode(reply.payload)
    assert type(pair) is tuple and type(out) is dict
    assert server.engine.module.received is tuple
    assert list(out) == ["last_hidden_state", "hidden_states", "aux"]
    hidden = models.make_named_outputs_trunk().linear(x).detach()
    torch.testing.assert_close(pair[0], hidden, rtol=0, atol=0)


def test_a_remote_module_built_under_inference_mode_trains_later(start_server):
    """Built (and first called) inside ``torch.inference_mode()``, as a script that serves
    predictions does, then trained: every backward failed in autograd ('NoneType' object has no
    attribute 'next_functions'), as its stand-in was an inference tensor. It trains as a trunk
    built outside does, bit for bit (float64), GradScaler's unscale included."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3).double()
    local = copy.deepcopy(trunk)
    server = start_server(trunk)
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.inference_mode():
        remote = RemoteModule(server.address)
        assert torch.equal(remote(x), local(x))
    trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for step in range(3):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        for model, xi, optimizer in ((remote, xs[0], trunk_opt), (local, xs[1], local_opt)):
            optimizer.zero_grad()
            scaler.scale(model(xi + step).square().sum()).backward()
            scaler.step(optimizer)
        scaler.update()
        assert torch.equal(xs[0].grad, xs[1].grad)
    weights = remote.remote_state_dict()
    for name, value in local.state_dict().items():
        assert torch.equal(weights[name], value), name
    # A state_dict taken under inference_mode holds ordinary tensors, as a local module's does:
    # loaded with assign=True into a local copy, it trains (an inference tensor cannot).
    with torch.inference_mode():
        state = nn.Sequential(remote).state_dict()
    assert not any(t.is_inference() for t in state.values())
    copy_of_trunk = nn.Linear(4, 3).double()
    copy_of_trunk.load_state_dict({k.removeprefix("0."): v for k, v in state.items()}, assign=True)
    copy_of_trunk(x).sum().backward()
    assert copy_of_trunk.weight.grad is not None
    remote.close()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_validating_in_eval_mode_between_steps_leaves_the_dropout_masks_alone(
    start_server, micro_batches
):
    """A trunk with dropout under ClientOptions(seed=...): an eval-mode validation forward
    after each step took a dropout seed, so the next steps drew other masks than a run without
    validation (locally an eval forward draws nothing), and a run resumed from a checkpoint
    saved after validating did not equal training on. Bit for bit, float64."""
    runs = []
    for validate in (False, True):
        bottom, top = factories.local_parts()
        server = start_server(factories.dropout_trunk())
        options = ClientOptions(seed=0, micro_batches=micro_batches)
        remote = RemoteModule(server.address, options=options)
        model = nn.Sequential(bottom, remote, top)
        trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
        opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], lr=0.1)
        for step in range(3):
            x, y = factories.batch(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            trunk_opt.step()
            opt.step()
            trunk_opt.zero_grad()
            opt.zero_grad()
            if validate:
                model.eval()
                with torch.no_grad():
                    model(factories.batch(100)[0])
                model.train()
        runs.append(remote.remote_state_dict())
        remote.close()
    for name, value in runs[0].items():
        assert torch.equal(runs[1][name], value), name


def test_a_submodule_served_in_eval_mode_stays_so_after_a_validation_pass(start_server):
    """Fine-tuning with a frozen BatchNorm: the trunk is served with ``trunk.train();
    trunk.bn.eval()``. A validation pass in eval mode, then training again, used to put the
    whole trunk in training mode (``train(True)`` walks every submodule): the BatchNorm then
    normalised by batch statistics and moved its running ones, with no word. The training
    forwards after it equal the same trunk's locally, whose owner keeps the BatchNorm frozen."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        trunk[1].running_mean.uniform_(-1, 1)  # statistics of its own, not a batch's
    trunk.train()
    trunk[1].eval()
    local = copy.deepcopy(trunk)
    server = start_server(trunk)
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    with RemoteModule(server.address) as remote:
        for _ in range(2):
            remote.eval()  # validation, then training again
            with torch.no_grad():
                torch.testing.assert_close(remote(x), local.eval()(x), rtol=0, atol=0)
            remote.train()
            local.train()
            local[1].eval()  # what the owner of a frozen BatchNorm does locally
            torch.testing.assert_close(remote(x), local(x), rtol=0, atol=0)
        state = remote.state_dict()
    for name, value in local.state_dict().items():
        assert torch.equal(state[name], value), name
    assert state["1.num_batches_tracked"] == 0
