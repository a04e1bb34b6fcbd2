"""The trunk's state behaves like a local module's: state_dict() checkpoints, BatchNorm
statistics (also under recompute), a second backward, and requires_grad_(False)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from models import mlp_parts
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TransportError,
)

STEPS = 3


def bn_parts(seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """bottom, a trunk with two BatchNorm layers, top; float64."""
    torch.manual_seed(seed)
    bottom = nn.Linear(5, 8)
    trunk = nn.Sequential(
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8)
    )
    top = nn.Linear(8, 3)
    return bottom.double(), trunk.double(), top.double()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))


def _models(start_server, options: ServerOptions | None = None, seed: int = 0):
    """(local model, split model, server) built from the same bn_parts."""
    bottom, trunk, top = bn_parts(seed)
    local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
    server = start_server(trunk, options)
    return local, nn.Sequential(bottom, RemoteModule(server.address), top), server


def _train(local: nn.Module, split: nn.Module, steps: int = STEPS, lost_context=None) -> None:
    """SGD with momentum on both; the split model's trunk through a RemoteOptimizer."""
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    client_opt = torch.optim.SGD(split.parameters(), lr=0.1, momentum=0.9)
    trunk_opt = RemoteOptimizer(split[1], torch.optim.SGD, lr=0.1, momentum=0.9)
    for step in range(steps):
        for opt in (local_opt, client_opt, trunk_opt):
            opt.zero_grad()
        x = _batch(step)
        local(x).square().mean().backward()
        loss = split(x).square().mean()
        if lost_context is not None:
            lost_context()
        loss.backward()
        for opt in (local_opt, client_opt, trunk_opt):
            opt.step()


def _assert_states_equal(state: dict, reference: dict) -> None:
    assert list(state) == list(reference) or set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_state_dict_is_a_complete_checkpoint(start_server):
    """model.state_dict() holds the trunk's parameters and BatchNorm statistics, fetched from
    the server; loaded into a fresh split model on a new server, eval outputs are the same."""
    local, split, server = _models(start_server)
    _train(local, split)
    state = split.state_dict()
    assert list(state) == list(local.state_dict())  # the same keys, in the same order
    assert {"1.1.running_mean", "1.1.running_var", "1.4.num_batches_tracked"} <= set(state)
    _assert_states_equal(state, local.state_dict())  # float64, bit for bit
    assert int(state["1.1.num_batches_tracked"]) == STEPS
    assert split[1].remote_info()["buffers"] == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "4.running_mean",
        "4.running_var",
        "4.num_batches_tracked",
    ]
    trunk_state = split[1].remote_state_dict()
    _assert_states_equal(trunk_state, local[1].state_dict())
    x = _batch(100)
    local.eval()
    split.eval()
    expected = split(x)
    assert torch.equal(expected, local(x))
    file = io.BytesIO()
    torch.save(split.state_dict(), file)
    server.stop(grace=None)  # the first server is gone: the checkpoint must be enough

    _, fresh, _ = _models(start_server, seed=7)  # other random weights and statistics
    file.seek(0)
    result = fresh.load_state_dict(torch.load(file))
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    _assert_states_equal(fresh[1].remote_state_dict(), local[1].state_dict())
    # The buffers alone, through load_remote_state_dict, also reach the server.
    fresh[1].load_remote_state_dict({"1.running_mean": torch.zeros(8, dtype=torch.float64)})
    assert torch.equal(fresh[1].remote_state_dict()["1.running_mean"], torch.zeros(8).double())


def test_loading_into_an_unreachable_trunk_raises(start_server):
    local, split, server = _models(start_server)
    state = local.state_dict()
    server.stop(grace=None)
    stranded = nn.Sequential(
        nn.Linear(5, 8).double(),
        RemoteModule(server.address, options=ClientOptions(connect_timeout=1.0, retries=0)),
        nn.Linear(8, 3).double(),
    )
    with pytest.raises(TransportError):
        stranded.load_state_dict(state)
    with pytest.raises(TransportError):
        stranded.state_dict()


