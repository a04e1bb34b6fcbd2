"""No finite message ruins the shared trunk (issue 10, guard.py).

Each attack goes to a real server; each is refused with INVALID_ARGUMENT naming what it
refused, leaves the weights, the optimizer state, the step counters and the weights version
exactly as they were, lets the attacking session go on after zero_grad(), and is followed by a
correct step of another session equal to the same step computed here.
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import sys
import threading
import weakref
from collections import Counter

import grpc
import msgpack
import pytest
import torch
from conftest import spawn_server
from factories import batchnorm_trunk, linear32_trunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

from remote_autograd import (
    ClientOptions,
    CodecError,
    InvalidRequest,
    LimitExceeded,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TrunkError,
    clip_grad_norm_,
    codec,
)
from remote_autograd import client as client_module
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd.checkpoint_file import load_checkpoint
from remote_autograd.guard import StepBackup, check_hyperparameters, guarded_step
from remote_autograd.sessions import ANONYMOUS
from remote_autograd.validate import clone_tree

# Every attack here is followed by another session training the same trunk from the weights
# the attack left (unchanged): starting from a stepped trunk is the point (SteppedTrunkWarning).
pytestmark = pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")

OPTIMIZERS = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Adam": {"lr": 0.01},
    "AdamW": {"lr": 0.01, "weight_decay": 0.1},
}


def _x(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _weights(server) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in server.engine.params}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _session(server, remote: RemoteModule):
    (session,) = [
        s for s in server.engine.sessions.values() if s.key.endswith("/" + remote.client.session_id)
    ]
    return session


class _Snapshot:
    """Everything a refused call must leave as it was."""

    def __init__(self, server, remote: RemoteModule) -> None:
        session = _session(server, remote)
        self.weights = _weights(server)
        self.version = server.stats()["weights_version"]
        self.last_step = session.last_step
        self.grads = clone_tree(session.grads)
        self.optimizer = (
            None if session.optimizer is None else clone_tree(session.optimizer.state_dict())
        )
        self.groups = None if session.optimizer is None else self.optimizer["param_groups"]

    def assert_unchanged(self, server, remote: RemoteModule) -> None:
        session = _session(server, remote)
        assert _same(self.weights, _weights(server)), "the refused call moved the weights"
        assert server.stats()["weights_version"] == self.version
        assert session.last_step == self.last_step
        assert _same(self.grads, session.grads), "the refused call changed the gradients"
        if self.optimizer is not None:
            now = session.optimizer.state_dict()
            assert now["param_groups"] == self.optimizer["param_groups"]
            assert now["state"].keys() == self.optimizer["state"].keys()
            for index, entries in self.optimizer["state"].items():
                for key, value in entries.items():
                    assert torch.equal(now["state"][index][key], value), (index, key)


def _local(factory, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    trunk = factory()
    state = trunk.state_dict()  # parameters and buffers, sharing the module's tensors
    with torch.no_grad():
        for name, _ in trunk.named_parameters():
            state[name].copy_(weights[name])
        for name, value in weights.items():  # and buffers, where given (remote_state_dict)
            state[name].copy_(value)
    return trunk


def _good_step(remote: RemoteModule, optimizer: RemoteOptimizer, x: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()
    out = remote(x)
    out.square().sum().backward()
    optimizer.step()
    return out.detach()


def _goes_on(server, remote, optimizer, snapshot: _Snapshot, factory=linear32_trunk) -> None:
    """The attacking session's next correct step, from the state the refusal left, equals the
    same step here with the saved weights and optimizer state."""
    local = _local(factory, snapshot.weights)
    local_optimizer = getattr(torch.optim, optimizer.optimizer_name)(local.parameters())
    if snapshot.optimizer is not None:
        local_optimizer.load_state_dict(clone_tree(snapshot.optimizer))
    for group in local_optimizer.param_groups:  # the hyperparameters this side steps with
        group.update({k: v for k, v in optimizer.param_groups[0].items() if k != "params"})
    x = _x(7, next(local.parameters()).dtype)
    out = _good_step(remote, optimizer, x)
    expected = local(x)
    expected.square().sum().backward()
    local_optimizer.step()
    assert torch.equal(out, expected.detach())
    assert _same(_weights(server), dict(local.named_parameters()))


def _another_session_trains(server, name="SGD", factory=linear32_trunk, address=None) -> None:
    """Another session's correct step from the weights now on the server (which must be
    finite) equals the same step computed here."""
    address = address or server.address
    with RemoteModule(address, options=ClientOptions(retries=0)) as remote:
        before = remote.remote_state_dict()
        assert all(torch.isfinite(w).all() for w in before.values())
        local = _local(factory, before)
        x = _x(11, next(local.parameters()).dtype)
        optimizer = RemoteOptimizer(remote, name, **OPTIMIZERS[name])
        out = _good_step(remote, optimizer, x)
        after = remote.remote_state_dict()
    local_optimizer = getattr(torch.optim, name)(local.parameters(), **OPTIMIZERS[name])
    expected = local(x)
    expected.square().sum().backward()
    local_optimizer.step()
    assert torch.equal(out, expected.detach())
    # The trunk's parameters and persistent buffers (BatchNorm statistics) alike.
    assert _same(after, {n: t.detach() for n, t in local.state_dict().items()})


def _start(start_server, **options) -> tuple:
    server = start_server(linear32_trunk(), ServerOptions(**options))
    remote = RemoteModule(server.address, options=ClientOptions(retries=0))
    return server, remote


# -- grad_scale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e38, 2.0, -0.5, float("inf"), float("nan")])
def test_grad_scale_out_of_bounds_is_refused_by_backward_gradnorm_and_step(start_server, value):
    """grad_scale must be finite and in (0, max_grad_scale=1]: Step(grad_scale=1e38) once left
    max|w| = inf. Each of the three calls that carry it refuses it, changing nothing."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    _good_step(remote, optimizer, _x(1))
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    for call in (
        lambda: optimizer.step(),
        lambda: remote.client.grad_norms(2.0),
        lambda: remote(_x(3)).square().sum().backward(),
    ):
        remote.client.scale_grads_later(value)
        with pytest.raises(InvalidRequest, match="grad_scale must be"):
            call()
        snapshot.assert_unchanged(server, remote)
        remote.client.zero_grad_later(True)  # the refused scale pends: drop it
        remote.client._take_grad_ops()
    assert optimizer._step_count == 1
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_huge_grad_scale_the_operator_allowed_still_cannot_ruin_the_trunk(start_server, name):
    """With max_grad_scale raised to 1e38 the scale passes its bound; the Step then finds the
    scaled gradients non-finite and is refused, the optimizer state restored exactly."""
    server, remote = _start(start_server, max_grad_scale=1e38)
    optimizer = RemoteOptimizer(remote, name, **OPTIMIZERS[name])
    _good_step(remote, optimizer, _x(1))
    optimizer.zero_grad()
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    remote.client.scale_grads_later(1e38)
    with pytest.raises(InvalidRequest, match=r"Step refused: .*gradients of trunk parameters"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, name)


