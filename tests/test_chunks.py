"""micro_batches inside one call: a Compute and its Backward as concurrent slices of the batch
compute what the unsliced call computes (float64 within 1e-12, float32 within 1e-6)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from models import Blocks
from polling import wait_for
from torch import nn

from remote_autograd import ClientOptions, RemoteModule, RemoteOptimizer, ServerOptions, TrunkError


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-6}


def _inputs(dtype: torch.dtype, rows: int = 5):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(rows, 7, 16, generator=generator, dtype=dtype, requires_grad=True)
    padding = torch.zeros(rows, 7, dtype=torch.bool)
    padding[1, 5:] = True  # padded sequences
    padding[3, 2:] = True
    return hidden, padding


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(  # 8 > 5 rows: one row per slice
    ("micro", "where"), [(2, "argument"), (3, "options"), (8, "argument")]
)
def test_sliced_call_matches_the_unsliced_call_and_local(dtype, micro, where, start_server):
    torch.manual_seed(0)
    trunk = Blocks(depth=2, width=16).to(dtype)
    local = copy.deepcopy(trunk)
    sliced_server, whole_server = start_server(trunk), start_server(copy.deepcopy(trunk))
    hidden, padding = _inputs(dtype)
    kwargs = (
        {"micro_batches": micro}
        if where == "argument"
        else {"options": ClientOptions(micro_batches=micro)}
    )
    # Gradients of order 1: float32 rounding (~1e-7 relative) then stays below 1e-6 absolute.
    grad_out = 0.05 * torch.randn(5, 7, 16, dtype=dtype)
    results = {}
    with (
        RemoteModule(sliced_server.address, **kwargs) as sliced,
        RemoteModule(whole_server.address) as whole,
    ):
        for name, module in (("sliced", sliced), ("whole", whole), ("local", local)):
            x = hidden.detach().clone().requires_grad_()
            out, norms = module(x, padding)
            (out * grad_out).sum().add(0.05 * norms.sum()).backward()
            results[name] = (out.detach(), norms.detach(), x.grad)
        server_grads = {
            "sliced": dict(sliced_server.engine.sessions.values()[0].grads),
            "whole": dict(whole_server.engine.sessions.values()[0].grads),
        }
    tol = _tolerance(dtype)
    for other in ("whole", "local"):
        for mine, theirs in zip(results["sliced"], results[other], strict=True):
            torch.testing.assert_close(mine, theirs, **tol)
    local_grads = {n: p.grad for n, p in local.named_parameters()}
    for name, grad in local_grads.items():
        torch.testing.assert_close(server_grads["sliced"][name], grad, **tol)
        torch.testing.assert_close(server_grads["sliced"][name], server_grads["whole"][name], **tol)


def test_sliced_training_with_zero_grad_matches_unsliced_training(start_server):
    """Steps with a deferred zero_grad(): it reaches the server before any slice's gradients."""
    torch.manual_seed(0)
    trunk = Blocks(depth=1, width=16).double()
    initial = copy.deepcopy(trunk.state_dict())
    servers = [start_server(trunk), start_server(copy.deepcopy(trunk))]
    hidden, padding = _inputs(torch.float64, rows=6)
    states = []
    for server, micro in zip(servers, (3, 1), strict=True):
        with RemoteModule(server.address, micro_batches=micro) as remote:
            opt = RemoteOptimizer(remote, torch.optim.SGD, lr=0.1)
            for _ in range(3):
                opt.zero_grad()
                out, norms = remote(hidden.detach(), padding)
                (out.pow(2).mean() + norms.mean()).backward()
                opt.step()
            states.append(remote.remote_state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=0, atol=1e-12)
    assert not torch.equal(states[0]["blocks.0.mlp.0.weight"], initial["blocks.0.mlp.0.weight"])


