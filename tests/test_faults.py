"""Faults with nothing lost: dropped replies, lost contexts, a server killed and restarted from
its checkpoint. Each run ends with exactly the parameters of a fault-free run (float64)."""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from collections.abc import Callable

import grpc
import pytest
import torch
import torch.nn.functional as F
from conftest import spawn_server
from factories import batch, batchnorm_trunk, dropout_trunk, local_parts
from polling import wait_for

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    ServerUnavailable,
    StaleContext,
    SteppedTrunkWarning,
    clip_grad_norm_,
    serve,
)
from remote_autograd.checkpoint_file import load_checkpoint

STEPS = 6
SEED = 5  # seeds the trunk's dropout through ClientOptions.seed


class Run:
    """The split model of tests/factories.py, trained one step at a time."""

    def __init__(self, address: str, **options) -> None:
        self.bottom, self.top = local_parts()
        self.remote = RemoteModule(address, options=ClientOptions(seed=SEED, **options))
        self.remote_optimizer = RemoteOptimizer(self.remote, "SGD", lr=0.1, momentum=0.9)
        self.local_optimizer = torch.optim.SGD(
            [*self.bottom.parameters(), *self.top.parameters()], lr=0.1, momentum=0.9
        )

    def forward_backward(self, step: int) -> None:
        x, y = batch(step)
        self.local_optimizer.zero_grad()
        self.remote_optimizer.zero_grad()
        loss = F.mse_loss(self.top(self.remote(self.bottom(x))), y)
        loss.backward()

    def finish_step(self) -> None:
        self.remote_optimizer.step()
        self.local_optimizer.step()

    def step(self, step: int) -> None:
        self.forward_backward(step)
        self.finish_step()

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {f"trunk.{k}": v for k, v in self.remote.remote_state_dict().items()}
        for prefix, module in (("bottom", self.bottom), ("top", self.top)):
            out.update({f"{prefix}.{k}": v.detach().clone() for k, v in module.named_parameters()})
        return out


def _fault_free(steps: int = STEPS) -> dict[str, torch.Tensor]:
    server = serve(dropout_trunk())
    try:
        run = Run(server.address)
        for step in range(1, steps + 1):
            run.step(step)
        return run.parameters()
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return _fault_free()


def _assert_equal(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert params.keys() == reference.keys()
    for name, value in params.items():
        assert value.dtype == torch.float64
        assert torch.equal(value, reference[name]), name


class DropFirstReply(grpc.ServerInterceptor):
    """Lets the server do the work of the first ``method`` call (or the ``nth``), then loses
    its reply."""

    def __init__(self, method: str, nth: int = 1) -> None:
        self.method = f"/remote_autograd.v1.Trunk/{method}"
        self.dropped = 0
        self.nth = nth
        self.seen = 0

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or details.method != self.method:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            reply = inner(request, context)
            self.seen += 1
            if not self.dropped and self.seen >= self.nth:
                self.dropped += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "test: the reply was lost")
            return reply

        return handler._replace(unary_unary=behavior)


# bulk_min_bytes=0: every frame goes over the bulk channel (bulk.py), whose connection the
# lost reply or the killed server leaves behind.
@pytest.mark.parametrize(
    "method, bulk_min_bytes", [("Step", 1 << 18), ("Backward", 1 << 18), ("Backward", 0)]
)
def test_a_lost_reply_is_retried_and_applied_once(method, bulk_min_bytes, reference):
    drop = DropFirstReply(method)
    server = serve(dropout_trunk(), interceptors=[drop])
    try:
        run = Run(server.address, retry_backoff=0.01, bulk_min_bytes=bulk_min_bytes)
        for step in range(1, STEPS + 1):
            run.step(step)
        assert drop.dropped == 1
        session = server.engine.sessions.values()[0]
        assert session.last_step == STEPS
        assert server.stats()["weights_version"] == STEPS  # not STEPS + 1
        _assert_equal(run.parameters(), reference)
        assert (run.remote.client.stats.bulk_calls > 0) == (bulk_min_bytes == 0)
    finally:
        server.stop(grace=None)


