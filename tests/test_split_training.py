"""Split training equals local training: the trunk remote vs the same modules run locally."""

from __future__ import annotations

import copy

import pytest
import torch
from models import AddsInPlace, SomeOutputsDetached, Split, block_parts, mlp_parts
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    clip_grad_norm_,
)

STEPS = 5


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # float64: bit-for-bit; float32: max abs diff <= 1e-6 (the bound).
    return {"rtol": 0, "atol": 0} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-6}


def _batches(kind: str, dtype: torch.dtype, n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        if kind == "mlp":
            x = torch.randn(8, 6, generator=generator, dtype=dtype)
            y = torch.randint(0, 3, (8,), generator=generator)
            yield (x,), y
        else:
            tokens = torch.randint(0, 20, (4, 7), generator=generator)
            padding = torch.zeros(4, 7, dtype=torch.bool)
            padding[1, 5:] = True  # a padded sequence
            padding[3, 3:] = True
            yield (tokens, padding), tokens


def _pair(kind, dtype, start_server):
    parts = mlp_parts(dtype) if kind == "mlp" else block_parts(dtype)
    local = Split(kind, *copy.deepcopy(parts))
    bottom, trunk, top = parts
    server = start_server(trunk)
    remote_trunk = RemoteModule(server.address)
    remote = Split(kind, bottom, remote_trunk, top)
    return local, remote, trunk, server


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["mlp", "blocks"])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "AdamW-fused"])
def test_training_matches_local(kind, dtype, optimizer, start_server):
    local, remote, served_trunk, server = _pair(kind, dtype, start_server)
    kwargs: dict = {
        "SGD": {"lr": 0.05, "momentum": 0.9},
        "AdamW": {"lr": 0.01},
        "AdamW-fused": {"lr": 0.01, "fused": True},  # one kernel per step: CPU trunks too
    }[optimizer]
    cls = getattr(torch.optim, optimizer.removesuffix("-fused"))
    local_opt = cls(local.parameters(), **kwargs)
    local_params = [*remote.bottom.parameters(), *remote.top.parameters()]
    client_opt = cls(local_params, **kwargs)
    trunk_opt = RemoteOptimizer(remote.trunk, cls, **kwargs)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        for o in (local_opt, client_opt, trunk_opt)
    ]
    batches = list(_batches(kind, dtype, 2 * STEPS))
    tol = _tolerance(dtype)
    max_norm = 0.2 if kind == "mlp" else 0.8  # below every step's gradient norm
    for step in range(STEPS):
        for opt in (local_opt, client_opt, trunk_opt):
            opt.zero_grad()
        for micro in batches[2 * step : 2 * step + 2]:  # gradient accumulation over 2 micro-batches
            local_loss = local(*micro) / 2
            remote_loss = remote(*micro) / 2
            torch.testing.assert_close(remote_loss, local_loss, **tol)
            local_loss.backward()
            remote_loss.backward()
        local_norm = torch.nn.utils.clip_grad_norm_(local.parameters(), max_norm)
        remote_norm = clip_grad_norm_(
            [*remote.bottom.parameters(), remote.trunk, *remote.top.parameters()], max_norm
        )
        torch.testing.assert_close(remote_norm, local_norm, **tol)
        assert local_norm > max_norm  # every step really clips (the server scales its share)
        for opt in (local_opt, client_opt, trunk_opt):
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
    assert trunk_opt.param_groups[0]["lr"] == local_opt.param_groups[0]["lr"] < kwargs["lr"]
    remote_state = remote.trunk.remote_state_dict()
    for name, param in local.trunk.named_parameters():
        torch.testing.assert_close(remote_state[name], param.detach(), **tol)
        torch.testing.assert_close(dict(served_trunk.named_parameters())[name], param, **tol)
    for mine, theirs in [(remote.bottom, local.bottom), (remote.top, local.top)]:
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_outputs_and_gradients_match_local(dtype, start_server):
    local, remote, _, server = _pair("blocks", dtype, start_server)
    tokens, padding = next(_batches("blocks", dtype, 1))[0]
    hidden = local.bottom(tokens).detach().requires_grad_()
    remote_hidden = hidden.detach().clone().requires_grad_()
    out, norms = local.trunk(hidden, padding)
    remote_out, remote_norms = remote.trunk(remote_hidden, padding)
    tol = _tolerance(dtype)
    torch.testing.assert_close(remote_out, out, **tol)
    torch.testing.assert_close(remote_norms, norms, **tol)
    assert remote_out.dtype == dtype and remote_out.device == hidden.device
    grad = torch.randn_like(out)
    out.backward(grad)
    remote_out.backward(grad)  # only the first output gets a gradient: the second sends None
    torch.testing.assert_close(remote_hidden.grad, hidden.grad, **tol)
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.trunk.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, **tol)


