"""The public surface: exported names, generated protocol code, PyTorch-like behaviour."""

from __future__ import annotations

import filecmp
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import remote_autograd
from remote_autograd import RemoteModule, RemoteOptimizer

ROOT = Path(__file__).resolve().parent.parent


def test_exported_members():
    exported = set(remote_autograd.__all__)
    public = {name for name in vars(remote_autograd) if not name.startswith("_")}
    modules = {m.name for m in pkgutil.iter_modules(remote_autograd.__path__)}
    assert public - modules == exported
    for name in exported:
        assert getattr(remote_autograd, name).__module__.startswith("remote_autograd")
    for module in modules - {"_proto", "hf"}:
        loaded = importlib.import_module(f"remote_autograd.{module}")
        assert hasattr(loaded, "__all__"), f"remote_autograd.{module} declares no __all__"
    for name in ("RemoteModule", "RemoteOptimizer", "serve"):
        assert name in exported


def test_generated_protocol_code_is_current(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "remote_autograd" / "_proto"
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/gen_protos.py: {mismatch}"


def test_remote_optimizer_quacks_like_a_torch_optimizer(start_server):
    remote = RemoteModule(start_server(nn.Linear(2, 2)).address)
    optimizer = RemoteOptimizer(remote, torch.optim.AdamW, lr=1e-3, betas=(0.8, 0.9))
    assert isinstance(optimizer, torch.optim.Optimizer)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.01
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    remote(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    assert group["lr"] == 5e-4
    state = optimizer.state_dict()
    assert state["remote_step"] == 1 and state["param_groups"][0]["lr"] == 5e-4
    assert {k for k in state["state"][0]} == {"step", "exp_avg", "exp_avg_sq"}
    assert "AdamW" in repr(optimizer)
    # state_dict() lays this side's groups over the server's: read the server's own instead.
    assert _server_group(remote)["lr"] == 1e-3  # the scheduled lr travels with the next step
    remote(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    assert _server_group(remote)["lr"] == 5e-4
    assert _server_group(remote)["betas"] == (0.8, 0.9)


def _server_group(remote: RemoteModule) -> dict:
    """The first param group of the session's optimizer, as GetState returns it from the
    server (no client-side copy involved)."""
    state = remote.client.get_state(parameters=False, optimizer=True)
    return state["optimizer"]["param_groups"][0]


def test_scheduled_learning_rates_reach_the_server_weights(start_server):
    """Weights after AdamW steps with a LambdaLR schedule equal those of the same schedule
    run locally: the lr the server used at each step is the scheduled one."""
    torch.manual_seed(0)
    trunk = nn.Linear(2, 2).double()
    local = nn.Linear(2, 2).double()
    local.load_state_dict(trunk.state_dict())
    remote = RemoteModule(start_server(trunk).address)
    optimizer = RemoteOptimizer(remote, torch.optim.AdamW, lr=0.1)
    local_optimizer = torch.optim.AdamW(local.parameters(), lr=0.1)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (step + 1))
        for o in (optimizer, local_optimizer)
    ]
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        local_optimizer.zero_grad()
        remote(x).square().sum().backward()
        local(x).square().sum().backward()
        optimizer.step()
        local_optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    assert _server_group(remote)["lr"] == 0.1 / 3  # the lr of the third step
    for name, value in remote.remote_state_dict().items():
        assert torch.equal(value, dict(local.named_parameters())[name].detach()), name


def test_optimizer_state_round_trips_through_the_server(start_server):
    remote = RemoteModule(start_server(nn.Linear(2, 2)).address)
    optimizer = RemoteOptimizer(remote, torch.optim.AdamW, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        remote(torch.randn(3, 2)).sum().backward()
        optimizer.step()
    saved, weights = optimizer.state_dict(), remote.remote_state_dict()

    other = RemoteModule(start_server(nn.Linear(2, 2)).address)
    restored = RemoteOptimizer(other, torch.optim.AdamW, lr=1e-2)
    other.load_remote_state_dict(weights)
    restored.load_state_dict(saved)
    again = restored.state_dict()
    assert again["remote_step"] == 2
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(again["state"][1][key], saved["state"][1][key])
    for name, tensor in other.remote_state_dict().items():
        assert torch.equal(tensor, weights[name])