# -- accumulated gradients ------------------------------------------------------------------------


def test_gradients_that_sum_past_the_dtype_range_are_never_accumulated(start_server):
    """Two Backwards whose output gradients (2e38) and parameter gradients are each finite sum to
    inf in float32: the second adds nothing, the first one's sum kept. RemoteModule asks for a
    report (GradScaler skips such a step; without one, step() raises), a client that does not
    is refused. The Step with the first one's huge (finite) gradients is refused too, since it
    would grow the weights absurdly."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    ones = torch.ones(1, 4)
    out = remote(ones)
    out.backward(torch.full_like(out, 2e38))
    snapshot = _Snapshot(server, remote)
    assert _session(server, remote).grads["weight"].max().item() == pytest.approx(2e38)
    compute = pb.Header(request_id="r" * 32, keep_context=True, needs_input_grad=[False])
    remote.client._exchange("Compute", compute, {"args": [ones], "kwargs": {}}, "activation")
    unreported = pb.Header(request_id="r" * 32, backward_seq=1, needs_input_grad=[False])
    with pytest.raises(InvalidRequest, match="accumulated gradients of trunk parameters weight"):
        grads = {"grads": [torch.full((1, 2), 2e38)]}
        remote.client._exchange("Backward", unreported, grads, "gradient")
    snapshot.assert_unchanged(server, remote)
    out = remote(ones)
    out.backward(torch.full_like(out, 2e38))  # reported: nothing added
    del out
    snapshot.assert_unchanged(server, remote)
    with pytest.raises(FloatingPointError, match="not finite"):
        optimizer.step()
    optimizer.zero_grad()
    out = remote(ones)
    out.backward(torch.full_like(out, 2e38))
    snapshot = _Snapshot(server, remote)
    with pytest.raises(InvalidRequest, match="max_weight_growth=100"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server)


# -- hyperparameters -------------------------------------------------------------------------------

ABSURD = [
    ("SGD", {"lr": 0.1}, "lr", 1e30),
    ("Adam", {"lr": 0.01}, "lr", 1e30),
    ("SGD", {"lr": 0.1}, "lr", -0.1),
    ("SGD", {"lr": 0.1}, "weight_decay", 1e30),
    ("Adam", {"lr": 0.01}, "weight_decay", 1e30),
    ("AdamW", {"lr": 0.01}, "weight_decay", 1e30),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum", 5.0),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, "dampening", -1.0),
    ("Adam", {"lr": 0.01}, "betas", (1.5, 0.999)),
    ("Adam", {"lr": 0.01}, "eps", -1e-8),
    ("RMSprop", {"lr": 0.01}, "alpha", 2.0),
    ("Adagrad", {"lr": 0.01}, "lr_decay", -1.0),
    ("Adadelta", {}, "rho", 1.5),
    ("Rprop", {}, "etas", (1.5, 0.5)),
    ("Rprop", {}, "step_sizes", (1e-6, 1e30)),
    ("ASGD", {}, "lambd", -1.0),
    ("NAdam", {}, "momentum_decay", -1.0),
]


@pytest.mark.parametrize(
    ("name", "good", "key", "bad"), ABSURD, ids=[f"{n}-{k}={v}" for n, _, k, v in ABSURD]
)
def test_absurd_hyperparameters_are_refused_by_name(start_server, name, good, key, bad):
    """At ConfigureOptimizer and in a Step (where a scheduler changes them, and where torch's
    own constructor checks never run), every hyperparameter is held to its meaning."""
    server, remote = _start(start_server)
    with pytest.raises(InvalidRequest, match=key):
        RemoteOptimizer(remote, name, **{**good, key: bad})
    assert _session(server, remote).optimizer is None
    optimizer = RemoteOptimizer(remote, name, **good)
    _good_step(remote, optimizer, _x(1))
    optimizer.zero_grad()
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    kept = optimizer.param_groups[0][key]
    optimizer.param_groups[0][key] = bad
    with pytest.raises(InvalidRequest, match=f"hyperparameter.* {key}="):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    optimizer.param_groups[0][key] = kept
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server)


def test_flags_that_shape_the_optimizer_state_cannot_change_in_a_step(start_server):
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    _good_step(remote, optimizer, _x(1))
    snapshot = _Snapshot(server, remote)
    optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(InvalidRequest, match="amsgrad of Adam param group 0 cannot change"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    optimizer.param_groups[0]["amsgrad"] = False
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, "Adam")


def test_flags_that_shape_the_optimizer_state_cannot_change_in_a_load(start_server):
    """amsgrad switched on by a loaded state without max_exp_avg_sq once made every later Step
    fail; a loaded fused=None once turned the configured fused step off."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01, fused=True)
    _good_step(remote, optimizer, _x(1))
    saved = copy.deepcopy(optimizer.state_dict())
    snapshot = _Snapshot(server, remote)
    shaping = copy.deepcopy(saved)
    shaping["param_groups"][0]["amsgrad"] = True
    with pytest.raises(InvalidRequest, match="amsgrad of Adam param group 0 cannot change in a L"):
        optimizer.load_state_dict(shaping)
    snapshot.assert_unchanged(server, remote)
    unfused = copy.deepcopy(saved)  # as a default Adam saves it
    unfused["param_groups"][0]["fused"] = None
    optimizer.load_state_dict(unfused)
    assert _session(server, remote).optimizer.param_groups[0]["fused"] is True
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, "Adam")


