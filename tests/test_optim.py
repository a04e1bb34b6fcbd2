"""RemoteOptimizer and clip_grad_norm_ behave like their torch counterparts on the unsplit
model: each case runs the same float64 computation locally and compares exactly."""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import threading
from collections.abc import Iterator

import factories
import grpc
import msgpack
import pytest
import torch
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    clip_grad_norm_,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc
from remote_autograd.errors import DeadlineExceeded, InvalidRequest, StaleContext


def _parts(seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Linear(3, 4).double(), nn.Linear(4, 4).double(), nn.Linear(4, 2).double()


def _inputs(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(n)]


class Pair:
    """The same bottom -> trunk -> top twice: the trunk served (split) and local (unsplit)."""

    def __init__(self, start_server, **optimizer) -> None:
        bottom, trunk, top = _parts()
        self.local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
        self.served = trunk
        self.server = start_server(trunk)
        self.remote = RemoteModule(self.server.address)
        self.bottom, self.top = bottom, top
        self.split = nn.Sequential(bottom, self.remote, top)
        self.trunk_opt = RemoteOptimizer(self.remote, "SGD", **optimizer)
        self.split_opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], **optimizer)
        self.local_opt = torch.optim.SGD(self.local.parameters(), **optimizer)

    def backward(self, x: torch.Tensor) -> None:
        self.split(x).square().sum().backward()
        self.local(x).square().sum().backward()

    def clip_parts(self) -> list:
        return [*self.bottom.parameters(), self.remote, *self.top.parameters()]

    def step(self) -> None:
        for optimizer in (self.trunk_opt, self.split_opt, self.local_opt):
            optimizer.step()

    def assert_same_weights(self) -> None:
        remote = self.remote.remote_state_dict()
        for name, param in self.local[1].named_parameters():
            assert torch.equal(remote[name], param.detach()), name
        for mine, theirs in ((self.bottom, self.local[0]), (self.top, self.local[2])):
            for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
                assert torch.equal(a, b)


def test_zero_grad_set_to_none_false_zeroes_the_trunk_gradients(start_server):
    pair = Pair(start_server, lr=0.1, momentum=0.9)
    first, second = _inputs(2)
    pair.backward(first)
    for optimizer in (pair.trunk_opt, pair.split_opt, pair.local_opt):
        optimizer.zero_grad(set_to_none=False)
    norms, _ = pair.remote.client.grad_norms(2.0)
    assert norms == [0.0, 0.0]  # zeroed, not dropped: both gradients are still there
    pair.backward(second)  # accumulates onto zeros: the second batch's gradients only
    grads = pair.server.engine.sessions.values()[0].grads
    for name, param in pair.local[1].named_parameters():
        assert torch.equal(grads[name], param.grad), name
    pair.step()
    pair.assert_same_weights()


def test_zero_grad_set_to_none_drops_the_trunk_gradients(start_server):
    pair = Pair(start_server, lr=0.1)
    pair.backward(_inputs(1)[0])
    pair.trunk_opt.zero_grad()
    assert pair.remote.client.grad_norms(2.0)[0] == []  # None, as torch's set_to_none=True
    pair.trunk_opt.step()  # SGD skips parameters without a gradient
    for name, value in pair.remote.remote_state_dict().items():
        assert torch.equal(value, dict(pair.local[1].named_parameters())[name].detach()), name


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["l2", "l1", "inf"])
def test_clip_grad_norm_clips_like_torch(start_server, norm_type):
    pair = Pair(start_server, lr=0.1)
    for x in _inputs(2):
        pair.backward(x)
    local_norm = torch.nn.utils.clip_grad_norm_(pair.local.parameters(), 0.5, norm_type)
    norm = clip_grad_norm_(pair.clip_parts(), 0.5, norm_type)
    assert local_norm > 0.5  # it really clips
    assert torch.equal(norm, local_norm)
    # The remote share of the clipping is applied on the server (with the next call).
    norms, _ = pair.remote.client.grad_norms(norm_type)
    trunk = pair.local[1].parameters()
    expected = [float(torch.linalg.vector_norm(p.grad, norm_type)) for p in trunk]
    assert norms == expected
    pair.step()
    pair.assert_same_weights()