def test_gradcheck_through_remote_module(start_server):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    remote = RemoteModule(start_server(trunk).address)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: remote(a * b), (x, w))


@pytest.mark.parametrize("inputs", ["frozen_bottom", "raw_ints"])
def test_trunk_gets_gradients_when_no_input_requires_grad(inputs, start_server):
    torch.manual_seed(0)
    if inputs == "frozen_bottom":
        trunk = nn.Linear(4, 2).double()
        x = torch.randn(3, 4, dtype=torch.float64)  # a frozen bottom's output: no grad
    else:
        trunk = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).double()
        x = torch.tensor([[1, 2, 3], [4, 5, 6]])  # the trunk is the first layer, fed token ids
    local = copy.deepcopy(trunk)
    before = copy.deepcopy(trunk)
    remote = RemoteModule(start_server(trunk).address)
    opt = RemoteOptimizer(remote, torch.optim.SGD, lr=0.1)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    remote(x).pow(2).sum().backward()
    local(x).pow(2).sum().backward()
    opt.step()
    local_opt.step()
    state = remote.remote_state_dict()
    for (name, param), old in zip(local.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(state[name], param.detach()), name
        assert not torch.equal(param, old), f"{name} did not train"


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_backward_reaches_the_trunks_gradients_only_where_it_would_locally(
    micro_batches, start_server
):
    """``torch.autograd.grad(loss, x)`` and ``loss.backward(inputs=[x])`` (a gradient penalty,
    an adversarial input) give no parameter a gradient, locally as on the server. With
    ``inputs=`` naming the parameters, the trunk's are named by its optimizer's."""
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2)).double()
    remote = RemoteModule(
        start_server(copy.deepcopy(local[2])).address, micro_batches=micro_batches
    )
    split = nn.Sequential(copy.deepcopy(local[0]), nn.Tanh(), remote, copy.deepcopy(local[3]))
    trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
    runs = [
        (local, [torch.optim.SGD(local.parameters(), lr=0.1)], list(local.parameters())),
        (
            split,
            [torch.optim.SGD(split.parameters(), lr=0.1), trunk_opt],
            [*split.parameters(), *trunk_opt.param_groups[0]["params"]],
        ),
    ]
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for model, optimizers, parameters in runs:
        leaf = x.clone().requires_grad_()
        (penalty,) = torch.autograd.grad(model(leaf).pow(2).sum(), leaf)
        model(leaf).sum().backward(inputs=[leaf])
        model(leaf).pow(2).mean().backward(inputs=parameters)
        (model(leaf).sum() + penalty.sum()).backward()
        for optimizer in optimizers:
            optimizer.step()
        grads.append(leaf.grad)
    # Sliced, the rows go through the matrix products in pieces: on some CPUs' kernels that
    # changes the last bit (float64, measured: 1.1e-16).
    exact = {"rtol": 0, "atol": 0 if micro_batches == 1 else 1e-12}
    torch.testing.assert_close(grads[1], grads[0], **exact)
    state = split.state_dict()
    for name, param in local.state_dict().items():
        torch.testing.assert_close(state[name], param, **exact, msg=name)