def _bad_states(saved: dict) -> dict[str, tuple[dict, str]]:
    """Optimizer states holding more than an Adam of these parameters keeps, and the words of
    their refusal. torch keeps an entry under an id no group lists as it was sent: one that
    was not a map once broke every offload of an adapter, and the sweeper with it."""

    def changed(change) -> dict:
        state = copy.deepcopy(saved)
        change(state["state"])
        return state

    def grouped(extra: dict) -> dict:
        state = copy.deepcopy(saved)
        state["param_groups"][0].update(extra)
        return state

    weight = next(iter(saved["state"]))
    named = copy.deepcopy(saved)
    named["param_groups"][0]["params"] = ["weight", "bias"]
    return {
        "ids not ints": (named, "'params' must list ints"),
        "unknown id": (changed(lambda s: s.update(junk=1)), "which no group lists"),
        "not a map": (changed(lambda s: s.update({weight: 5})), "expected a map"),
        "nested": (changed(lambda s: s[weight].update(deep=[[1.0]])), "a tensor or a number"),
        "too large": (
            changed(lambda s: s[weight].update(big=torch.zeros(10_000))),
            "larger than its parameter",
        ),
        "too many": (
            changed(lambda s: s[weight].update({f"k{i}": 0 for i in range(9)})),
            "at most 8 names",
        ),
        # A group's entries are kept as sent too, in every checkpoint (LR schedulers add some).
        "group key a tensor": (grouped({torch.ones(1): 1}), "map keys must be|names must be"),
        "group key an int": (grouped({7: 1}), "names must be strings of at most 64"),
        "group key long": (grouped({"k" * 65: 1}), "names must be strings of at most 64"),
        "group list long": (grouped({"table": [0.5] * 17}), "more than 16 items"),
        "group entries": (grouped({f"k{i}": 0 for i in range(64)}), "more than 64"),
    }


def test_an_optimizer_state_holding_more_than_an_optimizer_keeps_is_refused(start_server):
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    _good_step(remote, optimizer, _x(1))
    saved = copy.deepcopy(optimizer.state_dict())
    snapshot = _Snapshot(server, remote)
    for case, (state, words) in _bad_states(saved).items():
        with pytest.raises((InvalidRequest, CodecError), match=words):  # the frame's, or not
            optimizer.load_state_dict(state)
        snapshot.assert_unchanged(server, remote)
        assert set(_session(server, remote).optimizer.state) == set(
            dict(server.engine.params).values()
        ), case
    # A long string: RemoteOptimizer keeps a user's own entries on its side; a client that
    # sends one anyway is refused.
    groups = [
        {k: v for k, v in g.items() if k not in ("initial_lr", "trunk_params")}
        for g in copy.deepcopy(saved["param_groups"])
    ]
    groups[0]["note"] = "x" * 65
    with pytest.raises(InvalidRequest, match="more than 64 characters"):
        remote.client.load_state(
            {"parameters": None, "optimizer": {"state": saved["state"], "param_groups": groups}}
        )
    snapshot.assert_unchanged(server, remote)
    optimizer.load_state_dict(saved)
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, "Adam")