def test_copying_or_pickling_a_remote_optimizer_says_what_to_do(start_server):
    pair = Pair(start_server, lr=0.1)
    for copy_it in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
            copy_it(pair.trunk_opt)
    pair.backward(_inputs(1)[0])
    pair.step()  # the original still works
    pair.assert_same_weights()


def test_clip_grad_norm_of_one_tensor_clips_it_like_torch():
    tensor, reference = (torch.ones(3, 4, requires_grad=True) for _ in range(2))
    for t in (tensor, reference):
        t.grad = torch.full((3, 4), 10.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=True)
    assert torch.equal(clip_grad_norm_(tensor, 1.0, foreach=True), expected)
    assert torch.equal(tensor.grad, reference.grad)


def test_clip_grad_norm_without_gradients_is_zero(start_server):
    pair = Pair(start_server, lr=0.1)
    local = torch.nn.utils.clip_grad_norm_(pair.local.parameters(), 1.0)
    norm = clip_grad_norm_(pair.clip_parts(), 1.0)
    assert torch.equal(norm, local) and float(norm) == 0.0
    pair.split(_inputs(1)[0]).sum().backward()
    assert float(clip_grad_norm_([pair.remote], 1e9)) > 0  # the trunk's alone


def test_clip_grad_norm_error_if_nonfinite(start_server):
    pair = Pair(start_server, lr=0.1)
    pair.backward(_inputs(1)[0])
    pair.bottom.bias.grad[0] = math.inf
    pair.local[0].bias.grad[0] = math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(pair.local.parameters(), 1.0, error_if_nonfinite=True)
    held = {k: v.clone() for k, v in pair.server.engine.sessions.values()[0].grads.items()}
    with pytest.raises(RuntimeError, match="total norm of order 2.0 .* is non-finite"):
        clip_grad_norm_(pair.clip_parts(), 1.0, error_if_nonfinite=True)
    assert pair.bottom.weight.grad.isfinite().all()  # nothing was scaled
    norms, _ = pair.remote.client.grad_norms(2.0)  # neither here nor on the server
    grads = pair.server.engine.sessions.values()[0].grads
    assert all(torch.equal(grads[k], v) for k, v in held.items())
    assert norms == [float(v.norm()) for v in held.values()]
    # Without the flag it scales by the non-finite norm, as torch does (to zeros and NaN).
    assert math.isinf(float(clip_grad_norm_(pair.clip_parts(), 1.0)))


# -- stepping(): the trunk's step beside the client's ---------------------------------------


def test_stepping_trains_as_stepping_one_after_the_other(start_server):
    """``with trunk_opt.stepping(): opt.step()`` equals the two steps in turn, bit for bit, with
    a zero_grad() and an LR schedule inside the block: those belong to the next step."""
    pair = Pair(start_server, lr=0.1, momentum=0.9)
    split_sched = torch.optim.lr_scheduler.StepLR(pair.split_opt, step_size=1, gamma=0.5)
    trunk_sched = torch.optim.lr_scheduler.StepLR(pair.trunk_opt, step_size=1, gamma=0.5)
    local_sched = torch.optim.lr_scheduler.StepLR(pair.local_opt, step_size=1, gamma=0.5)
    for x in _inputs(3):
        pair.backward(x)
        with pair.trunk_opt.stepping():
            pair.split_opt.step()
            # Taken while the Step may still be in flight: they must not reach it.
            pair.trunk_opt.zero_grad()
            pair.split_opt.zero_grad()
            trunk_sched.step()
            split_sched.step()
        pair.local_opt.step()
        pair.local_opt.zero_grad()
        local_sched.step()
        pair.assert_same_weights()
    assert pair.trunk_opt.state_dict()["remote_step"] == 3
    assert pair.remote.client.grad_norms(2.0)[0] == []  # the zero_grad() reached the session


