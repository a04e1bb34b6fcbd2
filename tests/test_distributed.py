"""A trunk under torchrun (2 ranks, gloo on CPU, real child processes) gives the results of one
process and of local training: each rank takes a share of the batch, rank 0 answers."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import child_env, serving_address
from factories import (
    awkward_trunk,
    batch,
    bf16_middle_trunk,
    headed_trunk,
    linear32_trunk,
    local_parts,
    mixed_trunk,
    narrow_slow_trunk,
    shifted_trunk,
    shifted_trunk32,
)
from torch import nn

import remote_autograd
from remote_autograd import (
    ClientOptions,
    DeadlineExceeded,
    RemoteModule,
    RemoteOptimizer,
    ServerUnavailable,
    TransportError,
    clip_grad_norm_,
    serve,
)
from remote_autograd.errors import CodecError, InvalidRequest, RemoteError, TrunkError
from remote_autograd.shares import Plan, shares

# One server serves the tests of this module in turn: each starts from the weights the last
# one left, on purpose (its local reference starts there too).
pytestmark = pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")

TOL = {"rtol": 0, "atol": 1e-12}  # float64: a sum over shards vs the unsplit sum
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def start_torchrun(
    factory: str, *extra: str, nproc: int = 2, launch: tuple[str, ...] = ("--standalone",)
) -> subprocess.Popen[str]:
    """``torchrun [launch] --nproc-per-node N -m remote_autograd serve --module factory ...``
    in its own process group."""
    command = [*TORCHRUN, *launch, f"--nproc-per-node={nproc}", "-m", "remote_autograd"]
    command += ["serve", "--module", factory, "--address", "127.0.0.1:0", *extra]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=child_env(OMP_NUM_THREADS="1"),
        start_new_session=True,
    )


def spawn_torchrun(
    factory: str, *extra: str, nproc: int = 2, launch: tuple[str, ...] = ("--standalone",)
) -> tuple[subprocess.Popen[str], str]:
    """:func:`start_torchrun`; return it and rank 0's address once it serves."""
    process = start_torchrun(factory, *extra, nproc=nproc, launch=launch)
    address = serving_address(process, 180)
    if address is not None:
        return process, address
    stop_torchrun(process)
    raise RuntimeError("the torchrun server did not start")


def stop_torchrun(process: subprocess.Popen[str]) -> None:
    with_group = process.poll() is None
    if with_group:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def parallel(request) -> Iterator[tuple[str, str]]:
    """(mode, address) of a 2-rank server of shifted_trunk in each mode."""
    process, address = spawn_torchrun("factories:shifted_trunk", "--parallel", request.param)
    yield request.param, address
    stop_torchrun(process)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def parallel32(request) -> Iterator[tuple[str, str]]:
    """The same in float32."""
    process, address = spawn_torchrun("factories:shifted_trunk32", "--parallel", request.param)
    yield request.param, address
    stop_torchrun(process)


@pytest.fixture(scope="module")
def single32_address() -> Iterator[str]:
    server = serve(shifted_trunk32())
    yield server.address
    server.stop(grace=None)


@pytest.fixture(scope="module")
def single_address() -> Iterator[str]:
    server = serve(shifted_trunk())
    yield server.address
    server.stop(grace=None)


def _fresh(address: str, factory=shifted_trunk) -> RemoteModule:
    """A new session on the shared server, the trunk's weights reset to the factory's."""
    remote = RemoteModule(address)
    remote.load_remote_state_dict(dict(factory().named_parameters()))
    return remote


