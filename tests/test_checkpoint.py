"""The server's own checkpoint (ServerOptions.checkpoint_path) when something is wrong: no path,
a file that is not a checkpoint, a save that fails; and the CLI saving one on SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal

import pytest
import torch
from conftest import spawn_server
from factories import dropout_trunk
from torch import nn

from remote_autograd import (
    ClientOptions,
    CodecError,
    InvalidRequest,
    NotConfigured,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TrunkError,
    encode,
    serve,
)
from remote_autograd.checkpoint_file import load_checkpoint, save_checkpoint


def _one_step(remote: RemoteModule, optimizer: RemoteOptimizer) -> None:
    optimizer.zero_grad()
    remote(torch.ones(2, 8, dtype=torch.float64)).sum().backward()
    optimizer.step()


def test_checkpoint_without_a_path_is_refused(start_server):
    server = start_server(dropout_trunk())
    remote = RemoteModule(server.address)
    with pytest.raises(NotConfigured, match=r"this server has no checkpoint path \(serve"):
        remote.client.checkpoint()
    assert server.engine.saved_version is None


@pytest.mark.parametrize(
    "content, error, message",
    [
        (encode({"format": 2, "module": {}}), ValueError, "is not a remote_autograd checkpoint"),
        (encode([1, 2, 3]), ValueError, "is not a remote_autograd checkpoint of format 1"),
        (b"PK\x03\x04 a zip, say a torch.save file", CodecError, "not a remote_autograd frame"),
    ],
    ids=["other-format", "not-a-map", "not-a-frame"],
)
def test_a_file_that_is_not_a_checkpoint_stops_the_server_from_starting(
    tmp_path, content, error, message
):
    path = tmp_path / "trunk.ckpt"
    path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        serve(dropout_trunk(), options=ServerOptions(checkpoint_path=str(path)))
    if error is ValueError:
        assert type(info.value) is ValueError and "point --checkpoint elsewhere" in str(info.value)
    assert path.read_bytes() == content  # left alone for the operator


def test_a_failed_save_on_request_is_reported_and_training_goes_on(tmp_path, caplog):
    path = tmp_path / "missing-dir" / "trunk.ckpt"  # its directory does not exist
    options = ServerOptions(checkpoint_path=str(path), checkpoint_every=1)
    server = serve(dropout_trunk(), options=options)
    try:
        remote = RemoteModule(server.address)
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        with caplog.at_level(logging.ERROR, logger="remote_autograd.engine"):
            _one_step(remote, optimizer)  # the scheduled save fails: logged, the step stands
        assert "could not save the checkpoint" in caplog.text
        assert server.stats()["weights_version"] == 1 and server.engine.saved_version is None
        with pytest.raises(TrunkError, match="Checkpoint: the trunk raised FileNotFoundError"):
            remote.client.checkpoint()  # asked for: the caller hears of it
        _one_step(remote, optimizer)
        assert server.stats()["weights_version"] == 2
        assert not path.parent.exists()
    finally:
        server.stop(grace=None)
    assert [p for p in tmp_path.rglob("*")] == []  # no temporary file left behind


def test_sigterm_stops_the_cli_server_gracefully_with_a_last_checkpoint(tmp_path):
    path = tmp_path / "trunk.ckpt"
    process, address = spawn_server("factories:dropout_trunk", "--checkpoint", str(path))
    try:
        with RemoteModule(address, options=ClientOptions(retries=0)) as remote:
            optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
            _one_step(remote, optimizer)
            _one_step(remote, optimizer)
            weights = remote.remote_state_dict()
        assert not path.exists()  # no save was scheduled: only the shutdown saves
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # a clean exit, not death by the signal
        saved = load_checkpoint(str(path))
        assert saved is not None and saved["weights_version"] == 2
        trunk = {n: p for n, p in saved["module"].items()}
        for name, value in weights.items():
            assert torch.equal(trunk[name], value), name
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def test_a_checkpoint_restores_weights_and_each_sessions_optimizer(tmp_path):
    path = str(tmp_path / "trunk.ckpt")
    server = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        remote = RemoteModule(server.address)
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
        _one_step(remote, optimizer)
        assert remote.client.checkpoint().weights_version == 1
        weights = remote.remote_state_dict()
        momentum = optimizer.state_dict()["state"]
    finally:
        server.stop(grace=None)
    resumed = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        assert resumed.stats()["weights_version"] == 1
        session = resumed.engine.sessions.values()[0]  # restored under its key
        assert session.last_step == 1 and session.optimizer_name == "SGD"
        state = session.optimizer.state_dict()
        for index, saved in momentum.items():
            assert torch.equal(state["state"][index]["momentum_buffer"], saved["momentum_buffer"])
        for name, param in resumed.engine.module.named_parameters():
            assert torch.equal(param.detach(), weights[name]), name
    finally:
        resumed.stop(grace=None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({f"k{i}": i for i in range(65)}, r"entries besides its params, more than 64"),
        ({"note_" + "x" * 80: 1.0}, r"names must be strings of at most 64 characters"),
        ({"schedule": list(range(17))}, r"sequence of more than 16 items"),
    ],
    ids=["entries", "name", "sequence"],
)
def test_an_optimizer_is_held_to_what_a_checkpoint_restores(tmp_path, extra, message):
    """What a session's optimizer holds is written into every checkpoint, and a checkpoint is
    restored only within the bounds of a LoadState: a ConfigureOptimizer (or Step) beyond them
    would have kept the server from starting again. Refused, naming the bound; then a
    configuration within them checkpoints and restores."""
    path = str(tmp_path / "trunk.ckpt")
    server = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        remote = RemoteModule(server.address)
        group = {"params": ["weight", "bias"], "lr": 0.1, **extra}
        with pytest.raises(InvalidRequest, match=rf"SGD options: .*{message}"):
            remote.client.configure_optimizer("SGD", {"lr": 0.1}, [group])
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
        optimizer.param_groups[0]["momentum"] = [0.9] * 17  # a Step's update, likewise
        with pytest.raises(InvalidRequest, match=r"momentum: a sequence of 17 items, more"):
            _one_step(remote, optimizer)
        optimizer.param_groups[0]["momentum"] = 0.9
        optimizer.step()  # the refused one, redone
        assert remote.client.checkpoint().weights_version == 1
    finally:
        server.stop(grace=None)
    resumed = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        assert resumed.stats()["weights_version"] == 1
    finally:
        resumed.stop(grace=None)


def test_a_checkpoint_holds_whatever_a_call_may_nest(tmp_path):
    """A value nested as deep as a call may send (Limits.max_depth), inside the checkpoint's
    own maps (sessions, adapters, optimizer states): the file is written and read back (it once
    was written and could never be read)."""
    from remote_autograd import Limits
    from remote_autograd.checkpoint_file import save_checkpoint

    deep: object = 1.5
    for _ in range(Limits().max_depth - 1):
        deep = [deep]
    state = {"adapters": {"id": {"sessions": {"key": {"optimizer": {"state": deep}}}}}}
    path = str(tmp_path / "deep.ckpt")
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded["adapters"] == state["adapters"]


def _first_session(state: dict) -> dict:
    return next(iter(state["sessions"].values()))


_CASES = {
    "nan-weight": (
        lambda s: s["module"]["0.weight"].__setitem__((0, 0), float("nan")),
        "0.weight holds NaN",
    ),
    "shape-of-the-last-entry": (
        lambda s: s["module"].__setitem__(
            "1.num_batches_tracked", torch.zeros(2, dtype=torch.long)
        ),
        "1.num_batches_tracked: expected shape",
    ),
    "missing-entry": (lambda s: s["module"].pop("1.running_var"), r"missing \['1.running_var'\]"),
    "negative-version": (lambda s: s.__setitem__("weights_version", -1), "weights_version >= 0"),
    "negative-step": (lambda s: _first_session(s).__setitem__("step", -3), "step >= 0"),
    "unknown-optimizer": (
        lambda s: _first_session(s).__setitem__("optimizer", "os.system"),
        "os.system",
    ),
    "lr-too-large": (
        lambda s: _first_session(s)["state"]["param_groups"][0].__setitem__("lr", 1e12),
        "lr",
    ),
    "inf-moment": (
        lambda s: _first_session(s)["state"]["state"][0]["exp_avg"].fill_(float("inf")),
        "NaN or inf",
    ),
    "state-larger-than-its-parameter": (
        lambda s: _first_session(s)["state"]["state"][0].__setitem__(
            "exp_avg", torch.zeros(1000, dtype=torch.float64)
        ),
        "parameter",
    ),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_a_checkpoint_that_does_not_hold_is_refused_whole(tmp_path, case):
    """A checkpoint is checked as a LoadState is, all of it before any of it is loaded: the
    server does not start, says what does not hold, and the module it was given is untouched
    (it served NaN, took any optimizer state and failed every Step after, or was left half
    loaded when torch refused its last entry)."""
    path = str(tmp_path / "trunk.ckpt")

    def trunk() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).double()

    server = serve(trunk(), options=ServerOptions(checkpoint_path=path))
    try:
        remote = RemoteModule(server.address)
        _one_step(remote, RemoteOptimizer(remote, "AdamW", lr=0.1))
        remote.client.checkpoint()
    finally:
        server.stop(grace=None)
    state = load_checkpoint(path)
    change, message = _CASES[case]
    change(state)
    save_checkpoint(path, state)
    module = trunk()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        ValueError, match="cannot be restored, and nothing of it was loaded"
    ) as info:
        serve(module, options=ServerOptions(checkpoint_path=path))
    assert re.search(message, str(info.value)), str(info.value)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")  # three sessions
@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({"max_sessions": 2}, "holds 3 sessions, more than max_sessions=2: raise --max-sessions"),
        (
            {"max_sessions_per_identity": 2},
            "holds 3 sessions of [0-9a-f]+, more than max_sessions_per_identity=2: raise "
            "--max-sessions-per-identity",
        ),
    ],
    ids=["max_sessions", "max_sessions_per_identity"],
)
def test_a_checkpoint_with_more_sessions_than_allowed_says_which_option(tmp_path, limit, message):
    """Refused at start naming the option, nothing loaded (one token's three sessions beyond
    max_sessions_per_identity raised the LimitExceeded of a call, its weights loaded)."""
    path = str(tmp_path / "trunk.ckpt")
    options = ServerOptions(checkpoint_path=path, tokens=("token-a",))
    server = serve(nn.Linear(8, 8).double(), options=options)
    try:
        remotes = [  # kept: a dropped one ends
            RemoteModule(server.address, options=ClientOptions(token="token-a")) for _ in range(3)
        ]
        for remote in remotes:
            _one_step(remote, RemoteOptimizer(remote, "SGD", lr=0.1))
        remotes[0].client.checkpoint()
    finally:
        server.stop(grace=None)
    with pytest.raises(ValueError, match=f"nothing of it was loaded: it {message}"):
        serve(nn.Linear(8, 8).double(), options=dataclasses.replace(options, **limit))


def test_a_starting_server_removes_what_killed_writes_of_its_checkpoint_left(tmp_path):
    """A server killed while writing leaves its temporary file (74 MiB after four kills in a
    probe); the next start removes those of its own checkpoint, and only those."""
    path = tmp_path / "trunk.ckpt"
    left = [tmp_path / ".trunk.ckpt.tmp-k1ll3d", tmp_path / ".trunk.ckpt.tmp-ag4in"]
    other = tmp_path / ".other.ckpt.tmp-k1ll3d"
    for file in (*left, other):
        file.write_bytes(b"half a checkpoint")
    server = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=str(path)))
    try:
        assert not any(file.exists() for file in left) and other.exists()
        assert server.engine.checkpoint() == 0 and path.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, path.name]
    finally:
        server.stop(grace=None)


class _WithExtraState(nn.Linear):
    """A layer with state that is not a tensor (get_extra_state, as quantised layers have)."""

    def get_extra_state(self) -> dict:
        return {"format": "demo", "scale": 2}

    def set_extra_state(self, state: dict) -> None:
        assert state == {"format": "demo", "scale": 2}


def test_a_checkpoint_of_a_trunk_with_extra_state_restores(tmp_path):
    path = str(tmp_path / "trunk.ckpt")
    server = serve(_WithExtraState(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        remote = RemoteModule(server.address)
        _one_step(remote, RemoteOptimizer(remote, "SGD", lr=0.1))
        remote.client.checkpoint()
        weights = remote.remote_state_dict()
    finally:
        server.stop(grace=None)
    resumed = serve(_WithExtraState(8, 8).double(), options=ServerOptions(checkpoint_path=path))
    try:
        for name, param in resumed.engine.module.named_parameters():
            assert torch.equal(param.detach(), weights[name]), name
    finally:
        resumed.stop(grace=None)


def test_an_empty_load_writes_no_checkpoint(tmp_path):
    """With checkpoint_every a LoadState is checkpointed, but one that loads nothing (only a
    step number) writes nothing: any client could have forced full writes, unpaced."""
    path = tmp_path / "trunk.ckpt"
    options = ServerOptions(checkpoint_path=str(path), checkpoint_every=1)
    server = serve(nn.Linear(8, 8).double(), options=options)
    try:
        remote = RemoteModule(server.address)
        RemoteOptimizer(remote, "SGD", lr=0.1)
        remote.client.load_state({"parameters": None, "optimizer": None, "step": 0})
        assert not path.exists()
        remote.load_state_dict(remote.state_dict())
        assert path.exists()
    finally:
        server.stop(grace=None)


def test_a_second_stop_returns_once_the_first_has_saved(tmp_path):
    """stop() from a signal handler beside the program's own: the second returned at once,
    while the first still waited for a call in flight, and a process exiting there lost the
    last checkpoint. It now returns once the first stop has saved it."""
    import threading

    class Waits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8).double()
            self.go = threading.Event()
            self.entered = threading.Event()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:  # the eval call is the one held in flight
                self.entered.set()
                self.go.wait(30)
            return self.linear(x)

    path = tmp_path / "trunk.ckpt"
    trunk = Waits()
    server = serve(trunk, options=ServerOptions(checkpoint_path=str(path)))
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    _one_step(remote, optimizer)  # weights moved: stop() saves them
    remote.eval()
    in_flight = threading.Thread(target=lambda: remote(torch.ones(1, 8, dtype=torch.float64)))
    in_flight.start()
    assert trunk.entered.wait(30)
    first = threading.Thread(target=server.stop, kwargs={"grace": 30.0})
    first.start()
    while not server._stopped.is_set():
        threading.Event().wait(0.01)
    threading.Timer(0.3, trunk.go.set).start()  # the call in flight ends a moment later
    server.stop()
    assert path.exists() and load_checkpoint(str(path))["weights_version"] == 1
    first.join(30)
    in_flight.join(30)
    remote.close()


def test_a_stop_inside_stop_in_the_same_thread_returns(tmp_path):
    """A signal handler's stop() that interrupts the program's own stop() in the same thread
    (SIGTERM while the last checkpoint is written) cannot wait for the stop below it on its
    own stack: it returns at once, and the first stop() finishes and saves."""
    import threading

    path = tmp_path / "trunk.ckpt"
    server = serve(nn.Linear(8, 8).double(), options=ServerOptions(checkpoint_path=str(path)))
    remote = RemoteModule(server.address)
    _one_step(remote, RemoteOptimizer(remote, "SGD", lr=0.1))
    remote.close()
    save = server.engine.save_if_changed

    def interrupted_save() -> None:
        server.stop()  # as a signal handler run in this thread here would
        save()

    server.engine.save_if_changed = interrupted_save
    stopping = threading.Thread(target=server.stop, kwargs={"grace": None}, daemon=True)
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive(), "stop() inside stop() waited for itself"
    assert load_checkpoint(str(path))["weights_version"] == 1