@contextlib.contextmanager
def _trunk_held(server, seconds: float) -> Iterator[None]:
    """Hold the server's trunk lock from another thread: a Step sent in the block is answered
    no sooner than ``seconds`` after the block starts."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with server.engine.lock:
            held.set()
            release.wait(timeout=30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(timeout=30)
    timer = threading.Timer(seconds, release.set)
    timer.start()
    try:
        yield
    finally:
        release.set()
        timer.cancel()
        holder.join()


@pytest.mark.parametrize(
    ("seed", "micro_batches"),
    [(5, 1), (5, 2), (None, 1)],
    ids=["whole", "sliced", "unseeded-eval"],
)
def test_a_call_to_the_trunk_in_the_block_waits_for_the_step(start_server, seed, micro_batches):
    """A forward in the block runs on the stepped weights with the dropout of the next step,
    as after ``step()`` returned, though the Step is held on the server: the forward waits
    (sliced, each slice's dropout seed is drawn before its Compute; without a seed, in eval
    mode, nothing but the weights tells the two apart)."""
    x0, x1 = (torch.nn.functional.pad(factories.batch(i)[0], (0, 4)) for i in range(2))
    options = ClientOptions(seed=seed, micro_batches=micro_batches)
    runs = []
    for overlap in (False, True):
        server = start_server(factories.dropout_trunk())
        remote = RemoteModule(server.address, options=options)
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.5)
        remote.train(seed is not None)  # unseeded, the dropout would differ run to run
        remote(x0).sum().backward()
        if overlap:
            with _trunk_held(server, 0.2), optimizer.stepping():
                runs.append(remote(x1).detach())
        else:
            optimizer.step()
            runs.append(remote(x1).detach())
    assert torch.equal(runs[0], runs[1])


def test_a_failed_step_is_raised_when_the_block_ends(start_server):
    """The block runs whole; the Step's error follows it, and the step is not counted."""
    pair = Pair(start_server, lr=0.1, momentum=0.9)
    pair.backward(_inputs(1)[0])
    pair.trunk_opt.step()
    state = pair.remote.client.get_state(parameters=False, optimizer=True)["optimizer"]
    for entry in state["state"].values():
        entry["momentum_buffer"] = torch.zeros(1, 3, dtype=torch.float64)  # the wrong shape
    pair.remote.client.load_state({"optimizer": state})
    pair.backward(_inputs(2)[1])
    before = pair.remote.remote_state_dict()
    ran = []
    with (
        pytest.raises(InvalidRequest, match=r"SGD.step\(\) raised RuntimeError"),
        pair.trunk_opt.stepping(),
    ):
        ran.append(True)
        # Waits for the step, which failed: the server's step, not a "restart" refusal.
        assert pair.trunk_opt.state_dict()["remote_step"] == 1
    assert ran == [True]
    assert pair.trunk_opt.state_dict()["remote_step"] == 1
    for name, value in pair.remote.remote_state_dict().items():
        assert torch.equal(value, before[name]), name
    # The block's own error comes first, with the step's as a note.
    with pytest.raises(ZeroDivisionError) as raised, pair.trunk_opt.stepping():
        1 / 0  # noqa: B018
    assert any("step #2 failed too" in note for note in raised.value.__notes__)
    assert pair.trunk_opt.state_dict()["remote_step"] == 1


def test_stepping_with_non_finite_gradients_steps_nothing(start_server):
    """As step(): GradScaler's inf flag refuses before anything is sent or the block runs."""
    pair = Pair(start_server, lr=0.1)
    pair.backward(_inputs(1)[0])
    before = pair.remote.remote_state_dict()
    pair.remote._dummy.grad.fill_(math.inf)  # what GradScaler.unscale_ leaves on inf
    with pytest.raises(FloatingPointError, match="not finite"), pair.trunk_opt.stepping():
        pytest.fail("the block ran")
    assert pair.trunk_opt.state_dict()["remote_step"] == 0
    for name, value in pair.remote.remote_state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_step_thread_that_cannot_start_loses_nothing(start_server, monkeypatch):
    """The error is raised at once, the clipping taken for the step is kept for the next
    one, and later calls do not wait for a step that never went out."""
    pair = Pair(start_server, lr=0.1)
    pair.backward(_inputs(1)[0])
    clip_grad_norm_(pair.clip_parts(), 0.01)
    torch.nn.utils.clip_grad_norm_(pair.local.parameters(), 0.01)

    def refuse(self) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start"), pair.trunk_opt.stepping():
            pytest.fail("the block ran")
    assert pair.trunk_opt._step_count == 0
    pair.step()  # steps with the clipping, as if the failed try had not happened
    pair.assert_same_weights()