def _micro_batches(step: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(500 + step)
    return [  # sizes that do not divide by 2 ranks (1: one rank's share is empty)
        (
            torch.randn(size, 4, generator=generator, dtype=dtype),
            torch.randn(size, 2, generator=generator, dtype=dtype),
        )
        for size in (3, 1)
    ]


def _train(
    trunk: nn.Module, dtype: torch.dtype = torch.float64
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """5 AdamW steps, 2 micro-batches each, clipping and a StepLR; returns the losses and the
    final parameters of bottom, trunk and top."""
    bottom, top = (part.to(dtype) for part in local_parts())
    client_params = [*bottom.parameters(), *top.parameters()]
    optimizers: list = [torch.optim.AdamW(client_params, lr=0.02, weight_decay=0.1)]
    if isinstance(trunk, RemoteModule):
        optimizers.append(RemoteOptimizer(trunk, "AdamW", lr=0.02, weight_decay=0.1))
        clip = [*client_params, trunk]
    else:
        optimizers.append(torch.optim.AdamW(trunk.parameters(), lr=0.02, weight_decay=0.1))
        clip = [*client_params, *trunk.parameters()]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
    losses = []
    for step in range(5):
        for optimizer in optimizers:
            optimizer.zero_grad()
        for x, y in _micro_batches(step, dtype):
            loss = nn.functional.mse_loss(top(trunk(bottom(x))), y) / 2
            loss.backward()
            losses.append(float(loss.detach()))
        clip_grad_norm_(clip, 0.05)  # below every step's norm: every step clips
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    trunk_state = (
        trunk.remote_state_dict()
        if isinstance(trunk, RemoteModule)
        else {n: p.detach() for n, p in trunk.named_parameters()}
    )
    params = {f"trunk.{n}": p for n, p in trunk_state.items()}
    params.update({f"bottom.{n}": p.detach() for n, p in bottom.named_parameters()})
    params.update({f"top.{n}": p.detach() for n, p in top.named_parameters()})
    return losses, params


def test_parallel_outside_torchrun_says_how_to_launch():
    env = {k: v for k, v in child_env().items() if k not in ("RANK", "WORLD_SIZE")}
    command = [sys.executable, "-m", "remote_autograd", "serve"]
    command += ["--module", "factories:shifted_trunk", "--parallel", "ddp"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "--parallel needs torchrun: torchrun --nproc-per-node N" in completed.stderr


def test_per_client_adapters_under_parallel_are_refused_with_a_reason():
    env = child_env(RANK="0")
    command = [sys.executable, "-m", "remote_autograd", "serve", "--parallel", "fsdp"]
    command += ["--module", "factories:dropout_trunk", "--adapters=per-client"]
    command += ["--lora-targets=0,3"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "--adapters per-client runs in one process" in completed.stderr


def test_shares_are_contiguous_uneven_and_may_be_empty():
    assert shares(5, 2) == [3, 2]
    assert shares(1, 2) == [1, 0]
    assert shares(0, 3) == [0, 0, 0]
    assert shares(7, 3) == [3, 2, 2]


def test_outputs_that_differ_beyond_the_batch_are_refused_with_a_reason():
    """A trunk that pads to the longest sequence of its share gives each rank another length:
    refused by name (the forward's kept graphs are then released on every rank), where
    torch.cat raised a RuntimeError answered INTERNAL."""
    plan = Plan([torch.zeros(5, 3)], 2, everyone=True)
    per_rank = {0: [torch.zeros(3, 7)], 1: [torch.zeros(2, 4)]}
    with pytest.raises(InvalidRequest, match="differs between the ranks' shares beyond"):
        plan.gather(per_rank, torch.device("cpu"))
    per_rank = {0: [torch.zeros(3, 7)], 1: [torch.zeros(2, 7)]}
    assert plan.gather(per_rank, torch.device("cpu"))[1][0].shape == (5, 7)


def test_info_says_how_many_ranks_compute(parallel, single_address):
    mode, address = parallel
    with RemoteModule(address) as remote:
        info = remote.client.info()
        assert (info.world_size, info.parallel, info.device) == (2, mode, "cpu")
        assert info.module_repr == "ShiftedTrunk"  # not FSDP2's renamed class
        # The trunk as built, before sharding: what a client's fingerprint names.
        assert info.fingerprint == remote_autograd.trunk_fingerprint(shifted_trunk())
        assert info.trainable_numel == sum(p.numel() for p in shifted_trunk().parameters())
    with RemoteModule(single_address) as remote:
        info = remote.client.info()
        assert (info.world_size, info.parallel) == (1, "")


def _check_training(parallel, single_address, factory, dtype, tol):
    mode, address = parallel
    local_losses, local_params = _train(factory(), dtype)
    results = {}
    for name, served in ((mode, address), ("single", single_address)):
        with _fresh(served, factory) as remote:
            results[name] = _train(remote, dtype)
    for name, (losses, params) in results.items():
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(local_losses), **tol, msg=name
        )
        assert params.keys() == local_params.keys()
        for key, value in local_params.items():
            torch.testing.assert_close(params[key], value, **tol, msg=f"{name} {key}")
            assert params[key].dtype == dtype
            assert not torch.equal(
                value,
                dict(factory().named_parameters()).get(key.removeprefix("trunk."), torch.zeros(0)),
            ), key  # the trunk really trained
    distributed, single = results[mode][1], results["single"][1]
    for key in distributed:
        torch.testing.assert_close(distributed[key], single[key], **tol, msg=key)


def test_training_through_two_ranks_equals_one_process_and_local(parallel, single_address):
    _check_training(parallel, single_address, shifted_trunk, torch.float64, TOL)


def test_float32_training_through_two_ranks_is_within_1e6(parallel32, single32_address):
    tol = {"rtol": 0, "atol": 1e-6}  # float32: sums over shards in another order
    _check_training(parallel32, single32_address, shifted_trunk32, torch.float32, tol)


@pytest.mark.parametrize("batch", [0, 1, 2, 5])
def test_inputs_without_a_batch_dimension_go_to_every_rank_whole(parallel, batch):
    """``shift`` (shape 1x8 or 8) is not split; its gradient is the sum over the ranks."""
    local = shifted_trunk()
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    for shape in ((1, 8), (8,)):
        shift = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
        with _fresh(parallel[1]) as remote:
            out = remote(x, shift=shift)
            expected = local(x, shift=shift)
            torch.testing.assert_close(out, expected, **TOL)
            weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
            grads = torch.autograd.grad((out * weights).sum(), (x, shift))
            local_grads = torch.autograd.grad((expected * weights).sum(), (x, shift))
            for grad, local_grad in zip(grads, local_grads, strict=True):
                torch.testing.assert_close(grad, local_grad, **TOL)


def test_several_sessions_keep_their_own_gradients(parallel):
    """Two sessions' forwards and backwards interleave; each Step applies its own gradients."""
    local = shifted_trunk()
    generator = torch.Generator().manual_seed(7)
    xa = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    xb = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    with _fresh(parallel[1]) as a, RemoteModule(parallel[1]) as b:
        opt_a, opt_b = RemoteOptimizer(a, "SGD", lr=0.5), RemoteOptimizer(b, "SGD", lr=0.25)
        out_a, out_b = a(xa), b(xb)
        out_a.pow(2).sum().backward()
        out_b.sum().backward()
        opt_a.step()
        opt_b.step()
        state = a.remote_state_dict()
    grads_a = torch.autograd.grad(local(xa).pow(2).sum(), list(local.parameters()))
    grads_b = torch.autograd.grad(local(xb).sum(), list(local.parameters()))
    with torch.no_grad():
        for param, ga, gb in zip(local.parameters(), grads_a, grads_b, strict=True):
            param -= 0.5 * ga
            param -= 0.25 * gb
    for name, param in local.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), **TOL, msg=name)


def test_concurrent_sessions_get_their_own_outputs(parallel):
    local = copy.deepcopy(shifted_trunk())
    with _fresh(parallel[1]):
        pass
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            generator = torch.Generator().manual_seed(seed)
            with RemoteModule(parallel[1]) as remote:
                for size in (1, 4, 3, 2, 601):  # 601 x 8 float64: frames over _Wire.HEAD
                    x = torch.randn(size, 8, generator=generator, dtype=torch.float64)
                    with torch.no_grad():
                        torch.testing.assert_close(remote(x), local(x), **TOL)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures


def test_an_output_without_the_batch_dimension_is_refused_with_a_reason(parallel):
    local = shifted_trunk()
    x = torch.randn(4, 8, dtype=torch.float64)
    with _fresh(parallel[1]) as remote:
        with pytest.raises(InvalidRequest, match="no batch dimension first.*--parallel"):
            remote(x, pooled=True)
        # One rank ran (a batch of 1): nothing to join, the output is returned as it is.
        torch.testing.assert_close(remote(x[:1], pooled=True), local(x[:1], pooled=True), **TOL)
        torch.testing.assert_close(remote(x), local(x), **TOL)  # and the ranks go on


def test_a_bad_input_is_refused_and_the_ranks_go_on(parallel):
    local = shifted_trunk()
    with _fresh(parallel[1]) as remote:
        with pytest.raises(RemoteError, match="mat1 and mat2|shape"):
            remote(torch.randn(4, 5, dtype=torch.float64))  # 5 features, the trunk takes 8
        x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
        out = remote(x)
        torch.testing.assert_close(out, local(x), **TOL)
        grad = torch.autograd.grad(out.sum(), x)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(local(x).sum(), x)[0], **TOL)