def _linear_losing_a_reply(method: str, nth: int, width: int):
    """A float64 Linear trunk served with the ``nth`` reply of ``method`` lost; its local twin."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(width, width).double()
    drop = DropFirstReply(method, nth=nth)
    return serve(trunk, interceptors=[drop]), drop, copy.deepcopy(trunk)


def _assert_stepped_alike(optimizer, local_optimizer, remote, local) -> None:
    """Step both; the trunk then equals the local twin, bit for bit."""
    optimizer.step()
    local_optimizer.step()
    for name, value in remote.remote_state_dict().items():
        assert torch.equal(value, dict(local.named_parameters())[name].detach()), name


def test_a_lost_reply_of_a_later_micro_batch_is_not_accumulated_twice():
    """Two micro-batches per step, the second Backward's reply lost: its retry carries no
    zero_grad that could hide a second accumulation, so the session's gradients must be
    exactly the two micro-batches' sum (computed here with the same trunk, float64)."""
    server, drop, local = _linear_losing_a_reply("Backward", 2, 8)
    try:
        remote = RemoteModule(server.address, options=ClientOptions(retry_backoff=0.01))
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
        optimizer.zero_grad()
        xs = [batch(step)[0].repeat(1, 2) for step in (1, 2)]  # (5, 8) each
        for x in xs:
            x_remote = x.clone().requires_grad_()
            remote(x_remote).square().sum().backward()
            x_local = x.clone().requires_grad_()
            local(x_local).square().sum().backward()
            assert torch.equal(x_remote.grad, x_local.grad)  # the retry's answer is the same
        assert drop.dropped == 1 and drop.seen == 3  # 2 Backwards, one of them sent twice
        grads = server.engine.sessions.values()[0].grads
        for name, param in local.named_parameters():
            assert torch.equal(grads[name], param.grad), name
        _assert_stepped_alike(optimizer, local_optimizer, remote, local)
    finally:
        server.stop(grace=None)


class DropReplyAndContexts(DropFirstReply):
    """DropFirstReply, and every forward context expires before the retry arrives."""

    server = None

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = super().intercept_service(continuation, details)
        if handler is None or details.method != self.method:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            dropped = self.dropped
            try:
                return inner(request, context)
            finally:
                if self.dropped > dropped:
                    _expire_contexts_now(self.server)

        return handler._replace(unary_unary=behavior)


@pytest.mark.parametrize("dropout", [False, True])
def test_a_backward_whose_reply_and_context_were_lost_is_not_accumulated_twice(dropout):
    """The second micro-batch's Backward is applied, its reply lost, and its context expires
    before the retry: the retry finds none, the client re-creates it and sends the Backward
    again. The server remembers that the lost context had answered it: the input gradient is
    computed again, the trunk's is not added twice (it was: 1.67x the true gradient)."""
    trunk = dropout_trunk() if dropout else torch.nn.Linear(8, 8).double()
    local = copy.deepcopy(trunk)
    drop = DropReplyAndContexts("Backward", nth=2)
    server = serve(trunk, interceptors=[drop])
    drop.server = server
    try:
        options = ClientOptions(retry_backoff=0.01, seed=3)
        remote = RemoteModule(server.address, options=options)
        RemoteOptimizer(remote, "SGD", lr=0.1).zero_grad()
        xs = [batch(step)[0].repeat(1, 2) for step in (1, 2)]  # (5, 8) each
        remote_grads = []
        for x in xs:
            x_remote = x.clone().requires_grad_()
            remote(x_remote).square().sum().backward()
            remote_grads.append(x_remote.grad)
        assert drop.dropped == 1
        grads = server.engine.sessions.values()[0].grads
        if not dropout:  # with dropout the masks are the server's: compared with no-loss below
            for x, got in zip(xs, remote_grads, strict=True):
                x_local = x.clone().requires_grad_()
                local(x_local).square().sum().backward()
                assert torch.equal(got, x_local.grad)
            for name, param in local.named_parameters():
                assert torch.equal(grads[name], param.grad), name
            return
        clean = serve(copy.deepcopy(local))
        try:
            twin = RemoteModule(clean.address, options=options)
            RemoteOptimizer(twin, "SGD", lr=0.1).zero_grad()
            for x, got in zip(xs, remote_grads, strict=True):
                x_twin = x.clone().requires_grad_()
                twin(x_twin).square().sum().backward()
                assert torch.equal(got, x_twin.grad)
            for name, grad in clean.engine.sessions.values()[0].grads.items():
                assert torch.equal(grads[name], grad), name
        finally:
            clean.stop(grace=None)
    finally:
        server.stop(grace=None)