def test_a_replaced_remote_optimizer_refuses_instead_of_stepping_the_new_one(start_server):
    """The session holds one optimizer, the newest. An older RemoteOptimizer of the same
    module used to step the newer one's optimizer, whose own first step then passed for a
    repeat and was dropped."""
    pair = Pair(start_server, lr=0.1, momentum=0.9)
    old = pair.trunk_opt
    pair.trunk_opt = RemoteOptimizer(pair.remote, "SGD", lr=0.1, momentum=0.9)
    pair.backward(_inputs(1)[0])
    for call in (
        old.step,
        old.state_dict,
        lambda: old.load_state_dict(pair.trunk_opt.state_dict()),
    ):
        with pytest.raises(RuntimeError, match="newer RemoteOptimizer of the same RemoteModule"):
            call()
    with pytest.raises(RuntimeError, match="replaced"), old.stepping():
        pytest.fail("the block ran")
    pair.step()  # the new one's step #1 is applied
    pair.assert_same_weights()
    assert pair.trunk_opt.state_dict()["remote_step"] == 1
    # GradScaler cannot unscale the trunk's gradients through the old one either: it holds
    # no parameter now, so the new one's unscale_ is the only one applied.
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(pair.split(_inputs(1)[0]).square().sum()).backward()
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(old)
    scaler.unscale_(pair.trunk_opt)
    assert float(pair.remote._dummy.grad) == 0.25


# -- a step that failed: applied or not, never twice, never lost ----------------------------------


def _batch(k: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)