# -- steps whose result is non-finite or absurd ----------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_that_would_grow_the_weights_absurdly_is_refused(start_server, name):
    """lr=1e30 passes where the operator allowed it (max_lr=1e30), and the step's result is
    finite; still no step may grow a parameter past max_weight_growth x max(1, max |w|)."""
    server, remote = _start(start_server, max_lr=1e30)
    kwargs = {**OPTIMIZERS[name], "lr": 1e30, "weight_decay": 0.0}
    optimizer = RemoteOptimizer(remote, name, **kwargs)
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    with pytest.raises(InvalidRequest, match=r"grow trunk parameter (weight|bias) .*ServerOpt"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    assert not _session(server, remote).optimizer.state  # the first step's state is gone
    optimizer.param_groups[0]["lr"] = 0.01
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, name)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"momentum": 0.9, "nesterov": True, "foreach": True, "weight_decay": 0.0}),
        ("Rprop", {"foreach": True, "step_sizes": (1e-6, 1e30)}),
    ],
    ids=["SGD-nesterov-foreach", "Rprop-foreach"],
)
def test_a_refused_step_leaves_the_gradients_an_optimizer_writes(start_server, name, kwargs):
    """torch's foreach SGD with Nesterov momentum and foreach Rprop change the gradients they
    are given (in place, as they step; foreach is the default on a GPU). A refused step puts
    them back with the weights: the redone step equals the same step here."""
    server, remote = _start(start_server, max_lr=1e30)
    optimizer = RemoteOptimizer(remote, name, lr=1e30, **kwargs)
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    with pytest.raises(InvalidRequest, match=r"grow trunk parameter (weight|bias) .*ServerOpt"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    optimizer.param_groups[0]["lr"] = 0.01
    local = _local(linear32_trunk, snapshot.weights)
    local_optimizer = getattr(torch.optim, name)(local.parameters(), lr=0.01, **kwargs)
    local(_x(2)).square().sum().backward()
    optimizer.step()  # the refused step, redone from the gradients the session holds
    local_optimizer.step()
    assert _same(_weights(server), {n: p.detach() for n, p in local.named_parameters()})
    _another_session_trains(server, "Adam")


@pytest.mark.parametrize("name", [*OPTIMIZERS, "AdamW-fused"])
def test_a_step_with_a_non_finite_result_is_rolled_back_exactly(start_server, name):
    """Adam(W) with eps=0 and zero gradients divides 0 by 0 on its first step; SGD with lr=100
    overflows float32 with gradients of 1e37. The parameters become NaN or inf: refused, and
    everything restored (the first step's optimizer state removed). A fused optimizer's one
    kernel writes weights and state at once: restored alike."""
    server, remote = _start(start_server, max_weight_growth=0.0)
    name, fused = name.removesuffix("-fused"), name.endswith("-fused")
    if name == "SGD":
        optimizer = RemoteOptimizer(remote, "SGD", lr=100.0)
        out = remote(torch.ones(1, 4))
        out.backward(torch.full_like(out, 1e37))
    else:
        optimizer = RemoteOptimizer(remote, name, lr=0.01, eps=0.0, fused=fused or None)
        (remote(_x(2)) * 0).sum().backward()
    snapshot = _Snapshot(server, remote)
    with pytest.raises(InvalidRequest, match=r"make trunk parameters (weight|bias).* non-finite"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    assert not _session(server, remote).optimizer.state
    assert _session(server, remote).optimizer.defaults.get("fused") is (fused or None)
    optimizer.param_groups[0].update({"lr": 0.01} if name == "SGD" else {"eps": 1e-8})
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, name)


# -- checkpoints -----------------------------------------------------------------------------------


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    return stderr


def test_refused_attacks_never_reach_the_checkpoint_and_a_restart_brings_finite_weights(
    start_server, tmp_path
):
    """The issue's run: --checkpoint-every 1, then Step(grad_scale=1e38), two Backwards of 2e38
    and lr=1e30, all refused; another session's step and the checkpoint at stop hold exactly the
    weights computed here, and a server restarted from the file serves them."""
    path = str(tmp_path / "trunk.ckpt")
    args = ("--checkpoint", path, "--checkpoint-every", "1")
    process, address = spawn_server("factories:linear32_trunk", *args)
    try:
        options = ClientOptions(retries=0)
        with RemoteModule(address, options=options) as remote:
            optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
            x1 = _x(1)
            _good_step(remote, optimizer, x1)
            optimizer.zero_grad()
            remote(_x(2)).square().sum().backward()
            remote.client.scale_grads_later(1e38)
            with pytest.raises(InvalidRequest, match="grad_scale"):
                optimizer.step()
            optimizer.zero_grad()
            ones = torch.ones(1, 4)
            for _ in range(2):  # the second adds nothing (their sum overflows)
                out = remote(ones)
                out.backward(torch.full_like(out, 2e38))
            del out
            with pytest.raises(FloatingPointError, match="not finite"):
                optimizer.step()
            optimizer.zero_grad()
            with pytest.raises(InvalidRequest, match="lr=1e"):
                RemoteOptimizer(remote, "Adam", lr=1e30)
            assert remote.client.checkpoint().weights_version == 1
        local = linear32_trunk()
        local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
        local(x1).square().sum().backward()
        local_optimizer.step()
        saved = load_checkpoint(path)
        assert saved["weights_version"] == 1
        assert _same(saved["module"], {n: p.detach() for n, p in local.named_parameters()})
        _another_session_trains(None, address=address)
        _stop(process)  # SIGTERM: the CLI's graceful stop saves weights v2
        saved = load_checkpoint(path)
        assert saved["weights_version"] == 2
        assert all(torch.isfinite(w).all() for w in saved["module"].values())
        restarted = start_server(linear32_trunk(), ServerOptions(checkpoint_path=path))
        assert _same(_weights(restarted), saved["module"])
        _another_session_trains(restarted)
    finally:
        if process.returncode is None:
            process.kill()
            process.communicate()


def test_a_training_forward_cannot_make_the_trunks_buffers_non_finite(start_server):
    """A finite input of 1e200 through BatchNorm would make its running_var inf, and every
    session's eval outputs with it: the forward is refused, the buffers are put back."""
    server = start_server(batchnorm_trunk())
    remote = RemoteModule(server.address, options=ClientOptions(retries=0))
    before = {n: t.clone() for n, t in server.engine.module.state_dict().items()}
    for grad in (False, True):  # a forward kept for Backward, and one that is not
        x = torch.tensor([[1e200] * 4, [-1e200] * 4, [0.0] * 4], dtype=torch.float64)
        x.requires_grad_(grad)
        with pytest.raises(InvalidRequest, match=r"1\.running_var non-finite"):
            remote(x)
        assert _same(dict(server.engine.module.state_dict()), before)
    assert server.stats()["contexts"] == 0
    _another_session_trains(server, factory=batchnorm_trunk)


@pytest.mark.parametrize("recompute", [False, True], ids=["graph", "recompute"])
def test_a_kept_forward_refused_for_its_size_leaves_the_trunks_buffers_as_they_were(
    start_server, recompute
):
    """A training forward kept for Backward runs before its context can be measured: one
    larger than max_context_bytes is refused, and the BatchNorm statistics it moved (every
    session's) are put back. A smaller batch then moves them once, as the same layers do
    locally."""
    options = ServerOptions(max_context_bytes=4096, recompute=recompute)
    server = start_server(batchnorm_trunk(), options)
    remote = RemoteModule(server.address, options=ClientOptions(retries=0))
    before = {n: t.clone() for n, t in server.engine.module.state_dict().items()}
    x = torch.randn(256, 4, dtype=torch.float64)
    with pytest.raises(LimitExceeded, match=r"exceeds max_context_bytes=4096"):
        remote(x.clone().requires_grad_())
    assert _same(dict(server.engine.module.state_dict()), before)
    assert server.stats()["contexts"] == 0
    local = batchnorm_trunk()
    small, local_small = x[:8].clone().requires_grad_(), x[:8].clone().requires_grad_()
    remote(small).square().sum().backward()
    local(local_small).square().sum().backward()
    assert torch.equal(small.grad, local_small.grad)
    assert _same(dict(server.engine.module.state_dict()), dict(local.state_dict()))


def test_no_checkpoint_is_written_from_non_finite_weights(start_server, tmp_path, caplog):
    """The last line of defence: weights that are not finite however they got so (poisoned
    here directly, since no message can do it) are never saved. The Checkpoint RPC refuses
    (INTERNAL, naming the buffer), the scheduled checkpoint after a Step and the one at stop
    are skipped with an ERROR log, and a server started from the file gets the last finite
    weights."""
    path = tmp_path / "trunk.ckpt"
    options = ServerOptions(checkpoint_path=str(path), checkpoint_every=1)
    server = start_server(batchnorm_trunk(), options)
    remote = RemoteModule(server.address, options=ClientOptions(retries=0))
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    _good_step(remote, optimizer, _x(1, torch.float64))
    good = path.read_bytes()
    saved = load_checkpoint(str(path))["module"]
    with torch.no_grad():
        server.engine.module[1].running_var[0] = float("inf")
    with pytest.raises(TrunkError, match=r"trunk's 1\.running_var hold NaN or inf"):
        remote.client.checkpoint()
    remote.eval()  # a training forward would be refused now: the buffers are not finite
    with caplog.at_level(logging.ERROR, logger="remote_autograd.engine"):
        _good_step(remote, optimizer, _x(2, torch.float64))  # weights v2: a scheduled save
        server.stop(grace=None)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2, [r.getMessage() for r in caplog.records]
    assert path.read_bytes() == good
    restarted = start_server(batchnorm_trunk(), options)
    assert restarted.stats()["weights_version"] == 1
    assert _same(dict(restarted.engine.module.state_dict()), saved)
    _another_session_trains(restarted, factory=batchnorm_trunk)


# -- fuzz: recorded requests of a whole training step, mutated and replayed ------------------------

TRUNK = "/remote_autograd.v1.Trunk/"
# Finite numbers no sane client sends, and a few it might.
NUMBERS = [1e38, 3.4e38, 1e300, -1e30, -1.0, 1e-300, 5e-324, 0.0, 2.0, 1e10, 65504.0, 0.5]


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every unary request a real client sends: method, serialized message, metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, tuple]] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = tuple(client_call_details.metadata or ())
        self.calls.append((client_call_details.method, request.SerializeToString(), metadata))
        return continuation(client_call_details, request)