def test_a_trunk_failing_on_one_rank_answers_as_one_process_does(parallel, single_address):
    """The trunk raising on rank 1's share alone (the last rows), on rank 0's alone, or on
    both: a TrunkError (INTERNAL), as one process answers the same failure, not a refusal of
    the client's input; the ranks go on."""
    local = shifted_trunk()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    for bad in ([3], [0], [0, 3]):  # rows of rank 1's share, rank 0's, both
        wild = x.clone()
        wild[bad] = 1e3
        for address in (single_address, parallel[1]):
            with _fresh(address) as remote:
                with pytest.raises(TrunkError, match="a sample beyond 100") as failure:
                    remote(wild.requires_grad_(), limit=100.0)
                assert failure.value.status == grpc.StatusCode.INTERNAL
                out = remote(x, limit=1e6)
                torch.testing.assert_close(out, local(x), **TOL)


def _rank_pid(torchrun: subprocess.Popen[str], rank: int) -> int:
    """The process id of one rank: a child of the torchrun agent with RANK in its environment."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise LookupError(f"no rank {rank} among {children}")


@pytest.mark.parametrize("call", ["step", "get_state"])
def test_a_hung_rank_takes_the_trunk_out_of_service_and_torchrun_ends_it(call):
    """--dist-timeout 4. Idle for longer (the Step case): the ranks still serve, since rank 0
    sends the others a command whenever none went for a second (they once timed out waiting
    for the next one, and the group ended). Then rank 1 stopped (SIGSTOP) before a Step or an
    fsdp GetState, which every rank runs: rank 0's exchange with it times out. The call, the
    first one into the timed-out collective included, is answered UNAVAILABLE (not INTERNAL,
    as a failure of the trunk's own code is), and rank 0 leaves with an error, so that
    torchrun ends the group (health said SERVING and torchrun lived on, out of service)."""
    process, address = spawn_torchrun(
        "factories:shifted_trunk", "--parallel", "fsdp", "--dist-timeout", "4"
    )
    rank1 = _rank_pid(process, 1)
    try:
        with RemoteModule(address, options=ClientOptions(retries=0, timeout=120)) as remote:
            trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
            x = torch.randn(4, 8, dtype=torch.float64)
            remote(x).sum().backward()
            if call == "step":
                time.sleep(6)  # idle past --dist-timeout
                trunk_opt.step()
                remote(x).sum().backward()
            os.kill(rank1, signal.SIGSTOP)
            # gloo's timeout is a DistBackendError or a plain RuntimeError, as it happens
            lost = r"a rank of the distributed trunk failed|out of service \(a rank failed"
            with pytest.raises(ServerUnavailable, match=lost):
                trunk_opt.step() if call == "step" else remote.remote_state_dict()
            os.kill(rank1, signal.SIGCONT)
            with pytest.raises(TransportError):  # out of service, or the server going
                remote(x)
        assert process.wait(timeout=120) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGCONT)
        stop_torchrun(process)


def _server_id(address: str) -> str:
    with RemoteModule(address) as remote:
        return remote.client.info().server_id


def _parts(trunk: nn.Module) -> tuple:
    """Bottom, top and the two optimizers (SGD with momentum) around ``trunk``."""
    bottom, top = local_parts()
    client_opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], lr=0.1, momentum=0.9)
    if isinstance(trunk, RemoteModule):
        trunk_opt: Any = RemoteOptimizer(trunk, "SGD", lr=0.1, momentum=0.9)
    else:
        trunk_opt = torch.optim.SGD(trunk.parameters(), lr=0.1, momentum=0.9)
    return bottom, top, client_opt, trunk_opt


def _sgd_steps(trunk: nn.Module, steps: range, parts: tuple) -> None:
    bottom, top, client_opt, trunk_opt = parts
    for step in steps:
        x, y = batch(step)  # a batch of 5: shares of 3 and 2
        client_opt.zero_grad()
        trunk_opt.zero_grad()
        nn.functional.mse_loss(top(trunk(bottom(x))), y).backward()
        client_opt.step()
        trunk_opt.step()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_killed_rank_is_unavailable_and_torchrun_resumes_from_the_checkpoint(tmp_path, mode):
    """SIGKILL rank 1 between a forward and its backward: the next call fails UNAVAILABLE and
    torchrun stops the group; a new torchrun on the same port loads the checkpoint, the client's
    retries and context recovery finish the step, and training ends where a fault-free run
    does."""
    local = shifted_trunk()
    reference = _parts(local)
    _sgd_steps(local, range(1, 6), reference)

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    checkpoint = str(tmp_path / "trunk.ckpt")
    args = (
        "factories:shifted_trunk",
        "--parallel",
        mode,
        "--checkpoint",
        checkpoint,
        "--checkpoint-every",
        "1",
        "--address",
        f"127.0.0.1:{port}",
    )
    process, address = spawn_torchrun(*args)
    processes = [process]
    try:
        options = ClientOptions(retries=200, retry_backoff=0.2, retry_backoff_max=0.5)
        with RemoteModule(address, options=options) as remote:
            first_server = _server_id(address)
            run = _parts(remote)
            _sgd_steps(remote, range(1, 3), run)
            bottom, top, client_opt, trunk_opt = run
            x, y = batch(3)
            client_opt.zero_grad()
            trunk_opt.zero_grad()
            loss = nn.functional.mse_loss(top(remote(bottom(x))), y)
            os.kill(_rank_pid(process, 1), signal.SIGKILL)
            no_retries = ClientOptions(retries=0, connect_timeout=1.0)
            probe = RemoteModule(address, options=no_retries)
            with pytest.raises(ServerUnavailable):
                for _ in range(200):  # until the failure shows (the old rank 0, or nobody)
                    probe(torch.zeros(2, 8, dtype=torch.float64))
                    time.sleep(0.05)
            probe.close()
            assert process.wait(timeout=120) != 0  # torchrun stopped the group: a failure
            processes.append(spawn_torchrun(*args)[0])
            loss.backward()  # retried until the restarted group answers; forward recomputed
            client_opt.step()
            trunk_opt.step()
            assert _server_id(address) != first_server  # really a new group
            # torch.distributed.checkpoint's layout: the newest complete one named by "latest"
            latest = (Path(checkpoint) / "latest").read_text()
            assert (Path(checkpoint) / latest / ".metadata").is_file()
            _sgd_steps(remote, range(4, 6), run)
            trunk_state = remote.remote_state_dict()
        for name, param in local.named_parameters():
            torch.testing.assert_close(trunk_state[name], param.detach(), **TOL, msg=name)
        for mine, theirs in zip(run[:2], reference[:2], strict=True):
            for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(a, b, **TOL)
    finally:
        for started in processes:
            stop_torchrun(started)


def test_a_checkpoint_that_rank_0_cannot_write_is_skipped_and_every_rank_trains_on(tmp_path):
    """Checkpoints after every step. Rank 0 cannot make one's directory (a file is where the
    checkpoints go), then cannot publish one (``latest`` is a directory) after rank 1 wrote
    its shards. Every rank agrees each save failed: the steps still land, the group keeps
    serving, and the next step's checkpoint is written."""
    checkpoint = tmp_path / "trunk.ckpt"
    args = ("--parallel", "fsdp", "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    process, address = spawn_torchrun("factories:shifted_trunk", *args)
    local = shifted_trunk()
    reference = _parts(local)
    _sgd_steps(local, range(1, 5), reference)
    try:
        with RemoteModule(address) as remote:
            run = _parts(remote)
            _sgd_steps(remote, range(1, 2), run)
            latest = checkpoint / "latest"
            first = latest.read_text()
            checkpoint.rename(tmp_path / "aside")
            checkpoint.write_text("")  # rank 0's makedirs under it fails: NotADirectoryError
            _sgd_steps(remote, range(2, 3), run)
            checkpoint.unlink()
            (tmp_path / "aside").rename(checkpoint)
            latest.unlink()
            latest.mkdir()  # rank 0's rename onto it fails: IsADirectoryError
            _sgd_steps(remote, range(3, 4), run)
            latest.rmdir()
            _sgd_steps(remote, range(4, 5), run)
            state = remote.remote_state_dict()
        assert latest.read_text() != first and latest.read_text().startswith("v4-")
        assert (checkpoint / latest.read_text() / ".metadata").is_file()
    finally:
        stop_torchrun(process)
    for name, param in local.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), **TOL, msg=name)