@pytest.mark.parametrize("then", ["next_batch", "redo"])
def test_a_step_that_got_no_answer_is_applied_once_whatever_the_loop_does_next(start_server, then):
    """Step #1 outlives the client's deadline (it waits for another session's forward, then
    the server applies it): DeadlineExceeded. The next step() asks the server and warns that
    #1 was applied. A loop that moved on (zero_grad, the next batch) gets its batch applied as
    #2 (it used to send #1 again, answered as a replay: the batch was lost); a loop that
    redoes the step with nothing changed applies nothing twice. The trunk equals local SGD."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 4).double()
    local = copy.deepcopy(trunk)
    server = start_server(trunk, ServerOptions(step_wait=1.5))
    client = RemoteModule(server.address, options=ClientOptions(timeout=0.5))
    other = RemoteModule(server.address)
    optimizer = RemoteOptimizer(client, "SGD", lr=0.1)
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    for model in (client, local):
        model(_batch(1)).square().sum().backward()
    held = other(torch.ones(1, 4, dtype=torch.float64, requires_grad=True))  # no Backward yet
    with pytest.raises(DeadlineExceeded) as info:
        optimizer.step()
    assert "the server may have applied it" in "".join(info.value.__notes__)
    wait_for(lambda: server.stats()["weights_version"] == 1)  # the wait ran out: applied
    local_optimizer.step()
    if then == "next_batch":
        optimizer.zero_grad()
        local_optimizer.zero_grad()
        for model in (client, local):
            model(_batch(2)).square().sum().backward()
        local_optimizer.step()
    with pytest.warns(RuntimeWarning, match="step #1, which raised DeadlineExceeded, had been"):
        optimizer.step()
    assert server.stats()["weights_version"] == (2 if then == "next_batch" else 1)
    assert optimizer.state_dict()["remote_step"] == server.stats()["weights_version"]
    remote = client.remote_state_dict()
    for name, param in local.named_parameters():
        torch.testing.assert_close(remote[name], param.detach(), rtol=0, atol=0)
    del held
    client.close()
    other.close()


def test_a_step_refused_for_its_number_goes_on_from_the_servers_last_step(start_server):
    """A server that went back to an older step (restarted from an older checkpoint: here its
    session loaded as at step 1) refuses step #4 for its number; the step redone after it is
    #2, and state_dict() says so (the redo was refused the same way, for good)."""
    remote = RemoteModule(start_server(nn.Linear(2, 2).double()).address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    for _ in range(3):
        remote(torch.ones(1, 2, dtype=torch.float64, requires_grad=True)).sum().backward()
        optimizer.step()
    remote.client.load_state({"parameters": None, "optimizer": None, "step": 1})
    with pytest.raises(StaleContext, match="Step #4 does not follow this session's last step #1"):
        optimizer.step()
    optimizer.step()
    assert optimizer.state_dict()["remote_step"] == 2
    remote.close()


def _resumable(address: str, fused: bool | None):
    bottom, top = factories.local_parts()
    remote = RemoteModule(address, options=ClientOptions(seed=5))
    model = nn.Sequential(bottom, remote, top)
    extra = {} if fused is None else {"fused": fused}
    trunk_opt = RemoteOptimizer(remote, "AdamW", lr=0.05, **extra)
    opt = torch.optim.AdamW([*bottom.parameters(), *top.parameters()], lr=0.05)
    return model, remote, trunk_opt, opt


def _train(parts, steps: range) -> None:
    model, _, trunk_opt, opt = parts
    for k in steps:
        x, y = factories.batch(k)
        opt.zero_grad()
        trunk_opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        trunk_opt.step()
        opt.step()


@pytest.mark.parametrize(("saved", "resumed"), [(None, None), (True, None), (None, True)])
def test_training_resumed_from_state_dicts_equals_training_on(start_server, saved, resumed):
    """Dropout in the trunk under ClientOptions(seed=...): the resumed session draws step 3's
    seeds, not step 1's again (the seed counter was not restored). A state saved by an
    optimizer with another fused setting than the resuming one's loads and steps (every Step
    was refused: the loaded flag was sent with it). Float64, bit for bit; across fused and
    unfused AdamW, within their rounding."""
    steps = []
    for run in ("on", "resumed"):
        parts = _resumable(start_server(factories.dropout_trunk()).address, saved)
        _train(parts, range(1, 3 if run == "resumed" else 5))
        if run == "resumed":
            saved_states = {
                "model": copy.deepcopy(parts[0].state_dict()),
                "trunk": parts[2].state_dict(),
                "opt": copy.deepcopy(parts[3].state_dict()),
            }
            parts[1].close()
            parts = _resumable(start_server(factories.dropout_trunk()).address, resumed)
            parts[0].load_state_dict(saved_states["model"])
            parts[2].load_state_dict(saved_states["trunk"])
            parts[3].load_state_dict(saved_states["opt"])
            _train(parts, range(3, 5))
        steps.append({k: v.clone() for k, v in parts[0].state_dict().items()})
        parts[1].close()
    exact = saved == resumed
    for name, value in steps[0].items():
        tolerance = 0 if exact else 1e-12
        torch.testing.assert_close(steps[1][name], value, rtol=0, atol=tolerance, msg=name)


@pytest.mark.parametrize("saved_by", ["SGD", "AdamW_without_betas"])
def test_a_refused_optimizer_state_leaves_the_optimizer_as_it_was(start_server, saved_by):
    """A state of another optimizer class (SGD's momentum in AdamW's groups), or one whose
    groups lack what the optimizer needs: refused, and the session's AdamW steps on with its
    own moments (torch had put the new groups and state in place before failing, and every
    later Step failed: KeyError 'betas'). Float64, against an optimizer that loaded nothing."""
    runs = []
    for refused in (True, False):
        torch.manual_seed(0)
        remote = RemoteModule(start_server(nn.Linear(3, 3).double()).address)
        optimizer = RemoteOptimizer(remote, "AdamW", lr=0.1)
        for step in range(3):
            remote(_batch(step)[:, :3]).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 1 and refused:
                state = optimizer.state_dict()
                if saved_by == "SGD":
                    for group in state["param_groups"]:
                        group.update(momentum=0.9, dampening=0.0, nesterov=False)
                        del group["betas"]
                    state["state"] = {
                        i: {"momentum_buffer": s["exp_avg"]} for i, s in state["state"].items()
                    }
                else:
                    for group in state["param_groups"]:
                        del group["betas"]
                with pytest.raises(InvalidRequest, match="optimizer state"):
                    optimizer.load_state_dict(state)
        runs.append(remote.remote_state_dict())
        remote.close()
    for name, value in runs[1].items():
        torch.testing.assert_close(runs[0][name], value, rtol=0, atol=0)


def test_a_state_with_a_schedulers_group_keys_loads(start_server):
    """OneCycleLR adds max_lr, min_lr and momentum bounds to the groups; state_dict() keeps
    them, and loading it back works (a check of foreign group keys refused it for a while)."""
    remote = RemoteModule(start_server(nn.Linear(3, 3).double()).address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=10)
    for step in range(2):
        remote(_batch(step)[:, :3]).square().sum().backward()
        optimizer.step()
        scheduler.step()
    state = optimizer.state_dict()
    assert {"max_lr", "min_lr", "max_momentum"} <= set(state["param_groups"][0])
    again = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.9)
    again.load_state_dict(state)
    remote(_batch(3)[:, :3]).square().sum().backward()
    again.step()
    remote.close()