def _record_training_step(address: str, monkeypatch) -> list[tuple[str, bytes, tuple]]:
    """ConfigureOptimizer, Compute, Backward, GradNorm (clip_grad_norm_) and Step, as sent."""
    recorder = _Recorder()
    real = client_module.create_channel
    monkeypatch.setattr(
        client_module, "create_channel", lambda *a: grpc.intercept_channel(real(*a), recorder)
    )
    with RemoteModule(address, options=ClientOptions(bulk=False, retries=0)) as remote:
        optimizer = RemoteOptimizer(remote, "Adam", lr=0.01, weight_decay=0.01)
        remote(_x(5)).square().sum().backward()
        clip_grad_norm_([remote], 0.5)
        optimizer.step()
    monkeypatch.undo()
    step = ["ConfigureOptimizer", "Compute", "Backward", "GradNorm", "Step"]
    calls = [call for call in recorder.calls if call[0].rsplit("/", 1)[-1] in step]
    assert [call[0].rsplit("/", 1)[-1] for call in calls] == step
    assert pb.StepRequest.FromString(calls[-1][1]).grad_scale < 1.0  # the clip rides on it
    return calls


def _scale_numbers(value, factor: float):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * factor if factor else factor
    if isinstance(value, list):
        return [_scale_numbers(v, factor) for v in value]
    if isinstance(value, dict):
        return {k: _scale_numbers(v, factor) for k, v in value.items()}
    return value


def _mutate_frame(message: bytes, draw) -> bytes:
    frame = pb.Frame.FromString(message)
    kind = draw(st.sampled_from(["tensors", "header", "truncate", "flip"]))
    if kind == "tensors":  # the payload's numbers made absurd (finite: scaled in float64)
        factor = draw(st.sampled_from(NUMBERS))
        value = codec.decode(frame.payload)

        def scaled(tensor):
            big = tensor.double() * factor
            return big.clamp(-torch.finfo(tensor.dtype).max, torch.finfo(tensor.dtype).max).to(
                tensor.dtype
            )

        value = tree_map(lambda t: scaled(t) if isinstance(t, torch.Tensor) else t, value)
        frame.payload = codec.encode(value, compression="none")
        frame.header.payload_bytes = len(frame.payload)
    elif kind == "header":
        field = draw(st.sampled_from(["grad_scale", "backward_seq", "zero_grad", "flags", "id"]))
        header = frame.header
        if field == "grad_scale":
            header.grad_scale = draw(st.sampled_from(NUMBERS))
        elif field == "backward_seq":
            header.backward_seq = draw(st.integers(0, 3))
        elif field == "zero_grad":
            header.zero_grad = draw(st.integers(0, 5))
        elif field == "flags":
            header.training = not header.training
            header.keep_context = not header.keep_context
            flags = [not flag for flag in header.needs_input_grad] or [True]
            del header.needs_input_grad[:]
            header.needs_input_grad.extend(flags)
        else:
            header.request_id = draw(st.sampled_from(["", "x", header.request_id[::-1]]))
    elif kind == "truncate":
        frame.payload = frame.payload[: draw(st.integers(0, max(0, len(frame.payload) - 1)))]
    else:
        index = draw(st.integers(0, len(frame.payload) - 1))
        data = bytearray(frame.payload)
        data[index] ^= draw(st.integers(1, 255))
        frame.payload = bytes(data)
    return frame.SerializeToString()