def _expire_contexts_now(server) -> int:
    """Expire every cached forward context at once, as the sweeper does after context_ttl:
    ``expire()`` with the ttl set to 0 for the call (no sleeping, no race with a short ttl)."""
    cache = server.engine.contexts
    ttl, cache.ttl = cache.ttl, 0.0
    try:
        return cache.expire()
    finally:
        cache.ttl = ttl


@pytest.mark.parametrize("how", ["evicted", "expired"])
def test_a_lost_context_is_recomputed_with_the_same_dropout(how, reference):
    options = ServerOptions(max_contexts=1) if how == "evicted" else ServerOptions()
    server = serve(dropout_trunk(), options=options)
    try:
        run = Run(server.address)
        other = RemoteModule(server.address, options=ClientOptions(seed=1))
        recomputed = 0
        for step in range(1, STEPS + 1):
            x, y = batch(step)
            run.local_optimizer.zero_grad()
            run.remote_optimizer.zero_grad()
            loss = F.mse_loss(run.top(run.remote(run.bottom(x))), y)
            if how == "evicted":  # another session's forward takes the only slot
                other(torch.zeros(1, 8, dtype=torch.float64, requires_grad=True))
            else:
                assert _expire_contexts_now(server) == 1
            calls = run.remote.client.stats.calls
            loss.backward()
            recomputed += run.remote.client.stats.calls - calls - 1  # Backward, Compute, Backward
            run.finish_step()
        assert recomputed >= STEPS  # every step lost its context and got it back
        _assert_equal(run.parameters(), reference)
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_lost_context_is_not_recomputed_from_an_input_changed_in_place(micro_batches):
    """An input changed in place after the forward: with its context kept the gradients are
    the forward's as it ran; with the context lost, recomputing from the changed input would
    give another forward's, so the backward is refused, as a local layer that saved the input
    refuses it. A clone changed instead trains as usual."""
    server = serve(dropout_trunk())
    try:
        options = ClientOptions(micro_batches=micro_batches)
        remote = RemoteModule(server.address, options=options)
        x = torch.ones(4, 8, dtype=torch.float64, requires_grad=True)
        h = x * 2
        out = remote(h)
        h.add_(1.0)  # after the forward
        assert _expire_contexts_now(server) == micro_batches
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        h = x * 2
        out = remote(h)
        h.clone().add_(1.0)
        _expire_contexts_now(server)
        out.sum().backward()  # recomputed
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        server.stop(grace=None)


def test_a_lost_context_is_not_recomputed_on_moved_weights():
    server = serve(dropout_trunk(), options=ServerOptions(max_contexts=1))
    try:
        run = Run(server.address)
        out = run.remote(torch.ones(2, 8, dtype=torch.float64, requires_grad=True))
        run.step(2)  # another forward evicts the first; its step moves the weights
        with pytest.raises(StaleContext, match="weights version 0, the trunk is now at 1"):
            out.sum().backward()
    finally:
        server.stop(grace=None)


def test_recompute_mode_matches_and_keeps_only_inputs(reference):
    server = serve(dropout_trunk(), options=ServerOptions(recompute=True))
    try:
        run = Run(server.address)
        for step in range(1, STEPS + 1):
            x, y = batch(step)
            run.local_optimizer.zero_grad()
            run.remote_optimizer.zero_grad()
            hidden = run.bottom(x)
            loss = F.mse_loss(run.top(run.remote(hidden)), y)
            assert server.stats()["contexts"] == 1
            assert server.stats()["context_bytes"] == hidden.numel() * 8  # inputs only
            loss.backward()
            run.finish_step()
        _assert_equal(run.parameters(), reference)
    finally:
        server.stop(grace=None)


def _end(processes: list) -> None:
    """Kill the server processes a test started and close their pipes."""
    for process in processes:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