def test_learning_rates_held_as_numpy_scalars_or_tensors_reach_the_trunk(start_server):
    """An LR table of np.float32 (LambdaLR over np.linspace), an LR held as a tensor, a flag
    held as np.bool_: each step sends the number it holds (a numpy scalar was once left out
    without a word, and the server kept stepping at the configured LR), and state_dict()
    loads back. A user's own entries of other kinds (a long name, a list of tags) stay on
    this side, through steps and a state_dict round trip."""
    import numpy as np

    pair = Pair(start_server, lr=0.1, momentum=0.9)
    for step, lr in enumerate((np.float32(0.05), np.float64(0.03), torch.tensor(0.02))):
        pair.backward(_inputs(3)[step])
        for optimizer in (pair.trunk_opt, pair.split_opt, pair.local_opt):
            optimizer.param_groups[0]["lr"] = lr
            optimizer.step()
            optimizer.zero_grad()
        pair.assert_same_weights()
    pair.trunk_opt.load_state_dict(pair.trunk_opt.state_dict())
    group = pair.trunk_opt.param_groups[0]
    group.update(maximize=np.bool_(False), name="the trunk " * 10, tags=["lora", "warm"])
    pair.backward(_inputs(4)[3])
    pair.trunk_opt.step()
    pair.trunk_opt.load_state_dict(pair.trunk_opt.state_dict())
    assert pair.trunk_opt.param_groups[0]["tags"] == ["lora", "warm"]
    assert pair.trunk_opt._step_count == 4
    group["lr"] = np.array([0.5, 0.5])  # an entry the server steps with: no number in it
    with pytest.raises(TypeError, match=r"lr=array\(\[0.5, 0.5\]\) of a RemoteOptimizer"):
        pair.trunk_opt.step()


# Every torch.optim optimizer a trunk may use (LBFGS needs a closure: refused elsewhere), with
# its defaults: some hold odd values (Adafactor's eps is (None, 1e-3), Rprop's etas a tuple).
OPTIMIZERS = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", {"lr": 0.01}),
    ("Adafactor", {"lr": 0.01}),
    ("Adagrad", {"lr": 0.1}),
    ("Adadelta", {}),
    ("Adamax", {}),
    ("ASGD", {"lr": 0.01}),
    ("NAdam", {"lr": 0.01}),
    ("RAdam", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "centered": True}),
    ("Rprop", {}),
]