def _mutate_control(method: str, message: bytes, draw) -> bytes:
    factor = draw(st.sampled_from(NUMBERS))
    if method == "ConfigureOptimizer":
        request = pb.ConfigureOptimizerRequest.FromString(message)
        options = msgpack.unpackb(request.options)
        if draw(st.booleans()):
            options = _scale_numbers(options, factor)
        else:
            request.name = draw(st.sampled_from(["SGD", "AdamW", "RMSprop", "Rprop", "Adagrad"]))
        request.options = msgpack.packb(options)
    elif method == "GradNorm":
        request = pb.GradNormRequest.FromString(message)
        setattr(request, draw(st.sampled_from(["norm_type", "grad_scale"])), factor)
        request.zero_grad = draw(st.sampled_from([request.zero_grad, 1, 2, 7]))
    else:
        request = pb.StepRequest.FromString(message)
        field = draw(st.sampled_from(["param_groups", "grad_scale", "zero_grad", "truncate"]))
        if field == "param_groups":
            groups = msgpack.unpackb(request.param_groups)
            key = draw(st.sampled_from([None, *sorted(groups[0])]))
            if key is None:
                groups = _scale_numbers(groups, factor)
            else:
                groups[0][key] = _scale_numbers(groups[0][key], factor)
            request.param_groups = msgpack.packb(groups)
        elif field == "grad_scale":
            request.grad_scale = factor
        elif field == "zero_grad":
            request.zero_grad = draw(st.integers(0, 5))
        else:
            request.param_groups = request.param_groups[: draw(st.integers(0, 8))]
    return request.SerializeToString()


def test_mutated_replays_of_a_training_step_never_ruin_the_trunk(start_server, monkeypatch):
    """A real client's ConfigureOptimizer, Compute, Backward, GradNorm and Step are recorded
    (a gRPC interceptor on its channel), then replayed with the same session's metadata, one or
    two of them mutated each time (absurd numbers in tensors, hyperparameters and grad_scale,
    flipped header fields, truncated and corrupted payloads). After each replay the weights are
    finite and grew at most max_weight_growth-fold; then the weights are reset (LoadState) and,
    at the end, another session's step equals the same step computed here."""
    server = start_server(linear32_trunk(), ServerOptions(bulk=False, step_wait=0.5))
    calls = _record_training_step(server.address, monkeypatch)
    metadata = calls[0][2]
    baseline = _weights(server)
    admin = RemoteModule(server.address, options=ClientOptions(retries=0))
    admin.load_remote_state_dict(baseline)
    channel = grpc.insecure_channel(server.address)
    stubs = {m: channel.unary_unary(m) for m, _, _ in calls}
    codes: Counter[str] = Counter()
    unexpected = []
    session_id = dict(metadata)["ra-session"]
    # The recording client closed, ending its session; each replay takes it up again.
    session_key = f"{ANONYMOUS}/{session_id}"

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def replay(data):
        mutated = set(data.draw(st.sets(st.integers(0, len(calls) - 1), min_size=1, max_size=2)))
        before = _weights(server)
        for index, (method, message, _) in enumerate(calls):
            name = method.rsplit("/", 1)[-1]
            if name == "Step":  # the number this session expects next, so the Step is real
                request = pb.StepRequest.FromString(message)
                request.step = server.engine.sessions.get(session_key).last_step + 1
                message = request.SerializeToString()
            if index in mutated:
                if name in ("Compute", "Backward"):
                    message = _mutate_frame(message, data.draw)
                else:
                    message = _mutate_control(name, message, data.draw)
            try:
                stubs[method](message, timeout=60, metadata=metadata)
                codes[f"{name} OK"] += 1
            except grpc.RpcError as exc:
                codes[f"{name} {exc.code().name}"] += 1
                if exc.code() not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ) and not (name == "Compute" and exc.code() == grpc.StatusCode.INTERNAL):
                    unexpected.append((name, exc.code().name, exc.details()))
        after = _weights(server)
        for key, weight in after.items():
            assert torch.isfinite(weight).all(), key
            largest = before[key].abs().max().item()
            assert weight.abs().max().item() <= 100.0 * max(1.0, largest), key
        if not _same(after, baseline):
            admin.load_remote_state_dict(baseline)

    replay()
    print(dict(codes))
    assert not unexpected, unexpected[:5]
    assert codes["Step OK"] > 5 and codes["Step INVALID_ARGUMENT"] > 5  # both ways exercised
    admin.close()
    channel.close()
    assert _same(_weights(server), baseline)
    _another_session_trains(server, "Adam")