def test_a_step_that_would_blow_up_a_weight_is_refused_on_every_rank(parallel):
    """The guard's verdict (max_weight_growth) is taken over every rank's shard. Only output
    features 4-7 get a gradient, and only the last layer may move: under fsdp that is rank 1's
    half of it alone, so rank 0 would accept the step on its own shard. Every rank refuses it
    with the reason and rolls back, and the session trains on as locally."""
    mode, address = parallel
    local = shifted_trunk()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    last = ["body.2.weight", "body.2.bias"]
    groups = [{"params": last, "lr": 1.0}, {"params": ["body.0.weight", "body.0.bias"], "lr": 0}]
    with _fresh(address) as remote:
        before = remote.remote_state_dict()
        optimizer = RemoteOptimizer(remote, "SGD", lr=1.0, param_groups=groups)
        (remote(x)[:, 4:].sum() * 1e6).backward()  # finite, but a 1e5-fold growth
        with pytest.raises(InvalidRequest, match="max_weight_growth"):
            optimizer.step()
        after = remote.remote_state_dict()
        for name, value in before.items():
            assert torch.equal(after[name], value), name  # every shard rolled back
        optimizer.zero_grad()
        remote(x).sum().backward()
        optimizer.step()
        state = remote.remote_state_dict()
    grads = dict(
        zip(
            dict(local.named_parameters()),
            torch.autograd.grad(local(x).sum(), list(local.parameters())),
            strict=True,
        )
    )
    with torch.no_grad():
        for name in last:
            dict(local.named_parameters())[name] -= grads[name]
    for name, param in local.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), **TOL, msg=f"{mode} {name}")