def test_zero_grad_of_the_remote_module_clears_the_trunks_gradients(start_server):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 3).double()
    local = copy.deepcopy(trunk)
    remote = RemoteModule(start_server(trunk).address)
    optimizers = (
        torch.optim.SGD(local.parameters(), lr=0.1),
        RemoteOptimizer(remote, "SGD", lr=0.1),
    )
    for step in range(3):
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip((local, remote), optimizers, strict=True):
            model.zero_grad(set_to_none=step % 2 == 0)
            model(x).pow(2).sum().backward()
            optimizer.step()
    state = remote.remote_state_dict()
    for name, param in local.named_parameters():
        assert torch.equal(state[name], param.detach()), name


class _Biases(nn.Module):
    """Both biases' gradients are the output's gradient itself: autograd returns that one
    tensor for ``b1``, ``b2`` and the input."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Parameter(torch.zeros(2, 4, dtype=torch.float64))
        self.b2 = nn.Parameter(torch.ones(2, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b1 + self.b2


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_parameters_given_one_gradient_tensor_accumulate_as_locally(input_grad, start_server):
    local, remote = _Biases(), RemoteModule(start_server(_Biases()).address)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.5, momentum=0.9)
    opt = RemoteOptimizer(remote, "SGD", lr=0.5, momentum=0.9)
    for step in range(3):
        for micro in range(2):  # two Backwards accumulate into each Step
            g = torch.arange(8, dtype=torch.float64).reshape(2, 4) * (step + micro + 1)
            x = torch.full((2, 4), float(micro), dtype=torch.float64, requires_grad=input_grad)
            x_remote = x.detach().clone().requires_grad_(input_grad)
            local(x).backward(g)
            remote(x_remote).backward(g)
            if input_grad:
                assert torch.equal(x_remote.grad, x.grad)
        local_opt.step()
        opt.step()
        local_opt.zero_grad()
        opt.zero_grad()
    state = remote.remote_state_dict()
    for name, param in local.named_parameters():
        assert torch.equal(state[name], param.detach()), name


def test_backward_twice_and_autograd_grad(start_server):
    torch.manual_seed(0)
    trunk = nn.Linear(3, 3).double()
    local = copy.deepcopy(trunk)
    remote = RemoteModule(start_server(trunk).address)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = remote(x)
    first = torch.autograd.grad(y.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad((2 * y).sum(), x)[0]
    expected = torch.autograd.grad(local(x).sum(), x)[0]
    assert torch.equal(first, expected)
    assert torch.equal(second, 2 * expected)


def test_contexts_are_released_and_no_grad_keeps_nothing(start_server):
    server = start_server(nn.Linear(4, 4))
    remote = RemoteModule(server.address)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        remote(x)
    with torch.inference_mode():
        remote(x)
        made_here = torch.randn(2, 4)  # an inference tensor: it tracks no version
        remote(made_here)
    with torch.no_grad():
        remote(made_here)
    assert server.stats()["contexts"] == 0
    remote(made_here).sum().backward()  # a kept forward of an inference tensor, too
    wait_for(lambda: server.stats()["contexts"] == 0, timeout=10.0)
    y = remote(x)
    assert server.stats()["contexts"] == 1
    y.sum().backward()  # no retain_graph: the client's graph is freed, so the context goes too
    wait_for(lambda: server.stats()["contexts"] == 0, timeout=10.0)
    y = remote(x)
    del y  # a forward that is never backwarded: released when its graph is dropped
    wait_for(lambda: server.stats()["contexts"] == 0, timeout=10.0)


def test_train_and_eval_switch_the_trunk_mode(start_server):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Dropout(0.5))
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    x = torch.ones(1000)
    remote.eval()
    assert torch.equal(remote(x), x)
    remote.train()
    dropped = remote(x)
    assert (dropped == 0).any() and (dropped == 2).any()
    # Backward uses the forward's mask: the gradient is zero exactly where the output is.
    x.requires_grad_()
    out = remote(x)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())


def test_seeded_forwards_leave_the_process_rng_as_it_was(start_server):
    # The server runs in this process: pinning each forward's dropout to its seed (training
    # forwards kept for Backward, and the Backward of a server that recomputes) must not move
    # the process-wide generator that the rest of the program draws from.
    trunk = nn.Sequential(nn.Dropout(0.5))
    plain = start_server(trunk)
    recomputing = start_server(copy.deepcopy(trunk), ServerOptions(recompute=True))
    x = torch.ones(1000, requires_grad=True)
    for server in (plain, recomputing):
        with RemoteModule(server.address) as remote:
            remote.client.info()  # connect first
            before = torch.get_rng_state()
            first, second = remote(x), remote(x)
            (first + second).sum().backward()
            after = torch.get_rng_state()
        assert torch.equal(before, after)
        assert not torch.equal(first, second)  # each forward drew a mask of its own
        assert torch.equal(x.grad, (first + second).detach())  # Backward used those masks
        x.grad = None


def test_remote_module_in_sequential(start_server):
    server = start_server(nn.Linear(4, 4))
    remote = RemoteModule(server.address)
    model = nn.Sequential(nn.Linear(3, 4), remote, nn.Linear(4, 2))
    assert len(list(remote.parameters())) == 0
    assert len(list(model.parameters())) == 4  # the local layers only
    assert repr(server.address) in repr(model)
    model.eval()
    assert not remote.training
    out = model(torch.randn(5, 3))
    assert out.shape == (5, 2)


def test_remote_module_in_sequential_computes_the_local_model(start_server):
    """In an nn.Sequential, train()/eval() reach the trunk (its dropout), and outputs and every
    gradient are those of the same Sequential run locally (float64, exact)."""
    torch.manual_seed(0)
    bottom, top = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).double()
    local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
    server = start_server(trunk)
    model = nn.Sequential(bottom, RemoteModule(server.address), top)
    x = torch.randn(5, 3, dtype=torch.float64)
    model.eval()
    local.eval()
    out = model(x)
    expected = local(x)
    assert torch.equal(out, expected)  # no dropout: the trunk ran in eval mode
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(
        model.parameters(), [*local[0].parameters(), *local[2].parameters()], strict=True
    ):
        assert torch.equal(a.grad, b.grad)
    grads = server.engine.sessions.values()[0].grads
    for name, param in local[1].named_parameters():
        assert torch.equal(grads[name], param.grad), name
    model.train()
    dropped = model[1](torch.ones(4, 4, dtype=torch.float64) * 10)
    assert (dropped == 0).any()  # train() reached it too: dropout zeroes some outputs


def test_several_inputs_values_and_nested_outputs(start_server):
    class Mixer(nn.Module):
        def forward(self, a, b, *, scale, options):
            return {"sum": a + b * scale, "pair": (a * b, a.argmax(-1)), "echo": options}

    server = start_server(Mixer())
    remote = RemoteModule(server.address)
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    options = {"name": "x", "flags": [True, None, 2.5], "shape": (1, 2)}
    out = remote(a, b, scale=3.0, options=options)
    assert out["echo"] == options
    assert out["pair"][1].dtype == torch.int64 and not out["pair"][1].requires_grad
    (out["sum"].sum() + out["pair"][0].sum()).backward()
    torch.testing.assert_close(a.grad, 1 + b.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b.grad, 3 + a.detach(), rtol=0, atol=0)


def test_server_dtype_is_invisible_to_the_caller(start_server):
    """A trunk served in float64 takes and returns the caller's float32, like a local
    ``trunk.double()`` wrapped in casts."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    local = copy.deepcopy(trunk).double()
    remote = RemoteModule(start_server(trunk, ServerOptions(dtype="float64")).address)
    x = torch.randn(3, 4, requires_grad=True)
    local_x = x.detach().clone().requires_grad_()
    out = remote(x)
    expected = local(local_x.double()).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, local_x.grad)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_server_dtype_computes_like_the_cast_local_trunk(start_server, dtype):
    """ServerOptions.dtype=bf16/fp16: the trunk runs in that dtype, the caller sends and gets
    float32; equal to ``trunk.to(dtype)`` wrapped in the same casts, run locally."""
    half = getattr(torch, dtype)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    local = copy.deepcopy(trunk).to(half)
    server = start_server(trunk, ServerOptions(dtype=dtype))
    assert next(server.engine.module.parameters()).dtype == half
    remote = RemoteModule(server.address)
    x = torch.randn(5, 4, requires_grad=True)
    local_x = x.detach().clone().requires_grad_()
    out = remote(x)
    expected = local(local_x.to(half)).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    grad = torch.randn(5, 3)
    out.backward(grad)
    expected.backward(grad)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, local_x.grad)
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.named_parameters():
        assert grads[name].dtype == half
        assert torch.equal(grads[name], param.grad), name