@pytest.mark.parametrize("bulk_min_bytes", [1 << 18, 0])
def test_killed_server_restarts_from_its_checkpoint(tmp_path, bulk_min_bytes, reference):
    checkpoint = str(tmp_path / "trunk.ckpt")
    args = ("factories:dropout_trunk", "--checkpoint", checkpoint, "--checkpoint-every", "1")
    process, address = spawn_server(*args)
    port = int(address.rsplit(":", 1)[1])
    processes = [process]

    def kill_and_restart() -> None:
        os.kill(processes[-1].pid, signal.SIGKILL)
        processes[-1].wait()
        # While it is down: a clear error, quickly, not a hang.
        probe = RemoteModule(address, options=ClientOptions(connect_timeout=1.0, retries=0))
        with pytest.raises(ServerUnavailable, match="is it running"):
            probe(torch.zeros(1, 8, dtype=torch.float64))
        processes.append(spawn_server(*args, port=port)[0])

    try:
        run = Run(
            address,
            retries=10,
            retry_backoff=0.1,
            retry_backoff_max=1.0,
            bulk_min_bytes=bulk_min_bytes,
        )
        run.step(1)
        run.step(2)
        # Killed between forward and backward: the backward resends the inputs, the restarted
        # server (weights and momentum from step 2's checkpoint) recomputes the forward.
        x, y = batch(3)
        run.local_optimizer.zero_grad()
        run.remote_optimizer.zero_grad()
        loss = F.mse_loss(run.top(run.remote(run.bottom(x))), y)
        kill_and_restart()
        loss.backward()
        run.finish_step()
        # Killed after backward: the accumulated gradients are gone, and Step says so.
        run.forward_backward(4)
        kill_and_restart()
        with pytest.raises(StaleContext, match="gradients were accumulated by server process"):
            run.remote_optimizer.step()
        run.step(4)  # the step again, from its forward
        # Killed after backward, before clipping: the norms are refused as the Step is (they
        # were taken of no trunk gradient: the local parts' norm, and a wrong coefficient).
        run.forward_backward(5)
        kill_and_restart()
        parts = [*run.bottom.parameters(), run.remote, *run.top.parameters()]
        with pytest.raises(StaleContext, match="GradNorm: its gradients were accumulated by"):
            clip_grad_norm_(parts, 1e-3)
        # A forward and backward again, without the trunk optimizer's zero_grad(), are
        # clipped (the refusal once left the dead server's id in place: refused again).
        x, y = batch(5)
        F.mse_loss(run.top(run.remote(run.bottom(x))), y).backward()
        assert clip_grad_norm_(parts, math.inf) > 0
        for step in range(5, STEPS + 1):  # step 5 from its zero_grad(): the reference's seeds
            run.step(step)
        _assert_equal(run.parameters(), reference)
        assert (run.remote.client.stats.bulk_calls > 0) == (bulk_min_bytes == 0)
        saved = load_checkpoint(checkpoint)
        assert saved is not None and saved["weights_version"] == STEPS
        assert [s["step"] for s in saved["sessions"].values()] == [STEPS]
    finally:
        _end(processes)


@pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")  # three sessions
def test_a_recompute_never_runs_on_other_weights_of_the_same_version(tmp_path):
    """Two sessions, a checkpoint every 2 steps. A's forward ran on version 3; the server dies
    and resumes at version 2, and another session steps it to another version 3. A's Backward
    recomputed its forward on those weights (the version matched) and gave the gradients of a
    forward A never ran, which A's Step then applied. The weights' id says they differ."""
    checkpoint = str(tmp_path / "trunk.ckpt")
    args = ("factories:dropout_trunk", "--checkpoint", checkpoint, "--checkpoint-every", "2")
    process, address = spawn_server(*args)
    processes = [process]
    options = {"retries": 10, "retry_backoff": 0.1, "retry_backoff_max": 1.0}
    try:
        a, b = Run(address, **options), Run(address, **options)
        a.step(1)
        b.step(2)  # version 2: saved
        b.step(3)  # version 3: lost with the process
        x, y = batch(4)
        loss = F.mse_loss(a.top(a.remote(a.bottom(x))), y)  # on version 3
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        processes.append(spawn_server(*args, port=int(address.rsplit(":", 1)[1]))[0])
        # B stepped twice, the restarted server holds its first: a state_dict() now would
        # save the model of one step beside the trunk's optimizer of another.
        with pytest.raises(StaleContext, match="holds this session at step #1, this optimizer"):
            b.remote_optimizer.state_dict()
        c = Run(address, **options)
        c.step(5)  # another version 3
        assert c.remote.client._refresh_info().weights_version == 3
        with pytest.raises(StaleContext, match="weights of version 3 are not those it ran on"):
            loss.backward()
        # A redoes the step from its forward, on the weights it now finds: a whole step.
        a.remote_optimizer.zero_grad()
        a.step(4)
        assert a.remote.client._refresh_info().weights_version == 4
    finally:
        _end(processes)