def test_ddp_sums_the_gradients_of_each_dtype_apart():
    """A trunk with float64 and float32 parameters under ddp: the ranks' gradients are summed
    in one buffer per dtype, and two SGD steps equal local training."""
    process, address = spawn_torchrun("factories:mixed_trunk", "--parallel", "ddp")
    try:
        local = mixed_trunk()
        with _fresh(address, mixed_trunk) as remote:
            optimizers = [
                RemoteOptimizer(remote, "SGD", lr=0.1),
                torch.optim.SGD(local.parameters(), lr=0.1),
            ]
            for step in range(2):
                x = torch.randn(
                    5, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64
                )
                for optimizer, trunk in zip(optimizers, (remote, local), strict=True):
                    optimizer.zero_grad()
                    trunk(x).pow(2).sum().backward()
                    optimizer.step()
            state = remote.remote_state_dict()
    finally:
        stop_torchrun(process)
    for name, param in local.named_parameters():
        assert state[name].dtype == param.dtype, name
        # float32 rounding reaches the float64 layers too: their gradients pass the float32
        # layer, whose kernels round a batch of 5 and shares of 3 and 2 apart.
        torch.testing.assert_close(state[name], param.detach(), rtol=0, atol=1e-6, msg=name)


def test_a_trunks_own_parameters_are_current_after_a_forward_without_grad():
    """fsdp, a head and a scale held by the trunk itself (FSDP2 shards them with the root):
    a forward without grad between a backward and its Step, or before a LoadState, once left
    them gathered and stale, so every later forward used the old values. Two SGD steps and a
    load equal local training."""
    process, address = spawn_torchrun("factories:headed_trunk", "--parallel", "fsdp")
    local = headed_trunk()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    try:
        with _fresh(address, headed_trunk) as remote:
            pairs = (
                (remote, RemoteOptimizer(remote, "SGD", lr=0.1)),
                (local, torch.optim.SGD(local.parameters(), lr=0.1)),
            )
            for _ in range(2):
                for trunk, optimizer in pairs:
                    trunk(x).square().sum().backward()
                    with torch.no_grad():
                        trunk(x)  # an evaluation between the backward and the step
                    optimizer.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    torch.testing.assert_close(remote(x), local(x), **TOL)
            loaded = {name: param.detach() * 0.5 for name, param in local.named_parameters()}
            with torch.no_grad():
                remote(x)
            remote.load_remote_state_dict(loaded)
            local.load_state_dict(loaded)
            with torch.no_grad():
                torch.testing.assert_close(remote(x), local(x), **TOL)
    finally:
        stop_torchrun(process)