@pytest.mark.parametrize("quantization", ["bf16", "fp16", "int8"])
def test_wire_quantization_end_to_end(start_server, quantization):
    """activation_quantization / gradient_quantization: the client quantizes what it sends,
    and asks the server (reply_quantization) to quantize what comes back. Each value is then
    exactly the codec's round trip of the same value computed locally."""
    from remote_autograd import ClientOptions
    from remote_autograd.codec import decode, encode

    def wire(tensor: torch.Tensor) -> torch.Tensor:
        return decode(encode(tensor, quantization=quantization))

    torch.manual_seed(0)
    # float64: the server's and the local forward agree bit for bit, so a value on a rounding
    # boundary of the lossy codec rounds the same way on both sides.
    trunk = nn.Sequential(nn.Linear(300, 300), nn.Tanh()).double()  # int8 blocks of 256
    local = copy.deepcopy(trunk)
    server = start_server(trunk)
    options = ClientOptions(
        activation_quantization=quantization, gradient_quantization=quantization
    )
    remote = RemoteModule(server.address, options=options)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 300, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 300, generator=generator, dtype=torch.float64)
    out = remote(x)
    sent = wire(x.detach()).requires_grad_()  # what the server received
    expected = local(sent)
    assert not torch.equal(wire(expected), expected)  # the codec is lossy here...
    assert torch.equal(out, wire(expected))  # ... and the reply went through it
    out.backward(grad)
    expected.backward(wire(grad))
    assert torch.equal(x.grad, wire(sent.grad))
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.named_parameters():
        # The trunk's own gradients never cross the wire: equal up to float64 summation order
        # (the server's thread may split the reduction differently after other tests).
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-15, msg=name)
    raw = 4 * 300 * 8
    assert remote.client.stats.bytes_received < 0.6 * 2 * raw  # both replies were quantized