def test_load_state_dict_reports_trunk_keys_like_pytorch(start_server):
    local, split, server = _models(start_server)
    reference = copy.deepcopy(local)
    torch.nn.init.ones_(local[1][0].weight)  # the checkpoint differs from the served trunk
    state = local.state_dict()
    del state["1.1.running_var"]
    state["1.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as raised:
        split.load_state_dict(state)
    message = str(raised.value)
    assert 'Missing key(s) in state_dict: "1.1.running_var"' in message
    assert 'Unexpected key(s) in state_dict: "1.extra"' in message
    reference.load_state_dict(state, strict=False)  # what PyTorch does to a local model
    result = split.load_state_dict(state, strict=False)
    assert result.missing_keys == ["1.1.running_var"]
    assert result.unexpected_keys == ["1.extra"]
    _assert_states_equal(split.state_dict(), reference.state_dict())
    # A shape that does not fit is an error whatever strict is; the trunk loads nothing.
    before = split[1].remote_state_dict()
    bad = local.state_dict()
    bad["1.3.weight"] = torch.zeros(8, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"3\.weight: expected shape \[8, 8\]"):
        split.load_state_dict(bad, strict=False)
    _assert_states_equal(split[1].remote_state_dict(), before)
    bad = local.state_dict()
    bad["1.1.num_batches_tracked"] = torch.tensor(1.5)  # a float for an integer counter
    with pytest.raises(RuntimeError, match=r"1\.num_batches_tracked: expected torch\.int64"):
        split.load_state_dict(bad)
    _assert_states_equal(split[1].remote_state_dict(), before)


@pytest.mark.parametrize("how", ["server_recompute", "lost_context"])
def test_recompute_updates_batchnorm_statistics_once(start_server, how):
    """Running statistics after training equal local training's, bit for bit, when Backward
    runs the forward again (ServerOptions.recompute, or a context the server lost)."""
    options = ServerOptions(recompute=True) if how == "server_recompute" else None
    local, split, server = _models(start_server, options)
    lost = []

    def lose_context() -> None:
        cache = server.engine.contexts
        ttl, cache.ttl = cache.ttl, 0.0
        try:
            lost.append(cache.expire())  # as the sweeper does after context_ttl
        finally:
            cache.ttl = ttl

    _train(local, split, lost_context=lose_context if how == "lost_context" else None)
    if how == "lost_context":
        assert lost == [1] * STEPS  # every step's Backward recomputed its forward
    else:
        assert server.engine.options.recompute
    _assert_states_equal(split[1].remote_state_dict(), local[1].state_dict())
    assert int(split[1].remote_state_dict()["1.num_batches_tracked"]) == STEPS


def test_a_second_backward_without_retain_graph_raises_like_pytorch(start_server):
    _, trunk, _ = mlp_parts(torch.float64)
    local = copy.deepcopy(trunk)
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    local_x, remote_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    local_loss = local(local_x).sum()
    remote_loss = remote(remote_x).sum()
    local_loss.backward()
    remote_loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as ours:
        remote_loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as theirs:
        local_loss.backward()
    assert type(ours.value) is type(theirs.value)
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.named_parameters():
        assert torch.equal(grads[name], param.grad), name  # not doubled
    assert torch.equal(remote_x.grad, local_x.grad)

    # With retain_graph, twice accumulates twice, exactly as locally.
    local.zero_grad()
    RemoteOptimizer(remote, torch.optim.SGD, lr=0.1).zero_grad()
    local_x.grad = remote_x.grad = None
    local_loss = local(local_x).sum()
    remote_loss = remote(remote_x).sum()
    for _ in range(2):
        local_loss.backward(retain_graph=True)
        remote_loss.backward(retain_graph=True)
    norms = remote.client.grad_norms(2.0)[0]  # also applies the pending zero_grad first
    assert len(norms) == 4
    grads = server.engine.sessions.values()[0].grads
    for name, param in local.named_parameters():
        assert torch.equal(grads[name], param.grad), name
    assert torch.equal(remote_x.grad, local_x.grad)


def test_requires_grad_false_freezes_the_trunk_for_this_client(start_server):
    bottom, trunk, top = mlp_parts(torch.float64)
    local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
    local[1].requires_grad_(False)
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    assert remote.requires_grad_(False) is remote
    split = nn.Sequential(bottom, remote, top)
    initial = remote.remote_state_dict()
    local_opt = torch.optim.SGD([p for p in local.parameters() if p.requires_grad], lr=0.1)
    client_opt = torch.optim.SGD(split.parameters(), lr=0.1)
    trunk_opt = RemoteOptimizer(remote, torch.optim.SGD, lr=0.1, weight_decay=0.1)
    generator = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        x = torch.randn(4, 6, dtype=torch.float64, generator=generator)
        for opt in (local_opt, client_opt, trunk_opt):
            opt.zero_grad()
        local(x).square().mean().backward()
        split(x).square().mean().backward()
        for a, b in zip(local[0].parameters(), split[0].parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)  # the gradient through the frozen trunk
        assert server.engine.sessions.values()[0].grads == {}
        for opt in (local_opt, client_opt, trunk_opt):
            opt.step()
    _assert_states_equal(remote.remote_state_dict(), initial)  # the trunk did not move
    for index in (0, 2):  # bottom and top trained as they did locally
        for a, b in zip(local[index].parameters(), split[index].parameters(), strict=True):
            assert torch.equal(a, b)
    # Nothing asks for a gradient: the server keeps no context for a frozen trunk.
    with torch.no_grad():
        hidden = split[0](torch.randn(2, 6, dtype=torch.float64))
    remote(hidden)
    assert server.stats()["contexts"] == 0
    # Unfrozen, it trains again.
    assert remote.trunk_requires_grad is False
    remote.requires_grad_(True)
    remote(hidden).sum().backward()
    assert set(server.engine.sessions.values()[0].grads) == {n for n, _ in trunk.named_parameters()}
    # Frozen between forward and backward: no gradient, as for a local parameter (autograd
    # looks at requires_grad when the backward reaches it).
    trunk_opt.zero_grad()
    out = remote(hidden)
    remote.requires_grad_(False)
    out.sum().backward()
    assert server.engine.sessions.values()[0].grads == {}