def test_ddp_gradients_that_overflow_only_summed_over_the_ranks_are_skipped_by_grad_scaler():
    """float32 Linear(4, 2), batch 4 (shares of 2 rows), output gradients all G: the bias's
    gradient is 2G on each rank and 4G summed. One Backward with G = 1e38, and two kept
    Backwards with G = 5e37, overflow only in the ranks' sum: GradScaler skips the step (the
    trunk unchanged, the scale halved), as one process does, where the sum is one tensor (or,
    across Backwards, held plus new); then a step with finite gradients equals local SGD."""
    process, address = spawn_torchrun("factories:linear32_trunk", "--parallel", "ddp")
    single = serve(linear32_trunk())
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    try:
        for where in (single.address, address):
            for grads in ([1e38], [5e37, 5e37]):
                with _fresh(where, linear32_trunk) as remote:
                    trunk_opt = RemoteOptimizer(remote, "SGD", lr=0.1)
                    before = remote.remote_state_dict()
                    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
                    for g in grads:
                        out = remote(x)
                        scaler.scale(((out - out.detach()) * g).sum()).backward()
                    scaler.step(trunk_opt)
                    scaler.update()
                    assert scaler.get_scale() == 0.5, (where, grads)
                    after = remote.remote_state_dict()
                    for name, value in before.items():
                        assert torch.equal(after[name], value), (where, grads, name)
                    trunk_opt.zero_grad()
                    local = linear32_trunk()
                    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
                    for trunk, optimizer in ((remote, trunk_opt), (local, local_opt)):
                        trunk(x).sum().backward()
                        optimizer.step()
                    state = remote.remote_state_dict()
                    for name, param in local.named_parameters():
                        torch.testing.assert_close(state[name], param.detach(), rtol=0, atol=1e-6)
    finally:
        single.stop(grace=None)
        stop_torchrun(process)


@pytest.mark.parametrize("scale", [1e150, 1e160], ids=["huge", "overflowing"])
def test_the_norm_of_huge_gradients_is_what_it_is_locally(parallel, scale):
    """Gradients of ~1e150 have a finite norm (~1e151, far past float32); at ~1e160 the sum of
    squares overflows float64. Over the ranks (fsdp: the shards' norms combined) clipping gets
    the local total: equal, or inf where it is inf locally, not an error on one rank; and the
    ranks go on serving."""
    mode, address = parallel
    local = shifted_trunk()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (local(x).sum() * scale).backward()
    expected = clip_grad_norm_(list(local.parameters()), 1.0)
    with _fresh(address) as remote:
        (remote(x).sum() * scale).backward()
        total = clip_grad_norm_([remote], 1.0)
        if torch.isinf(expected):
            assert torch.isinf(total), f"{mode}: {total}"
        else:
            torch.testing.assert_close(total, expected, rtol=1e-12, atol=0, msg=mode)
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        optimizer.zero_grad()
        remote(x).sum().backward()
        optimizer.step()  # every rank still in step with the others
        assert remote.remote_state_dict()["body.0.weight"].isfinite().all()


def test_gradients_keep_accumulating_across_a_grad_norm_and_a_step(parallel):
    """No zero_grad between: backward, clip, backward, step, backward, step. Each rank's part
    of the sum must count once after the ranks combined it for the clip and for the step."""
    mode, address = parallel
    local = shifted_trunk()
    generator = torch.Generator().manual_seed(11)
    xs = [torch.randn(size, 8, generator=generator, dtype=torch.float64) for size in (5, 3, 1)]
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.5)
    with _fresh(address) as remote:
        remote_opt = RemoteOptimizer(remote, "SGD", lr=0.1, momentum=0.5)
        for trunk, optimizer, clip in (
            (remote, remote_opt, [remote]),
            (local, local_opt, list(local.parameters())),
        ):
            optimizer.zero_grad()
            trunk(xs[0]).pow(2).sum().backward()
            clip_grad_norm_(clip, 0.5)
            trunk(xs[1]).sum().backward()
            optimizer.step()
            trunk(xs[2]).pow(3).sum().backward()
            optimizer.step()
        state = remote.remote_state_dict()
    for name, param in local.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), **TOL, msg=f"{mode} {name}")


