"""A client's life on the server: close() and process exit end its session."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
from conftest import ROOT, child_env
from models import mlp_parts
from polling import wait_for

from remote_autograd import (
    ClientOptions,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    SteppedTrunkWarning,
)

# Clients here train one server's trunk in turn: starting from the weights an earlier client
# left is the point, not a mistake (SteppedTrunkWarning).
pytestmark = pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")


def _train_once(module: RemoteModule) -> None:
    x = torch.randn(2, 12, dtype=torch.float64)
    module(x).sum().backward()


def test_closed_clients_do_not_exhaust_max_sessions(start_server):
    server = start_server(mlp_parts(torch.float64)[1], ServerOptions(max_sessions=4))
    for _ in range(100):
        module = RemoteModule(server.address)
        optimizer = RemoteOptimizer(module, torch.optim.SGD, lr=0.1)
        _train_once(module)
        optimizer.step()
        assert server.stats()["sessions"] == 1
        module.close()
        assert server.stats()["sessions"] == 0
    assert server.stats()["contexts"] == 0


def test_process_exit_ends_the_session(start_server):
    server = start_server(mlp_parts(torch.float64)[1], ServerOptions(max_sessions=4))
    script = textwrap.dedent(
        f"""
        import sys, torch
        from remote_autograd import RemoteModule
        module = RemoteModule({server.address!r})
        module(torch.randn(2, 12, dtype=torch.float64, requires_grad=True))  # a context kept
        print("ready", flush=True)
        sys.stdin.readline()  # exits normally, without close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    assert server.stats()["sessions"] == 1
    assert server.stats()["contexts"] == 1
    child.stdin.write("\n")
    child.stdin.close()
    assert child.wait(timeout=120) == 0
    child.stdout.close()
    wait_for(lambda: server.stats()["sessions"] == 0)
    assert server.stats()["contexts"] == 0


def test_deepcopy_opens_a_new_session_on_the_same_server(start_server):
    server = start_server(mlp_parts(torch.float64)[1])
    bottom, _, top = mlp_parts(torch.float64)
    model = torch.nn.Sequential(bottom, RemoteModule(server.address), top)
    x = torch.randn(3, 6, dtype=torch.float64)
    copied = copy.deepcopy(model)
    assert copied[1].client.session_id != model[1].client.session_id
    assert copied[1].address == model[1].address
    torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    copied(x).sum().backward()  # the copy trains: its own graph, its own session
    assert copied[0][0].weight.grad is not None and model[0][0].weight.grad is None
    assert server.stats()["sessions"] == 2
    copied[1].close()
    model[1].close()


@pytest.mark.parametrize("evaluate", ["no_grad", "eval_with_grad", "pickled"])
def test_dropped_copies_end_their_sessions(start_server, evaluate):
    """Copy the model, evaluate the copy, drop it, every epoch: a dropped local copy frees
    everything, and a dropped copy of a split model ends its session (more epochs than
    max_sessions allows), its release thread with it, as soon as it is dropped: the garbage
    collector is off (a client's bound methods, held by its frame exchange, made a cycle that
    only a collection freed). The model itself trains on."""
    server = start_server(mlp_parts(torch.float64)[1], ServerOptions(max_sessions=3))
    bottom, _, top = mlp_parts(torch.float64)
    model = torch.nn.Sequential(bottom, RemoteModule(server.address), top)
    x = torch.randn(3, 6, dtype=torch.float64)
    model(x).sum().backward()
    expected = model(x).detach()
    # Release threads of other tests' clients (freed by the collector some time) are not ours.
    others = {t for t in threading.enumerate() if t.name == "ra-release"}
    gc.collect()
    gc.disable()
    try:
        for _ in range(6):
            if evaluate == "pickled":
                snapshot = pickle.loads(pickle.dumps(model))
            else:
                snapshot = copy.deepcopy(model)
            if evaluate == "eval_with_grad":  # in eval mode, but a graph (and a kept context)
                snapshot.eval()
                assert torch.equal(snapshot(x).detach(), expected)
            else:
                with torch.no_grad():
                    assert torch.equal(snapshot(x), expected)
            del snapshot
            wait_for(lambda: server.stats()["sessions"] == 1)
    finally:
        gc.enable()
    releasers = [t for t in threading.enumerate() if t.name == "ra-release" and t not in others]
    wait_for(lambda: sum(t.is_alive() for t in releasers) <= 1)  # the model's own, if any
    model(x).sum().backward()  # the model's session is intact
    assert server.stats()["sessions"] == 1
    model[1].close()