@pytest.mark.parametrize("way", ["plain", "micro_batches", "pipelined"])
def test_a_top_that_changes_the_trunks_output_in_place_trains_as_locally(start_server, way):
    """``ReLU(inplace=True)`` right after the trunk, as after a local layer. The trunk's
    outputs were views of the receive buffer, which autograd forbids changing in place."""
    from remote_autograd import ClientOptions, PipelinedStep

    torch.manual_seed(3)
    bottom, trunk = nn.Linear(3, 4).double(), nn.Linear(4, 4).double()
    top = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
    server = start_server(trunk)
    options = ClientOptions(micro_batches=2 if way == "micro_batches" else 1)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).square().mean()

    with RemoteModule(server.address, options=options) as remote:
        if way == "pipelined":
            loss = PipelinedStep(bottom, remote, top, loss_fn, micro_batches=2)(x, y)
        else:
            loss = loss_fn(top(remote(bottom(x))), y)
            loss.backward()
        (session,) = server.engine.sessions.values()
        trunk_grads = dict(session.grads)
    expected = loss_fn(local(x), y)
    expected.backward()
    tol = {"rtol": 0, "atol": 0} if way == "plain" else {"rtol": 0, "atol": 1e-15}
    torch.testing.assert_close(loss, expected.detach(), **tol)
    for mine, theirs in [(bottom, local[0]), (top, local[2])]:
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, **tol)
    for name, param in local[1].named_parameters():
        torch.testing.assert_close(trunk_grads[name], param.grad, **tol)