def test_two_nodes_serve_one_trunk(single_address):
    """``--nnodes 2`` with a static rendezvous, both "nodes" on this host (one rank each):
    rank 0's node is the front door, and training through it equals local training."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = ("--nnodes=2", "--master-addr=127.0.0.1", f"--master-port={port}")
    args = ("factories:shifted_trunk", "--parallel", "fsdp")
    second = start_torchrun(*args, nproc=1, launch=(*launch, "--node-rank=1"))
    processes = [second]
    try:
        first, address = spawn_torchrun(*args, nproc=1, launch=(*launch, "--node-rank=0"))
        processes.append(first)
        with RemoteModule(address) as remote:
            assert remote.client.info().world_size == 2
        _check_training(("fsdp", address), single_address, shifted_trunk, torch.float64, TOL)
    finally:
        for process in reversed(processes):  # rank 0's node first: it tells rank 1 to stop
            stop_torchrun(process)


def test_a_graceful_stop_saves_a_checkpoint_that_other_layouts_load(tmp_path):
    """SIGTERM to torchrun: rank 0 saves a last checkpoint with every rank (they wait for its
    word). Saved by 2 fsdp ranks, it loads into 1 fsdp rank, and that one's into 2 ddp ranks
    (DCP reshards): the weights and the session's Adam state go on as in one process."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    checkpoint = str(tmp_path / "ckpt")
    generator = torch.Generator().manual_seed(21)
    xs = [torch.randn(5, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    local = shifted_trunk()
    local_opt = torch.optim.Adam(local.parameters(), lr=0.01)

    def step(trunk: nn.Module, optimizer: Any, x: torch.Tensor) -> None:
        optimizer.zero_grad()
        trunk(x).pow(2).sum().backward()
        optimizer.step()

    remote = optimizer = None
    for x, (mode, nproc) in zip(xs, (("fsdp", 2), ("fsdp", 1), ("ddp", 2)), strict=True):
        process, address = spawn_torchrun(
            "factories:shifted_trunk",
            *("--parallel", mode, "--checkpoint", checkpoint, "--address", f"127.0.0.1:{port}"),
            nproc=nproc,
        )
        try:
            if remote is None:  # one client and one session throughout
                remote = RemoteModule(address, options=ClientOptions(retries=20))
                optimizer = RemoteOptimizer(remote, "Adam", lr=0.01)
            with RemoteModule(address) as probe:
                assert probe.client.info().parallel == mode
            step(remote, optimizer, x)
            state = remote.remote_state_dict()
        finally:
            stop_torchrun(process)  # a graceful stop: the checkpoint is written now
        assert (Path(checkpoint) / "latest").is_file()
        step(local, local_opt, x)
        for name, param in local.named_parameters():
            torch.testing.assert_close(state[name], param.detach(), **TOL, msg=f"{mode} {name}")
    assert remote is not None
    remote.close()


@pytest.fixture(scope="module")
def awkward_fsdp() -> Iterator[str]:
    """2 fsdp ranks serving awkward_trunk, every kept forward recomputed at its Backward."""
    process, address = spawn_torchrun(
        "factories:awkward_trunk", "--parallel", "fsdp", "--recompute"
    )
    yield address
    stop_torchrun(process)


def test_a_batch_smaller_than_the_world_and_an_output_left_out(awkward_fsdp):
    """A batch of 1 on 2 fsdp ranks: rank 1 computes on a stand-in sample (the trunk's
    ``view(batch, -1)`` cannot take a batch of 0) and back-propagates zeros from the outputs
    rank 0 back-propagates from, here the first alone."""
    local = awkward_trunk().eval()
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x.requires_grad_(True)
    with RemoteModule(awkward_fsdp) as remote:
        remote.eval()
        h, y = remote(x)
        expected_h, expected_y = local(x)
        torch.testing.assert_close(h, expected_h, **TOL)
        torch.testing.assert_close(y, expected_y, **TOL)
        (grad,) = torch.autograd.grad(h.pow(2).sum(), x)
        (expected,) = torch.autograd.grad(expected_h.pow(2).sum(), x)
        torch.testing.assert_close(grad, expected, **TOL)
        with torch.no_grad():  # and the ranks go on
            torch.testing.assert_close(remote(x)[1], local(x)[1], **TOL)


def test_every_rank_keeps_its_buffers_through_refusals_and_recomputes(awkward_fsdp):
    """BatchNorm's running statistics, each rank's from its share: a training forward that
    would make them infinite is refused with every rank's put back, and a recomputed forward
    (--recompute) moves them once, as a local run of each share does."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(4, 4, generator=generator, dtype=torch.float64)  # shares of 2 and 2
    probe = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    with RemoteModule(awkward_fsdp) as remote:
        with pytest.raises(InvalidRequest, match="non-finite"):
            remote(x * 1e200)
        h, y = remote(x)  # a training forward, recomputed at its Backward
        (h.sum() + y.sum()).backward()
        remote.eval()
        with torch.no_grad():
            served = remote(probe)[1]
    ranks = [awkward_trunk(), awkward_trunk()]  # each rank's trunk, trained on its share
    for trunk, share in zip(ranks, (x[:2], x[2:]), strict=True):
        trunk(share)
        trunk.eval()
    expected = torch.cat([ranks[0](probe[:2])[1], ranks[1](probe[2:])[1]]).detach()
    torch.testing.assert_close(served, expected, **TOL)


@pytest.fixture(scope="module")
def narrow_fsdp() -> Iterator[str]:
    """2 fsdp ranks serving narrow_slow_trunk (rank 1 holds empty shards; a forward takes
    0.3 s), taking inputs of up to 20 dimensions; a collective that one rank never joins fails
    in 20 s, not 600."""
    process, address = spawn_torchrun(
        "factories:narrow_slow_trunk",
        *("--parallel", "fsdp", "--dist-timeout", "20", "--max-ndim", "20"),
    )
    yield address
    stop_torchrun(process)


def test_clients_that_give_up_leave_a_sharded_trunk_serving(narrow_fsdp):
    """A client whose deadline passes in the middle of an fsdp forward, one whose deadline
    passes while it waits for the trunk, and one whose deadline passes in a backward that
    runs a checkpointed layer again: rank 0 alone may not stop between layers (the other
    rank would wait in the next collective), so each call stops before the ranks start or
    runs to its end. Another client is then served as if nothing happened."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    impatient = ClientOptions(timeout=0.15, retries=0)
    with RemoteModule(narrow_fsdp, options=impatient) as remote:
        remote.client.info()  # connected: the deadline is the forward's alone
        with pytest.raises(DeadlineExceeded):
            remote(x)  # mid-forward
    with (
        RemoteModule(narrow_fsdp) as holder,
        RemoteModule(narrow_fsdp, options=impatient) as remote,
    ):
        remote.client.info()
        holder.client.info()
        busy = threading.Thread(target=lambda: holder(x))
        busy.start()
        time.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            remote(x)  # waiting for the trunk (or, on a slow machine, mid-forward again)
        busy.join()
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        y = remote(x.clone().requires_grad_())
        remote.client.options = impatient  # the Backward's deadline passes mid-backward,
        with pytest.raises(DeadlineExceeded):  # in the checkpointed layer's recompute
            y.sum().backward()
    local = narrow_slow_trunk()
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        xr = x.clone().requires_grad_()
        xl = x.clone().requires_grad_()
        remote(xr).sum().backward()
        local(xl).sum().backward()
        torch.testing.assert_close(xr.grad, xl.grad, **TOL)


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf, -1.0, 2.0])
def test_gradient_norms_over_empty_shards_are_the_local_ones(narrow_fsdp, norm_type):
    """Rank 1's shards of a [1, 8] weight and a [1] bias are empty; torch refuses the
    inf-norm of an empty tensor. The total norm of every order is still the local one, and
    the ranks go on serving."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    local = narrow_slow_trunk()
    local(x).sum().backward()
    grads = [p.grad for p in local.parameters()]
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type
    )
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        remote(x).sum().backward()
        total = clip_grad_norm_([remote], 1e9, norm_type=norm_type)  # no clipping
        torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
        assert remote(x).shape == (4, 1)


def test_what_rank_0_accepts_every_rank_reads(narrow_fsdp):
    """The server takes 17-dimensional inputs (--max-ndim 20): the other ranks read their
    shares too (their own frames once had a fixed limit of 16, and one unreadable command
    ended the group). The reply is refused by this client's own limit (16), and the ranks
    go on in step."""
    x = torch.randn(2, *[1] * 15, 4, generator=torch.Generator().manual_seed(3))
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        with pytest.raises(CodecError, match="max_ndim=16"), torch.no_grad():
            remote(x.double())
        ordinary = torch.randn(4, 4, generator=torch.Generator().manual_seed(4)).double()
        with torch.no_grad():
            torch.testing.assert_close(remote(ordinary), narrow_slow_trunk()(ordinary), **TOL)


@pytest.mark.parametrize("name", ["Adafactor", "Rprop", "SGD", "Adagrad"])
def test_optimizers_that_cannot_step_shards_are_refused_when_configured(narrow_fsdp, name):
    """Their step (SGD's and Adagrad's fused one) fails on FSDP2's sharded parameters, every
    time: refused at once, by name, not accepted and then refused at every Step. The session
    then takes another (not stepped: the other tests of this server compare with its initial
    weights)."""
    fused = {"fused": True} if name in ("SGD", "Adagrad") else {}
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        with pytest.raises(InvalidRequest, match=f"{name}.* cannot step a trunk sharded"):
            RemoteOptimizer(remote, name, lr=0.01, **fused)
        optimizer = RemoteOptimizer(remote, "AdamW", lr=0.01)
        assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.01


def test_an_optimizer_state_saved_with_other_ids_is_sharded_by_group_order(narrow_fsdp):
    """The trunk's part of a whole model's optimizer state names its parameters 2..5; torch
    maps ids by their order in the groups. Under fsdp each tensor must become this rank's
    shard of it, or every later Step fails. SGD with lr 0: the momentum moves, the weights
    (which the other tests of this server compare with) do not."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bottom, trunk = nn.Linear(4, 4).double(), narrow_slow_trunk()
    whole = torch.optim.SGD([*bottom.parameters(), *trunk.parameters()], lr=0.0, momentum=0.9)
    trunk(bottom(x)).sum().backward()
    whole.step()
    saved = whole.state_dict()
    part = {
        "state": {i: saved["state"][i] for i in range(2, 6)},
        "param_groups": [{**saved["param_groups"][0], "params": [2, 3, 4, 5]}],
    }
    local = narrow_slow_trunk()
    expected = torch.optim.SGD(local.parameters(), lr=0.0, momentum=0.9)
    expected.load_state_dict(
        {
            "state": {i - 2: copy.deepcopy(v) for i, v in part["state"].items()},  # stepped
            "param_groups": [{**saved["param_groups"][0], "params": [0, 1, 2, 3]}],
        }
    )
    local(x).sum().backward()
    expected.step()
    with RemoteModule(narrow_fsdp, options=ClientOptions(timeout=60, retries=0)) as remote:
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.0, momentum=0.9)
        optimizer.load_state_dict(part)
        remote(x).sum().backward()
        optimizer.step()
        state = optimizer.state_dict()["state"]
        for index, param_state in expected.state_dict()["state"].items():
            torch.testing.assert_close(
                state[index]["momentum_buffer"], param_state["momentum_buffer"], **TOL
            )


@pytest.mark.parametrize("norm_type", [1.0, 2.0])
def test_norms_of_a_sharded_bfloat16_layer_are_rounded_once(norm_type):
    """fsdp: each rank took its shard's norm of a bfloat16 gradient in bfloat16, and the
    client rounded the ranks' combination to bfloat16 again: one unit off torch (33.61 for
    33.64), and the float32 weights clipped by another coefficient. One sample, so the
    gradients are torch's bit for bit; the total norm is then torch's within float32's
    rounding (a float32 norm of shards is not the whole's to the last bit)."""
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(5))
    local = bf16_middle_trunk()
    local(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(local.parameters(), 1e9, norm_type=norm_type)
    process, address = spawn_torchrun("factories:bf16_middle_trunk", "--parallel", "fsdp")
    try:
        with RemoteModule(address, options=ClientOptions(timeout=60, retries=0)) as remote:
            remote(x).square().sum().backward()
            total = clip_grad_norm_([remote], 1e9, norm_type=norm_type)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    finally:
        stop_torchrun(process)