class _Broadcast(nn.Module):
    """A (1, d) input shared by every sample, and dropout: its gradient is the slices' sum."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, bias):
        return self.drop(self.linear(x) + bias)


def test_unsliced_inputs_get_summed_gradients_and_seeded_dropout_repeats(start_server):
    x = torch.randn(6, 4, dtype=torch.float64)
    bias = torch.randn(1, 4, dtype=torch.float64)
    torch.manual_seed(0)
    trunk = _Broadcast()
    runs = []
    for _ in range(2):
        server = start_server(copy.deepcopy(trunk))
        with RemoteModule(server.address, options=ClientOptions(seed=5, micro_batches=3)) as r:
            xs, b = x.clone().requires_grad_(), bias.clone().requires_grad_()
            out = r(xs, b)
            out.sum().backward()
            runs.append((out.detach(), xs.grad, b.grad))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)  # seeded dropout: the same masks in every run
    out, x_grad, b_grad = runs[0]
    kept = (out != 0).double()
    torch.testing.assert_close(b_grad, (2 * kept).sum(0, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_grad, (2 * kept) @ trunk.linear.weight, rtol=0, atol=1e-12)


class _Total(nn.Module):
    def forward(self, x):
        return x.sum()


def test_an_output_without_the_batch_is_refused_with_what_to_do(start_server):
    server = start_server(_Total())
    with RemoteModule(server.address, micro_batches=2) as remote:
        with pytest.raises(ValueError, match="micro_batches=1"):
            remote(torch.randn(4, 3))
        assert torch.equal(remote(torch.ones(1, 3)), torch.tensor(3.0))  # 1 row: not sliced
    with pytest.raises(ValueError, match="micro_batches"):
        ClientOptions(micro_batches=0)
    with pytest.raises(ValueError, match="micro_batches"):
        RemoteModule(server.address, micro_batches=0)


class _Picky(nn.Module):
    """Fails on a value above 100; counts the nonzero rows beside its output."""

    def forward(self, x):
        if (x > 100).any():
            raise ValueError("a value above 100")
        return {"y": x * 2, "nonzero rows": int((x != 0).any(dim=1).sum())}


def test_a_sliced_call_that_fails_releases_every_slice_and_joins_no_plain_values(start_server):
    """One slice's trunk error, or slices whose plain output values differ (slice 0's used to
    be returned for all): refused, and the answered slices' contexts released at once (they
    were kept until context_ttl, holding up other sessions' Steps)."""
    server = start_server(_Picky())
    x = torch.zeros(8, 3, dtype=torch.float64, requires_grad=True)
    with RemoteModule(server.address, micro_batches=4) as remote:
        bad = x.detach().clone()
        bad[7, 0] = 1000.0  # the last slice fails, the first three are answered
        with pytest.raises(TrunkError, match="a value above 100"):
            remote(bad.requires_grad_())
        wait_for(lambda: server.stats()["contexts"] == 0, timeout=10)
        uneven = x.detach().clone()
        uneven[:3] = 1.0  # 2 nonzero rows in slice 0, 1 in slice 1, none after
        with pytest.raises(ValueError, match="same plain values .* micro_batches=1"):
            remote(uneven.requires_grad_())
        wait_for(lambda: server.stats()["contexts"] == 0, timeout=10)
        assert remote(x)["nonzero rows"] == 0  # the same in every slice: joined
    with RemoteModule(server.address) as remote:
        assert remote(uneven)["nonzero rows"] == 3


class _Positions(nn.Module):
    """Takes positions of shape (L,) beside hidden states (B, L, H)."""

    def forward(self, hidden, positions):
        return hidden + positions[None, :, None]


def test_a_trunk_error_of_a_sliced_call_says_what_was_sliced(start_server):
    server = start_server(_Positions())
    hidden, positions = torch.zeros(4, 4, 2), torch.arange(4.0)  # L happens to equal B
    with RemoteModule(server.address, micro_batches=2) as remote:
        with pytest.raises(TrunkError) as info:
            remote(hidden, positions)
        assert "input tensors [0, 1] were sliced" in "\n".join(info.value.__notes__)
        assert "use micro_batches=1" in info.value.__notes__[0]
    with RemoteModule(server.address, micro_batches=1) as remote:
        assert torch.equal(remote(hidden, positions), _Positions()(hidden, positions))


class _Slow(torch.autograd.Function):
    """The identity, taking ``seconds`` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.seconds)
        return grad, None


class _SlowLayer(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_Slow.apply(x, 0.2))


def test_the_seconds_a_slice_waits_for_the_trunk_are_not_counted_as_its_compute(start_server):
    """The trunk runs one call at a time: a slice waiting for another's forward or backward is
    not computing. The seconds the replies report (proto: "compute only") add up to at least
    each slice's own work and to no more than the whole call took, with its slices in turn."""
    server = start_server(_SlowLayer(4, 4))
    x = torch.randn(6, 4, requires_grad=True)
    with RemoteModule(server.address, micro_batches=3) as remote:
        remote.client.info()  # the handshake outside the timed calls
        stats = remote.client.stats
        started = time.perf_counter()
        out = remote(x)
        forward_wall = time.perf_counter() - started
        forward_seconds = stats.server_compute_seconds
        started = time.perf_counter()
        out.sum().backward()
        backward_wall = time.perf_counter() - started
        backward_seconds = stats.server_compute_seconds - forward_seconds
    for seconds, wall in ((forward_seconds, forward_wall), (backward_seconds, backward_wall)):
        assert 3 * 0.2 <= seconds <= wall, (seconds, wall)
    torch.testing.assert_close(x.grad, server.engine.module.weight.sum(0).expand(6, 4))


