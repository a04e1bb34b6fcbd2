"""The server's own checkpoint (ServerOptions.checkpoint_path) when something is wrong: no path,
a file that is not a checkpoint, a save that fails; and the CLI saving one on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from conftest import spawn_server
from factories import dropout_trunk
from torch import nn

from remote_autograd import (
    ClientOptions,
    CodecError,
    NotConfigured,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    TrunkError,
    encode,
    serve,
)
from remote_autograd.checkpoint_file import load_checkpoint


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