def test_a_step_of_an_optimizer_a_restart_lost_is_refused(tmp_path):
    """A session replaced its Adam by SGD after the last checkpoint, and the server died: the
    restarted server brought back the Adam, and the client's next SGD Step stepped it without
    a word. Refused now; a RemoteOptimizer made again steps SGD, as locally."""
    checkpoint = str(tmp_path / "trunk.ckpt")
    args = ("factories:dropout_trunk", "--checkpoint", checkpoint, "--checkpoint-every", "1")
    process, address = spawn_server(*args)
    processes = [process]
    try:
        run = Run(address, retries=10, retry_backoff=0.1, retry_backoff_max=1.0)
        run.remote_optimizer = RemoteOptimizer(run.remote, "Adam", lr=0.01)
        run.step(1)  # saved, with the session's Adam
        run.remote_optimizer = RemoteOptimizer(run.remote, "SGD", lr=0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        processes.append(spawn_server(*args, port=int(address.rsplit(":", 1)[1]))[0])
        with pytest.raises(StaleContext, match="not the one the client configured last"):
            run.step(2)
        # Nor is the restored Adam's state saved as the SGD's.
        with pytest.raises(StaleContext, match=r"the last step\(\) was refused"):
            run.remote_optimizer.state_dict()
        before = run.remote.remote_state_dict()
        run.remote_optimizer = RemoteOptimizer(run.remote, "SGD", lr=0.1)
        run.forward_backward(2)
        run.finish_step()
        after = run.remote.remote_state_dict()
        assert any(not torch.equal(after[k], before[k]) for k in before)  # stepped, once
        state = run.remote_optimizer.state_dict()["state"]
        assert all(set(entry) <= {"momentum_buffer"} for entry in state.values()), state
    finally:
        _end(processes)


def test_checkpoint_on_request_on_schedule_and_at_shutdown(tmp_path, reference):
    path = str(tmp_path / "trunk.ckpt")
    server = serve(dropout_trunk(), options=ServerOptions(checkpoint_path=path))
    run = Run(server.address)
    run.step(1)
    assert not os.path.exists(path)
    reply = run.remote.client.checkpoint()
    assert reply.weights_version == 1 and reply.path == path
    assert load_checkpoint(path)["weights_version"] == 1
    run.step(2)
    server.stop(grace=1.0)  # drains, then saves the moved weights
    assert load_checkpoint(path)["weights_version"] == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".ckpt-")] == []  # no temp files

    interval = ServerOptions(checkpoint_path=path, checkpoint_interval=0.05)
    resumed = serve(dropout_trunk(), options=interval)
    try:
        assert resumed.stats()["weights_version"] == 2
        run.remote.close()
        run.remote = RemoteModule(resumed.address, options=ClientOptions(seed=SEED))
        # The session is new (new client id), so its optimizer starts fresh: compare only
        # the trunk weights, which were restored exactly.
        trunk = run.remote.remote_state_dict()
        run.remote_optimizer = RemoteOptimizer(run.remote, "SGD", lr=0.1)
        # A new session training a trunk that earlier sessions stepped is told so.
        with pytest.warns(SteppedTrunkWarning, match="weights version 2"):
            run.step(3)
        deadline = time.monotonic() + 30
        while load_checkpoint(path)["weights_version"] != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load_checkpoint(path)["weights_version"] == 3  # saved by the schedule
    finally:
        resumed.stop(grace=None)
    two_steps = _fault_free(2)
    for name, value in trunk.items():
        assert torch.equal(value, two_steps[f"trunk.{name}"]), name