class _Extras(nn.Module):
    """A per-sample output beside one without the batch: a statistic, a learned (1, D)
    embedding, or a fixed memory of 2 rows."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.linear = nn.Linear(4, 4).double()
        self.memory = nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
        self.extra = extra

    def forward(self, x: torch.Tensor):
        hidden = torch.tanh(self.linear(x))
        if self.extra == "statistic":
            return hidden, hidden.mean().reshape(1)
        if self.extra == "embedding":
            return hidden, self.memory[:1] * 2
        return hidden, self.memory * 1.0


@pytest.mark.parametrize("extra", ["statistic", "embedding", "memory"])
def test_an_output_without_the_batch_is_refused_at_every_batch_size_or_computed_whole(
    extra, start_server
):
    """Slices near-equal but never all equal, some of two rows or more: an output without the
    batch differs from some slice's rows at every batch size, so a sliced call either equals
    the local trunk (a batch too small to slice) or is refused; never a tensor joined from the
    slices' copies of it (which had the batch's length)."""
    local = _Extras(extra)
    server = start_server(copy.deepcopy(local))
    with RemoteModule(server.address, micro_batches=4) as remote:
        for rows in range(1, 10):
            x = torch.randn(rows, 4, dtype=torch.float64)
            try:
                got = remote(x)
            except ValueError as exc:
                assert rows > 2 and "Use micro_batches=1 for this trunk" in str(exc)
                continue
            assert rows <= 2, f"{rows} rows were sliced and joined"
            for mine, theirs in zip(got, local(x), strict=True):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_slicing_a_trunk_that_runs_over_the_batch_warns(start_server):
    """BatchNorm in the served trunk: each slice of a training forward is normalised by its
    own statistics (outputs off by 0.94 in the hunt) and moves the running ones once per
    slice. The server says which module (Info.batch_statistics); the client warns, also
    through PipelinedStep. Eval forwards, and a BatchNorm served frozen (in eval mode inside a
    training trunk), are the whole batch's: no word."""
    import warnings

    from remote_autograd import PipelinedStep

    batch_norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    frozen = copy.deepcopy(batch_norm)
    frozen[1].eval()
    x = torch.randn(10, 4, dtype=torch.float64)  # slices of 3 and 2 samples in the step
    with RemoteModule(start_server(batch_norm).address, micro_batches=2) as remote:
        assert remote.remote_info()["batch_statistics"] == "BatchNorm1d"
        with pytest.warns(UserWarning, match="holds BatchNorm1d, which a training forward"):
            remote(x)
        step = PipelinedStep(
            nn.Identity(), remote, nn.Identity(), lambda z, y: z.sum(), micro_batches=2
        )
        with warnings.catch_warnings(record=True) as caught:  # the slices' warning too
            warnings.simplefilter("always")
            step(x.requires_grad_(), x)
        said = [str(w.message) for w in caught]
        assert any("the trunk holds BatchNorm1d, which computes" in m for m in said), said
        remote.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            remote(x)
    with RemoteModule(start_server(frozen).address, micro_batches=2) as remote:
        assert remote.remote_info()["batch_statistics"] == ""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            remote(x)


def test_slices_recover_their_lost_contexts_one_at_a_time(start_server):
    """Under a context limit smaller than the slices in flight (max_session_contexts=1, three
    slices, two forwards kept), every slice's context is evicted and re-created at the
    Backward. The slices re-created theirs at once and evicted each other again: the Backward
    failed with ContextNotFound, where the unsliced call recovers. They now take turns, and
    the gradients are the local ones (float64, up to summation order)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double()
    local = copy.deepcopy(trunk)
    server = start_server(trunk, ServerOptions(max_session_contexts=1))
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    x_local = x.detach().clone().requires_grad_()
    with RemoteModule(server.address, micro_batches=3) as remote:
        (remote(x).sum() + remote(x * 2).sum()).backward()
        grads = dict(server.engine.sessions.values()[0].grads)
    (local(x_local).sum() + local(x_local * 2).sum()).backward()
    torch.testing.assert_close(x.grad, x_local.grad, rtol=1e-12, atol=1e-14)
    for name, param in local.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-14)
