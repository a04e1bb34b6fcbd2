"""Several clients training one shared trunk (the semantics are in docs/security.md):

- each session accumulates its own gradients; its Step applies only those, with its own
  optimizer, to the shared weights;
- a Step waits until every other session's forward at the current weights has had its Backward
  (up to ServerOptions.step_wait), so no Step lands between another client's forward and
  backward; a forward whose weights moved anyway (the wait ran out) is refused at Backward
  with StaleContext, never answered with a gradient of the wrong weights.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from factories import batch, dropout_trunk
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    StaleContext,
)

CLIENTS = 8
STEPS = 50


def test_eight_clients_fifty_steps_each(start_server):
    server = start_server(dropout_trunk(), ServerOptions(max_workers=16))
    errors: list[BaseException] = []
    peak_contexts = [0]
    last_steps: list[int] = []
    stale = [0]
    last_steps: list[int] = []

    def train(index: int) -> None:
        try:
            head = nn.Linear(8, 2).double()
            with RemoteModule(server.address, options=ClientOptions(seed=index)) as trunk:
                optimizer = RemoteOptimizer(trunk, "SGD", lr=0.01)
                local = torch.optim.SGD(head.parameters(), lr=0.01)
                for step in range(1, STEPS + 1):
                    x, y = batch(1000 * index + step)
                    x = torch.cat([x, x], dim=1)  # 8 features
                    while True:
                        optimizer.zero_grad()
                        local.zero_grad()
                        loss = F.mse_loss(head(trunk(x)), y)
                        peak_contexts[0] = max(peak_contexts[0], server.stats()["contexts"])
                        try:
                            loss.backward()
                            break
                        except StaleContext:  # only if a Step gave up waiting for us
                            stale[0] += 1
                    optimizer.step()
                    local.step()
                last_steps.append(_session(server, trunk).last_step)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = server.stats()
    assert stats["weights_version"] == CLIENTS * STEPS  # every step applied, none twice
    assert sorted(last_steps) == [STEPS] * CLIENTS
    assert stats["sessions"] == 0  # each client's close() ended its session
    assert stats["contexts"] == 0 and stats["context_bytes"] == 0  # nothing leaked
    assert stats["inflight_bytes"] == 0
    assert server.engine.turns.others_holding("") == 0  # no forward left waiting
    assert peak_contexts[0] <= 2 * CLIENTS  # each client holds one graph (and a release)
    assert all(torch.isfinite(p).all() for p in server.engine.module.parameters())
    print(f"stale backwards redone: {stale[0]}")


def _session(server, remote: RemoteModule):
    key = remote.client.session_id
    return next(s for s in server.engine.sessions.values() if s.key.endswith(key))


def _shared_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3).double()


def _local_grads(weights: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    module = _shared_linear()
    module.load_state_dict(weights)
    module(x).square().sum().backward()
    return {n: p.grad for n, p in module.named_parameters()}


def test_a_step_waits_for_another_clients_backward(start_server):
    server = start_server(_shared_linear(), ServerOptions(step_wait=60.0))
    a, b = RemoteModule(server.address), RemoteModule(server.address)
    opt_a, opt_b = RemoteOptimizer(a, "SGD", lr=0.1), RemoteOptimizer(b, "SGD", lr=0.1)
    w0 = {k: v.detach().clone() for k, v in server.engine.module.state_dict().items()}
    xa = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xb = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    out_a = a(xa)  # A's forward on w0 ...
    b(xb).square().sum().backward()
    stepping = threading.Thread(target=opt_b.step)
    stepping.start()  # ... B's step must wait for A's backward
    out_a.square().sum().backward()
    stepping.join()

    ga, gb = _local_grads(w0, xa), _local_grads(w0, xb)
    session_a = _session(server, a)
    for name, grad in ga.items():  # A's gradient is that of the weights its forward saw
        assert torch.equal(session_a.grads[name], grad), name
    opt_a.step()  # applied to the weights B moved: each step applies its own session's grads
    local = _shared_linear()
    local.load_state_dict(w0)
    local_sgd = torch.optim.SGD(local.parameters(), lr=0.1)
    for grads in (gb, ga):  # B's step, then A's: both gradients of w0
        for name, param in local.named_parameters():
            param.grad = grads[name]
        local_sgd.step()
    for name, value in server.engine.module.state_dict().items():
        assert torch.equal(value, local.state_dict()[name]), name
    assert server.stats()["weights_version"] == 2


def test_a_step_that_stopped_waiting_makes_the_old_forward_stale(start_server):
    server = start_server(_shared_linear(), ServerOptions(step_wait=0.1))
    a, b = RemoteModule(server.address), RemoteModule(server.address)
    RemoteOptimizer(a, "SGD", lr=0.1)
    opt_b = RemoteOptimizer(b, "SGD", lr=0.1)
    x = torch.ones(2, 4, dtype=torch.float64)
    out_a = a(x)  # A wanders off before its backward
    b(x).sum().backward()
    with pytest.warns(RuntimeWarning, match="whole step_wait budget"):
        opt_b.step()  # gives up waiting for A after step_wait
    assert b.client.stats.step_waits_expired == 1
    moved = {k: v.clone() for k, v in server.engine.module.state_dict().items()}
    try:
        out_a.sum().backward()
    except StaleContext as exc:
        assert "were stepped (version 0 -> 1)" in str(exc)
    else:
        raise AssertionError("a backward through moved weights was answered")
    session_a = _session(server, a)
    assert session_a.grads == {}  # nothing accumulated from the stale forward
    for name, value in server.engine.module.state_dict().items():
        assert torch.equal(value, moved[name])
    a(x).sum().backward()  # A simply runs its forward again


class _ModeCheckpointed(nn.Module):
    """A block checkpointed inside the trunk whose computation depends on the module's mode
    (as BatchNorm's or stochastic depth's does): its backward runs its forward again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 4)]).double()

    def block(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layers[0](t) * (1.0 if self.training else 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.layers[1](checkpoint(self.block, x, use_reentrant=False))


def test_a_kept_graphs_backward_runs_in_its_forwards_mode(start_server):
    """Another client's eval forward between a training forward and its Backward left the trunk
    in eval mode, and the checkpointed block inside it ran its forward again in that mode:
    gradients of a forward that never ran (0.26 off). Float64, bit for bit with local."""
    local = _ModeCheckpointed()
    server = start_server(copy.deepcopy(local))
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    local(xs[1]).square().mean().backward()
    with RemoteModule(server.address) as mine, RemoteModule(server.address) as other:
        loss = mine(xs[0]).square().mean()
        other.eval()
        with torch.no_grad():
            other(torch.randn(2, 4, dtype=torch.float64))
        loss.backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_threads_sharing_a_remote_module_keep_each_others_gradients(start_server, micro_batches):
    """One RemoteModule trained from two threads at once, each a forward and backward of its
    own batch after zero_grad(), as torch allows for a local module: the gradients add up.
    The deferred zero_grad() rides on the first thread's Backward (with micro_batches, on a
    GradNorm sent before the slices'), and the other's must not reach the server before it
    (it would be zeroed with the last step's). Forced here: the call carrying it is held back
    before it is sent."""

    def trunk() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).double()

    server = start_server(trunk())
    remote = RemoteModule(server.address, options=ClientOptions(micro_batches=micro_batches))
    remote_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
    local = trunk()
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    client = remote.client
    exchange, carrying, held_back = client._exchange, client._call_carrying, []

    def hold_back() -> None:
        held_back.append(1)
        threading.Event().wait(0.3)  # the other thread's Backward is ready by now

    def carrier_last(name, header, *args, **kwargs):
        if name == "Backward" and header.zero_grad:
            hold_back()
        return exchange(name, header, *args, **kwargs)

    def gradnorm_last(method, invoke, zero, scale):
        if method == "GradNorm" and zero:
            hold_back()
        return carrying(method, invoke, zero, scale)

    client._exchange, client._call_carrying = carrier_last, gradnorm_last
    errors: list[BaseException] = []

    def train(x: torch.Tensor) -> None:
        try:
            remote(x).tanh().sum().backward()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        xs = [torch.randn(4, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
        remote_opt.zero_grad()
        local_opt.zero_grad()
        threads = [threading.Thread(target=train, args=(x,)) for x in xs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for x in xs:
            local(x).tanh().sum().backward()
        remote_opt.step()
        local_opt.step()
    assert len(held_back) == 3  # every step's zero_grad() rode on one call
    state = remote.remote_state_dict()
    exact = {"rtol": 0, "atol": 0 if micro_batches == 1 else 1e-12}  # slices: summation order
    for name, value in local.state_dict().items():
        torch.testing.assert_close(state[name], value, **exact, msg=name)