def test_loaded_optimizer_state_is_held_to_the_same_bounds(start_server):
    """LoadState sets hyperparameters too (optimizer.load_state_dict): the same bounds apply."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    _good_step(remote, optimizer, _x(1))
    state = optimizer.state_dict()
    snapshot = _Snapshot(server, remote)
    state["param_groups"][0]["lr"] = 1e30
    with pytest.raises(InvalidRequest, match=r"hyperparameter lr=1e\+30 of Adam"):
        optimizer.load_state_dict(state)
    snapshot.assert_unchanged(server, remote)
    optimizer.param_groups[0]["lr"] = 0.01
    _goes_on(server, remote, optimizer, snapshot)
    _another_session_trains(server, "Adam")


def test_an_optimizer_state_without_its_state_map_is_refused_as_the_callers(start_server):
    """torch's state_dict() always holds "state" (empty before the first step): one without
    it is the caller's mistake, answered INVALID_ARGUMENT, not a trunk failure (INTERNAL)."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
    _good_step(remote, optimizer, _x(1))
    snapshot = _Snapshot(server, remote)
    groups = _session(server, remote).optimizer.state_dict()["param_groups"]
    with pytest.raises(InvalidRequest, match=r"'state' must map parameter ids to their state"):
        remote.client.load_state({"optimizer": {"param_groups": groups}})
    snapshot.assert_unchanged(server, remote)