@pytest.mark.parametrize("recompute", [False, True], ids=["graph", "recompute"])
@pytest.mark.parametrize("needs_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_a_trunk_that_changes_its_input_in_place_trains_as_locally(
    start_server, recompute, needs_grad
):
    """``x += pos`` and ``ReLU(inplace=True)`` on the trunk's input work locally on the output
    of the layer before. The server's input is a leaf (which refuses that, when it requires
    grad) and, under ServerOptions(recompute=True), what the forward runs from again at
    Backward (which would start from the changed input). Outputs, input gradients and the
    trunk's gradients (one SGD step, lr=1) equal local ones, over two steps."""
    server = start_server(AddsInPlace(), ServerOptions(recompute=recompute))
    remote = RemoteModule(server.address)
    remote_opt = RemoteOptimizer(remote, "SGD", lr=1.0)
    local = AddsInPlace()
    local_opt = torch.optim.SGD(local.parameters(), lr=1.0)
    for step in range(2):
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        remote_x = x.clone().requires_grad_(needs_grad)
        local_x = x.clone().requires_grad_(needs_grad)
        remote_opt.zero_grad()
        local_opt.zero_grad()
        out = remote(remote_x)
        # Locally the trunk's input is the output of a layer before it (a leaf refuses it).
        expected = local(local_x * 1.0)
        assert torch.equal(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        if needs_grad:
            assert torch.equal(remote_x.grad, local_x.grad)
        remote_opt.step()
        local_opt.step()
        state = remote.remote_state_dict()
        for name, value in local.state_dict().items():
            assert torch.equal(state[name], value), (step, name)


def test_the_servers_threads_run_the_trunk_with_the_processs_thread_count(start_server):
    """torch.set_num_threads(1), then a trunk served in this process: the server's worker
    threads must run oneDNN's kernels (a channels_last float32 convolution) with one thread
    too. They used one per core, and the weight gradient's summation order differed from the
    same convolution run here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        local = nn.Conv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
        server = start_server(copy.deepcopy(local))
        remote = RemoteModule(server.address)
        remote_opt = RemoteOptimizer(remote, "SGD", lr=1e-3)
        local_opt = torch.optim.SGD(local.parameters(), lr=1e-3)
        x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(5))
        weights = torch.arange(1.0, 4 * 16 * 16 * 16 + 1).reshape(4, 16, 16, 16) / 16384
        expected = local(x)
        (expected * weights).sum().backward()
        out = remote(x)
        (out * weights).sum().backward()
        assert torch.equal(out, expected)
        remote_opt.step()
        local_opt.step()
        state = remote.remote_state_dict()
        for name, param in local.named_parameters():
            assert torch.equal(state[name], param.detach()), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_outputs_the_trunk_gives_without_a_graph_need_no_gradient_as_locally(
    start_server, micro_batches
):
    """A detached output, a buffer, an output computed under no_grad: locally they do not
    require grad, and a backward through them alone is refused. They came back requiring
    grad, and such a backward went through without a word (a loss built on the wrong output
    trained nothing)."""
    server = start_server(SomeOutputsDetached())
    options = ClientOptions(micro_batches=micro_batches)
    remote = RemoteModule(server.address, options=options)
    optimizer = RemoteOptimizer(remote, "SGD", lr=1.0)
    local = SomeOutputsDetached()
    x = torch.randn(6, 4, dtype=torch.float64)
    outputs, expected = remote(x.clone()), local(x.clone())
    assert [o.requires_grad for o in outputs] == [o.requires_grad for o in expected]
    assert [o.requires_grad for o in outputs] == [True, False, False, False]
    exact = {"rtol": 0, "atol": 0 if micro_batches == 1 else 1e-12}  # slices: kernels, order
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, **exact)
    with pytest.raises(RuntimeError, match="does not require grad"):
        outputs[1].sum().backward()
    (outputs[0].square().sum() + outputs[1].sum()).backward()  # the graph's part only
    (expected[0].square().sum() + expected[1].sum()).backward()
    optimizer.step()
    state = remote.remote_state_dict()
    with torch.no_grad():
        for name, param in local.named_parameters():
            torch.testing.assert_close(state[name], param - param.grad, **exact)