def test_torch_save_and_load_a_model_holding_a_remote_module(start_server, tmp_path):
    server = start_server(mlp_parts(torch.float64)[1])
    bottom, _, top = mlp_parts(torch.float64)
    options = ClientOptions(timeout=42.0, seed=7)
    model = torch.nn.Sequential(bottom, RemoteModule(server.address, options=options), top)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded[1].options == options
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    # map_location moved the GradScaler stand-in with the rest (it must stay on the CPU):
    # the first backward then failed after the server had added the trunk's gradients.
    meta = torch.load(tmp_path / "model.pt", weights_only=False, map_location="meta")
    meta.to_empty(device="cpu")
    meta.load_state_dict(model.state_dict())
    meta(x).sum().backward()
    assert all(p.grad is not None for p in meta[0].parameters())
    for m in (model, loaded, restored, meta):
        m[1].close()


def test_averaged_model_of_a_model_holding_a_remote_module(start_server):
    server = start_server(mlp_parts(torch.float64)[1])
    bottom, _, top = mlp_parts(torch.float64)
    model = torch.nn.Sequential(bottom, RemoteModule(server.address), top)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(averaged(x), model(x), rtol=0, atol=0)
    averaged.update_parameters(model)  # the local parts average; the trunk is the server's
    torch.testing.assert_close(averaged(x), model(x), rtol=0, atol=0)
    averaged.module[1].close()
    model[1].close()


def test_data_parallel_clients_are_told_the_trunk_steps_once_per_process(start_server, tmp_path):
    """Two torchrun processes, each a client of one trunk (DistributedDataParallel over the
    local parts would look like this): each process's RemoteOptimizer steps the trunk with its
    own gradients, so each warns, naming the world size."""
    server = start_server(mlp_parts(torch.float64)[1])
    script = tmp_path / "ddp_client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import warnings
            import torch.distributed as dist
            from remote_autograd import RemoteModule, RemoteOptimizer
            dist.init_process_group("gloo")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with RemoteModule({server.address!r}) as module:
                    RemoteOptimizer(module, "SGD", lr=0.1)
            texts = [str(w.message) for w in caught]
            print("warned" if any("runs 2 processes" in t for t in texts) else texts, flush=True)
            dist.destroy_process_group()
            """
        )
    )
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + [str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**child_env(OMP_NUM_THREADS="1")},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    # Two processes print to one pipe: their lines may interleave ("warnedwarned\n\n").
    assert completed.stdout.count("warned") == 2 and "[" not in completed.stdout, completed.stdout


def test_a_copy_made_after_training_continues_the_run_without_a_warning(start_server):
    """An EMA made mid-run (AveragedModel deep-copies the model after some steps) continues
    that run: the trunk's steps are its original's, and the copy is not warned as a fresh run
    that finds a stepped trunk (SteppedTrunkWarning), which told users to restart the server.
    A copy of a module that never trained still is."""
    server = start_server(mlp_parts(torch.float64)[1])
    bottom, _, top = mlp_parts(torch.float64)
    fresh = torch.nn.Sequential(bottom, RemoteModule(server.address), top)
    unused = copy.deepcopy(fresh)  # before anything ran
    optimizer = RemoteOptimizer(fresh[1], "SGD", lr=0.1)
    x = torch.randn(3, 6, dtype=torch.float64)
    fresh(x).sum().backward()
    optimizer.step()
    averaged = torch.optim.swa_utils.AveragedModel(fresh)
    restored = pickle.loads(pickle.dumps(fresh))
    caught = []
    for model in (averaged, restored, unused):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model(x).sum().backward()  # a training forward of the copy
        caught.append([str(w.message) for w in seen if w.category is SteppedTrunkWarning])
    assert caught[:2] == [[], []]
    assert len(caught[2]) == 1 and "weights version 1" in caught[2][0]
    for model in (fresh, averaged.module, restored, unused):
        model[1].close()