def test_a_step_that_overflows_a_python_number_is_refused_and_changes_nothing(start_server):
    """ASGD's alpha passes the hyperparameter checks at 1e300, and its step then overflows a
    Python float (OverflowError): the session's to fix, answered INVALID_ARGUMENT, and rolled
    back like any refused step."""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "ASGD", lr=0.01, lambd=1.0, alpha=1e300)
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    with pytest.raises(InvalidRequest, match=r"ASGD.step\(\) raised OverflowError"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    _another_session_trains(server, "Adam")


def test_malformed_control_fields_are_refused_by_name_and_change_nothing(start_server):
    """A Backward numbered 0 was told it had been answered already (its gradients added),
    though none ran; a LoadState "step" of -1 or 1.5 was answered OK and ignored. Each is
    refused, naming the field. (An integer or bool tensor loads into a float parameter cast,
    as torch's own load_state_dict copies it.)"""
    server, remote = _start(start_server)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    _good_step(remote, optimizer, _x(1))
    snapshot = _Snapshot(server, remote)
    request_id = "ab" * 16
    remote.client.compute(
        request_id, [_x(2)], {}, needs_input_grad=[False], keep_context=True, training=True
    )
    with pytest.raises(InvalidRequest, match="backward_seq must be 1 or more, got 0"):
        remote.client.backward(request_id, 0, [torch.ones(3, 4)], [False])
    for step in (-1, 1.5):
        with pytest.raises(InvalidRequest, match=r"'step' must be a whole number >= 0"):
            remote.client.load_state({"step": step})
    snapshot.assert_unchanged(server, remote)


def test_the_step_backup_reuses_its_buffers_and_forgets_a_changed_tensors_maximum():
    """The kept buffers serve every step; a remembered max |w| is used only while the tensor's
    version counter says it did not change (a LoadState or a rollback changes it)."""
    backup = StepBackup()
    weight = torch.nn.Parameter(torch.tensor([1.0, -3.0]))
    first = backup.copy([weight])
    assert torch.equal(first[0], weight.detach())
    assert backup.max_abs([weight], first) == [3.0]
    backup.remember([weight], [3.0])
    with torch.no_grad():
        weight.mul_(10.0)
    again = backup.copy([weight])
    assert again[0] is first[0] and backup.nbytes() == 8
    assert backup.max_abs([weight], again) == [30.0]


def test_the_step_backup_forgets_shapes_no_step_takes_any_more():
    """A session may load optimizer states of ever new shapes (each step then refused): the
    kept buffers stay within twice the largest of the last 16 steps, and sessions whose
    steps take other amounts (Adam's three tensors a parameter, SGD's one) alternate without
    losing their buffers."""
    backup = StepBackup()
    weight = torch.zeros(100)
    used: list[int] = []
    for rows in range(1, 50):
        backup.copy([weight, torch.zeros(rows, 3)])
        used.append((100 + rows * 3) * 4)
        assert backup.nbytes() <= 2 * max(used[-16:])
    for _ in range(16):
        backup.copy([weight])
    assert backup.nbytes() <= 2 * 400
    adam = backup.copy([weight, weight, weight])
    for _ in range(20):  # two sessions' steps, one after the other
        assert backup.copy([weight])[0] is adam[0]
        assert [id(b) for b in backup.copy([weight, weight, weight])] == [id(b) for b in adam]


def test_the_step_backup_uses_a_copy_taken_between_steps_only_where_nothing_changed_since():
    """prepare() copies on a thread while the trunk waits; the next copy() takes from it only
    the leading tensors that are the same objects, with the same version counters, in the
    same buffers: every copy holds the values its tensors have when copy() is called."""
    first, second = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    state = torch.randn(5)  # an optimizer state tensor: not a parameter
    backup = StepBackup()

    def assert_copies(tensors, reused):
        copies = backup.copy(tensors)
        assert backup.reused == reused
        assert all(torch.equal(c, t.detach()) for c, t in zip(copies, tensors, strict=True))
        return copies

    backup.prepare([first, second, state])
    kept = assert_copies([first, second, state], reused=3)
    backup.prepare([first, second, state])
    with torch.no_grad():
        second.mul_(2.0)  # a write between the steps (a rollback, a LoadState): copied again
    assert [id(c) for c in assert_copies([first, second, state], reused=2)] == list(map(id, kept))
    backup.prepare([first, second])
    assert_copies([first, second, state, torch.randn(4)], reused=2)  # gradients: after them
    backup.prepare([first, second, state])
    assert_copies([second, first, state], reused=3)  # another order, the same buffers by shape
    other, twin = torch.randn(2, 3), torch.randn(2, 3)  # same shape, same version (0)
    backup.prepare([first, other, state])
    assert_copies([first, twin, state], reused=2)  # another tensor in the same buffer
    backup.prepare([first, state])
    # No version bump, but another buffer, as for an adapter moved to another device.
    with torch.no_grad():
        first.data = first.data.double()
    assert_copies([first, state], reused=0)
    backup.prepare([first, state])
    backup.forget()  # a write the version counters miss (`param.data = ...`) says so
    with torch.no_grad():
        first.data = torch.randn(5)
    assert_copies([first, state], reused=0)
    assert_copies([first, state], reused=0)  # each prepared copy serves one copy() only
    backup.prepare([])
    assert_copies([first], reused=0)
    dropped = torch.randn(5)  # an optimizer state whose session ended
    alive = weakref.ref(dropped)
    backup.prepare([first, dropped])
    del dropped
    backup._prepared.thread.join()
    assert alive() is None  # not kept until the next step
    assert_copies([first, torch.randn(5)], reused=1)


def test_a_step_stands_when_no_copy_between_steps_can_be_started(monkeypatch, caplog):
    """prepare() runs after the step stood: a thread that cannot start (or a buffer that
    cannot be had) must not fail the Step, whose weights have moved already (a retry would
    apply it twice). The next step copies everything itself and still rolls back exactly."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    backup, options = StepBackup(), ServerOptions()
    start = threading.Thread.start

    def no_thread(thread: threading.Thread) -> None:
        if thread.name == "ra-step-backup":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with caplog.at_level(logging.WARNING, logger="remote_autograd.guard"):
        guarded_step(optimizer, [("w", weight)], {"w": torch.ones(4)}, [{}], options, backup)
    assert torch.equal(weight.detach(), torch.full((4,), 0.9))  # stepped once, and it stood
    assert "no copy between steps" in caplog.text
    monkeypatch.undo()
    stood = clone_tree(optimizer.state_dict()), weight.detach().clone()
    with pytest.raises(InvalidRequest, match="grow trunk parameter w"):
        guarded_step(
            optimizer, [("w", weight)], {"w": torch.ones(4)}, [{"lr": 1e30}], options, backup
        )
    assert backup.reused == 0
    assert torch.equal(weight.detach(), stood[1])
    assert torch.equal(
        optimizer.state_dict()["state"][0]["momentum_buffer"],
        stood[0]["state"][0]["momentum_buffer"],
    )


_SHARDED_BACKUP = """
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{rendezvous}", rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from remote_autograd.guard import StepBackup
mesh = init_device_mesh("cpu", (1,))
weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
state = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
backup = StepBackup()
backup.prepare([weight, state])
copies = backup.copy([weight, state])
assert backup.reused == 2, backup.reused  # to_local() is a new view each call: not the name
assert torch.equal(copies[1], state.to_local())
backup.prepare([weight, state])
with torch.no_grad():
    state.to_local().mul_(2.0)  # the shard's view shares its counter
copies = backup.copy([weight, state])
assert backup.reused == 1, backup.reused
assert torch.equal(copies[1], state.to_local()) and torch.equal(copies[0], weight.to_local())
dist.destroy_process_group()
print("ok")
"""


def test_a_sharded_trunks_copy_between_steps_is_used_and_sees_its_shards_change(tmp_path):
    """An FSDP trunk's parameters and state are DTensors: the copy between steps goes by the
    DTensor (its to_local() view is new each call) and by its shard's version counter. In a
    child process with a real one-rank gloo group."""
    script = _SHARDED_BACKUP.format(rendezvous=tmp_path / "rendezvous")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("between", ["nothing", "a LoadState", "another session's step"])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_a_step_refused_after_steps_that_stood_restores_exactly_what_stood(
    start_server, name, between
):
    """A step that stands starts the copy the next step needs, on a thread, while the trunk
    waits for its next call (StepBackup.prepare). A refused step after it restores exactly the
    weights and optimizer state that stood, also when a LoadState or another session's step
    changed the weights in between; the session then goes on as here."""
    server, remote = _start(start_server, max_lr=1e30)
    optimizer = RemoteOptimizer(remote, name, **OPTIMIZERS[name])
    for seed in (3, 4):
        _good_step(remote, optimizer, _x(seed))
    if between == "a LoadState":
        remote.client.load_state({"parameters": {n: w / 3 for n, w in _weights(server).items()}})
    elif between == "another session's step":
        _another_session_trains(server, "Adam")
    optimizer.zero_grad()
    remote(_x(2)).square().sum().backward()
    snapshot = _Snapshot(server, remote)
    optimizer.param_groups[0].update(lr=1e30, weight_decay=0.0)
    with pytest.raises(InvalidRequest, match=r"grow trunk parameter (weight|bias) .*ServerOpt"):
        optimizer.step()
    snapshot.assert_unchanged(server, remote)
    backup = server.engine.step_backup
    # Weight and bias came from the copy taken between the steps, with their optimizer
    # state (SGD: a momentum buffer each; AdamW: two moments and a step count), unless a load
    # came between; another session's step prepared them too, but with its own state.
    state = {"SGD": 2, "AdamW": 6}[name]
    assert backup.reused == {"nothing": 2 + state, "a LoadState": 0}.get(between, 2)
    optimizer.param_groups[0].update(OPTIMIZERS[name])
    _goes_on(server, remote, optimizer, snapshot)


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type)
        and issubclass(c, torch.optim.Optimizer)
        and n not in ("Optimizer", "LBFGS")
    ),
)
def test_every_optimizers_defaults_are_within_the_bounds(name):
    """The bounds refuse absurd values, never torch's own defaults (Muon: 2-D parameters)."""
    optimizer = getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(2, 2))])
    check_hyperparameters(name, optimizer.param_groups, ServerOptions())
