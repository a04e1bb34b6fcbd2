"""DataLoader workers (fork) beside a connected RemoteModule, and forked children that use it."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, spawn_server

from remote_autograd import NotConfigured, RemoteModule, RemoteOptimizer

# Clients here train one server's trunk in turn: starting from the weights an earlier client
# left is the point, not a mistake (SteppedTrunkWarning).
pytestmark = pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")

EPOCHS = 40


@pytest.fixture(scope="module")
def mlp_server():
    process, address = spawn_server("models:make_mlp_trunk")
    yield address
    process.kill()
    process.communicate(timeout=60)  # closes its pipes


def test_dataloader_fork_workers_train_like_local(mlp_server):
    """40 epochs, each through DataLoader(num_workers=2) forked beside the client: no worker
    crashes, no gRPC fork warning, and the result equals local training bit for bit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "scripts" / "fork_check.py"), "--address", mlp_server]
    done = subprocess.run(
        [*command, "--epochs", str(EPOCHS), "--workers", "2", "--batches", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["epochs"] == EPOCHS
    assert result["crashes"] == []
    assert result["max_abs_diff"] == 0.0  # float64: split training equals local exactly
    fork_lines = [line for line in done.stderr.splitlines() if "fork" in line.lower()]
    assert fork_lines == []


def _child_forward(module: RemoteModule, x: torch.Tensor, queue) -> None:
    try:
        with torch.no_grad():
            queue.put((module.client.session_id, module(x).tolist()))  # not shared memory
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", repr(exc)))


def test_forked_child_opens_its_own_session(mlp_server):
    """A child forked after the parent trained uses the trunk on a new channel and session;
    the parent's connection and contexts are untouched (the child closes none of them)."""
    module = RemoteModule(mlp_server)
    x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = module(x.requires_grad_())
    y.sum().backward()  # a context created, used and released by the parent
    with torch.no_grad():
        expected = module(x)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_forward, args=(module, x.detach(), queue))
    child.start()
    session_id, got = queue.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    assert session_id != module.client.session_id
    assert got == expected.tolist()
    # The parent goes on training on its own channel.
    y = module(x)
    y.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    module.close()


def test_forked_children_end_their_sessions_when_they_exit():
    """multiprocessing children (DataLoader workers) leave through os._exit, past atexit: each
    ends its session anyway, so a server of max_sessions=2 serves the parent and any number of
    children one after another (their sessions once stayed until session_ttl)."""
    process, address = spawn_server("models:make_mlp_trunk", "--max-sessions", "2")
    try:
        module = RemoteModule(address)
        x = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            expected = module(x).tolist()  # the parent's session: one of two
        context = multiprocessing.get_context("fork")
        for _ in range(3):
            queue = context.Queue()
            child = context.Process(target=_child_forward, args=(module, x, queue))
            child.start()
            session_id, got = queue.get(timeout=120)
            child.join(timeout=120)
            assert child.exitcode == 0
            assert session_id != "error", got
            assert got == expected
        module.close()
    finally:
        process.kill()
        process.communicate(timeout=60)


def _child_drops_a_client(address: str, x: torch.Tensor, queue) -> None:
    import gc

    from remote_autograd import client as client_module

    try:
        module = RemoteModule(address)
        with torch.no_grad():
            module(x)
        del module
        gc.collect()  # the finalizer queues the session for the ender thread
        while not client_module._DROPPED.empty():  # the ender takes it off the queue
            threading.Event().wait(0.05)
        queue.put("ended")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(repr(exc))


def test_a_child_forked_while_a_session_was_being_dropped_can_drop_its_own(mlp_server):
    """A fork in the moment another thread holds the lock of the dropped-session ender (a
    client collected in the parent): the child's copy of that lock would be held for good,
    and the child's first dropped client would hang it."""
    from remote_autograd import client as client_module

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client_module._ENDER_LOCK:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(60)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    x = torch.randn(2, 12, dtype=torch.float64)
    child = context.Process(target=_child_drops_a_client, args=(mlp_server, x, queue))
    try:
        child.start()
    finally:
        release.set()
        holder.join()
    try:
        assert queue.get(timeout=60) == "ended"
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def test_a_call_made_inside_a_call_goes_on_while_a_fork_waits():
    """A fork waits for the client calls in flight (forking.py). A call that makes another
    inside it (the bulk channel's ticket, an Info refresh after a failed connection) waited
    for the fork, which waited for it: both stalled until the call's deadline, and the fork
    went on with gRPC in the middle of a call. The inner call now goes on, and the fork
    follows the outer one."""
    from remote_autograd.forking import _Gate

    gate = _Gate()
    inside, inner_done, fork_waits = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def outer_call() -> None:
        with gate.call(timeout=60.0):
            inside.set()
            fork_waits.wait(60)
            with gate.call(timeout=60.0):  # made inside the outer one
                order.append("inner call")
            inner_done.set()
        order.append("outer call ended")

    def fork() -> None:
        gate.before_fork()
        order.append("fork")
        gate.after_fork_in_parent()

    caller = threading.Thread(target=outer_call)
    caller.start()
    assert inside.wait(60)
    forker = threading.Thread(target=fork)
    forker.start()
    while not gate._forking:  # the fork has started waiting
        threading.Event().wait(0.001)
    fork_waits.set()
    assert inner_done.wait(60)
    caller.join(60)
    forker.join(60)
    assert order == ["inner call", "outer call ended", "fork"]


def _child_steps(module: RemoteModule, optimizer: RemoteOptimizer, x, queue) -> None:
    try:
        module(x).sum().backward()
        optimizer.step()
        queue.put(("stepped", []))
    except NotConfigured as exc:
        queue.put(("not configured", getattr(exc, "__notes__", [])))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", [repr(exc)]))


def test_a_forked_child_stepping_the_parents_optimizer_is_told_why_it_cannot(mlp_server):
    """The optimizer lives in the parent's session; a forked child has a session of its own.
    Its step() was refused with NotConfigured blaming session_ttl or a server restart; the
    error now says that this process is a fork, and what to do."""
    module = RemoteModule(mlp_server)
    optimizer = RemoteOptimizer(module, "SGD", lr=0.1)
    x = torch.randn(4, 12, dtype=torch.float64)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_steps, args=(module, optimizer, x, queue))
    child.start()
    outcome, notes = queue.get(timeout=120)
    child.join(timeout=120)
    assert outcome == "not configured"
    assert any("this process is a fork" in note for note in notes), notes
    module.close()
