"""Shared fixtures: real trunk servers on 127.0.0.1:0, in this process or a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from remote_autograd import ServerOptions, TrunkServer, serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def start_server() -> Iterator[Callable[..., TrunkServer]]:
    """Start trunk servers in this process; all are stopped at the end of the test."""
    servers: list[TrunkServer] = []

    def start(module: torch.nn.Module, options: ServerOptions | None = None) -> TrunkServer:
        server = serve(module, "127.0.0.1:0", options=options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=None)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child server: this repository and tests/ importable."""
    # The caller's PYTHONPATH last: it may hold the dependencies (--target installs).
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), **extra)


def serving_address(process: subprocess.Popen, timeout: float) -> str | None:
    """The address a child server prints once it serves, or None if it exits or ``timeout``
    seconds pass first."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "serving" in line:
            return line.rsplit(" ", 1)[-1].strip()
        if process.poll() is not None:
            break
    return None


def spawn_server(factory: str, *extra: str, port: int = 0) -> tuple[subprocess.Popen, str]:
    """Run ``remote-autograd serve --module factory`` in a child process; return it and its
    address once it prints that it is serving."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "remote_autograd.cli",
            "serve",
            "--module",
            factory,
            "--address",
            f"127.0.0.1:{port}",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    address = serving_address(process, 60)
    if address is not None:
        return process, address
    process.kill()
    raise RuntimeError(f"server did not start: {process.stderr.read() if process.stderr else ''}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (a server under test), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