@pytest.mark.parametrize(("name", "options"), OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_every_optimizer_trains_and_resumes_from_its_state_dict_like_torch(
    start_server, name, options
):
    """Two steps, state_dict(), a fresh optimizer that loads it, two more steps: the trunk's
    weights equal the same done with the torch optimizer on a local copy, bit for bit (float64).
    Adafactor's state did not load back: the server left its eps (None, 1e-3) out of the
    groups it told the client, so the client left it out of the state it sent back."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3).double()
    local = copy.deepcopy(trunk)
    remote = RemoteModule(start_server(trunk).address)
    optimizers = [RemoteOptimizer(remote, name, **options)]
    local_optimizers = [getattr(torch.optim, name)(local.parameters(), **options)]
    for step in range(4):
        if step == 2:  # resume: a new optimizer on each side loads the other's state
            saved, local_saved = optimizers[-1].state_dict(), local_optimizers[-1].state_dict()
            assert saved["param_groups"][0].keys() - {"trunk_params"} == (
                local_saved["param_groups"][0].keys()
            )
            optimizers.append(RemoteOptimizer(remote, name, **options))
            optimizers[-1].load_state_dict(saved)
            local_optimizers.append(getattr(torch.optim, name)(local.parameters(), **options))
            local_optimizers[-1].load_state_dict(local_saved)
        x = _batch(step)[:, :4]
        for model, optimizer in ((remote, optimizers[-1]), (local, local_optimizers[-1])):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
        weights = remote.remote_state_dict()
        for key, value in local.state_dict().items():
            assert torch.equal(weights[key], value), (step, key)
    remote.close()


@pytest.mark.parametrize("announced", [True, False])
def test_tuples_holding_none_reach_only_clients_that_read_them(start_server, announced):
    """Adafactor's eps (None, 1e-3) in the configured groups: a client before session 13
    refused such an entry at its first step(), so only a client that says it reads them gets
    it; that client's state_dict() loads back (the test above)."""
    server = start_server(nn.Linear(4, 3).double())
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.TrunkStub(channel).ConfigureOptimizer(
            pb.ConfigureOptimizerRequest(name="Adafactor", none_in_tuples=announced),
            metadata=(("ra-session", "s1"),),
        )
    (group,) = msgpack.unpackb(reply.param_groups, raw=False)
    assert group["lr"] == 0.01 and group["params"] == ["weight", "bias"]
    assert group.get("eps") == ([None, 0.001] if announced else None)


class _TwoDtypes(nn.Module):
    """A trunk training parameters of two dtypes (a low-precision layer, norms kept wider)."""

    def __init__(self, first: torch.dtype, second: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first, self.second = first, second
        self.a = nn.Linear(16, 16).to(first)
        self.b = nn.Linear(16, 16).to(second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.to(self.first))).to(self.second)).float()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
    ],
    ids=["bf16-float32", "float32-float64", "float64-float32"],
)
def test_clipping_a_trunk_of_several_dtypes_equals_torch(start_server, first, second):
    """The server told one dtype for all its norms (the first gradient's), and scaled every
    gradient by the coefficient cast to that dtype: a bf16 layer before a float32 one got
    float32 norms rounded to bf16, and float32 gradients clipped by a bf16 coefficient (0.2%
    off). Now each norm comes in its gradient's dtype, and the coefficient as torch's is."""
    torch.manual_seed(0)
    bottom, top = nn.Linear(6, 16), nn.Linear(16, 3)
    trunk = _TwoDtypes(first, second)
    local = nn.Sequential(*copy.deepcopy((bottom, trunk, top)))
    remote = RemoteModule(start_server(copy.deepcopy(trunk)).address)
    split = nn.Sequential(bottom, remote, top)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for model in (split, local):
        model(x).square().sum().backward()
    total = clip_grad_norm_(split, 1e-3)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(local.parameters(), 1e-3))
    trunk_opt = RemoteOptimizer(remote, "SGD", lr=1.0)
    trunk_opt.step()
    torch.optim.SGD(local[1].parameters(), lr=1.0).step()
    weights = remote.remote_state_dict()
    for name, value in local[1].state_dict().items():
        assert torch.equal(weights[name], value), name
    for mine, theirs in zip(bottom.parameters(), local[0].parameters(), strict=True):
        assert torch.equal(mine.grad, theirs.grad)
    remote.close()


def test_clipping_a_list_naming_a_tied_weight_twice_counts_it_once(start_server):
    """The bottom's embedding is the top's output weight (GPT-2's tied wte and lm_head): the
    documented list ``[*bottom.parameters(), trunk, *top.parameters()]`` names it twice, and
    it was counted twice in the norm and scaled twice. Now as torch on the unsplit model."""
    torch.manual_seed(0)
    embedding, trunk = nn.Embedding(10, 4).double(), nn.Linear(4, 4).double()
    head = nn.Linear(4, 10, bias=False).double()
    head.weight = embedding.weight
    local = nn.Sequential(*copy.deepcopy((embedding, trunk, head)))
    remote = RemoteModule(start_server(trunk).address)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for model in (nn.Sequential(embedding, remote, head), local):
        model(tokens).square().sum().backward()
    parts = [*embedding.parameters(), remote, *head.parameters()]
    total = clip_grad_norm_(parts, 0.5)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(local.parameters(), 0.5))
    assert torch.equal(embedding.weight.grad, local[0].weight.grad)
    remote.close()


def test_a_step_after_close_says_the_client_is_closed_and_counts_nothing(start_server):
    """step() after close() never leaves the process: its error says so, without the note of
    a step that got no answer ("the server may have applied it"), and the step count stays."""
    from remote_autograd import TransportError

    server = start_server(nn.Linear(4, 4).double())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    remote(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    remote.close()
    with pytest.raises(TransportError, match="is closed: create a new RemoteModule") as caught:
        optimizer.step()
    assert not any("may have applied" in note for note in getattr(caught.value, "__notes__", []))
    assert optimizer._step_count == 0 and optimizer._unsettled is None