def test_a_load_survives_a_kill_of_a_server_that_checkpoints_every_step(tmp_path):
    """With --checkpoint-every, a LoadState is checkpointed as a Step is: after a SIGKILL the
    restarted server holds the loaded weights (it went back to the last step's, and the
    client trained on those without a word)."""
    checkpoint = str(tmp_path / "trunk.ckpt")
    args = ("factories:dropout_trunk", "--checkpoint", checkpoint, "--checkpoint-every", "1")
    process, address = spawn_server(*args)
    processes = [process]
    try:
        remote = RemoteModule(address)
        loaded = {k: v + 0.5 for k, v in remote.state_dict().items()}
        remote.load_state_dict(loaded)
        remote.close()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        processes.append(spawn_server(*args, port=int(address.rsplit(":", 1)[1]))[0])
        with RemoteModule(address) as restarted:
            for name, value in restarted.state_dict().items():
                assert torch.equal(value, loaded[name]), name
    finally:
        _end(processes)


def test_a_retried_training_forward_moves_batchnorm_statistics_once():
    """A Compute whose reply was lost runs again on its retry (its context is kept): its
    outputs are the first try's, and the BatchNorm statistics move once, as for the one
    forward the client ran (they moved twice)."""
    trunk = batchnorm_trunk()
    local = copy.deepcopy(trunk)
    drop = DropFirstReply("Compute")
    server = serve(trunk, interceptors=[drop])
    try:
        remote = RemoteModule(server.address, options=ClientOptions(retry_backoff=0.01))
        x = batch(1)[0]
        out = remote(x.clone().requires_grad_())
        assert drop.dropped == 1
        torch.testing.assert_close(out, local(x.clone()), rtol=0, atol=0)
        for name, value in local.state_dict().items():
            assert torch.equal(server.engine.module.state_dict()[name], value), name
        out.sum().backward()  # the kept context is the retry's, and it works
    finally:
        server.stop(grace=None)


def test_a_gradnorm_whose_reply_was_lost_is_retried_and_scales_once():
    """The second clip_grad_norm_ of a step sends a GradNorm carrying the first clip's scale;
    its reply is lost after the server applied it. The retry (the same ops id) does not apply
    it again (GradNorm was not retried: the client put the scale back and the Step applied it
    a second time). The trunk equals the local model clipped twice."""
    server, drop, local = _linear_losing_a_reply("GradNorm", 2, 4)
    try:
        remote = RemoteModule(server.address, options=ClientOptions(retry_backoff=0.01))
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
        x = torch.randn(3, 4, dtype=torch.float64) * 5
        remote(x).square().sum().backward()
        local(x).square().sum().backward()
        for max_norm in (1.0, 0.5):
            clip_grad_norm_(remote, max_norm)
            torch.nn.utils.clip_grad_norm_(local.parameters(), max_norm)
        assert drop.dropped == 1
        _assert_stepped_alike(optimizer, local_optimizer, remote, local)
    finally:
        server.stop(grace=None)


def test_a_forward_interrupted_after_the_server_kept_it_leaves_no_context(start_server):
    """Ctrl-C in a training forward after the server ran it (the reply on its way): no
    Backward will use that context, and it held a Step lease, costing another session one
    step_wait. It is released; training then goes on."""
    from torch import nn

    server = start_server(nn.Linear(4, 4).double())
    remote = RemoteModule(server.address)
    exchange = remote.client._exchange

    def interrupted(name, header, *args, **kwargs):
        reply = exchange(name, header, *args, **kwargs)
        if name == "Compute":
            raise KeyboardInterrupt  # as the user's Ctrl-C would land here
        return reply

    remote.client._exchange = interrupted
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(KeyboardInterrupt):
        remote(x)
    remote.client._exchange = exchange
    wait_for(lambda: server.stats()["contexts"] == 0)
    remote(x).sum().backward()
    assert x.grad is not None
    remote.close()
