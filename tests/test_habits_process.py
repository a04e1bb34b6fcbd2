"""A client's life on the server: close() and process exit end its session."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from conftest import ROOT
from models import mlp_parts
from polling import wait_for

from remote_autograd import RemoteModule, RemoteOptimizer, ServerOptions


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
