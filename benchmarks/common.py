"""Shared benchmark helpers: server processes, timing, JSON, rate-limited links, the docs page.

Every benchmark runs its servers in child processes (``python -m benchmarks.servers ...``) and
its clients in the benchmark's own process, so each side has its own interpreter and GIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_PAGE = DOCS / "benchmarks.md"
MiB = 1 << 20


# -- processes ----------------------------------------------------------------------------


class ServerProcess:
    """A ``python -m module kind ...`` child (``benchmarks.servers`` by default); ``address`` is
    what it printed after ``ready``. With ``wait=False`` the constructor returns at once and
    :meth:`wait_ready` waits: several servers then start side by side."""

    def __init__(
        self,
        kind: str,
        *args: str,
        netns: str | None = None,
        env: dict[str, str] | None = None,
        module: str = "benchmarks.servers",
        timeout: float = 60,
        wait: bool = True,
    ):
        env = dict(os.environ, PYTHONPATH=python_path(), **(env or {}))
        cmd = [sys.executable, "-m", module, kind, *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.kind, self.timeout = kind, timeout
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Return once the server printed its address (``timeout`` seconds from now)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.startswith("ready "):
                self.address = line.split()[1]
                return
            if not line and self.process.poll() is not None:
                break
        self.stop()
        err = self.process.stderr.read() if self.process.stderr else ""
        raise RuntimeError(f"server {self.kind} did not start: {err[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_path() -> str:
    """PYTHONPATH for a child: the repository, then the caller's own, which may hold the
    dependencies (a ``pip install --target`` folder, as on the GPU machine)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


# -- timing -------------------------------------------------------------------------------


def measure(fn: Callable[[], Any], *, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def reps_for(nbytes: int, base: int) -> int:
    """Fewer repetitions for big payloads so a full run stays within minutes."""
    if nbytes >= 128 * MiB:
        return max(3, base // 8)
    if nbytes >= 16 * MiB:
        return max(3, base // 4)
    if nbytes >= MiB:
        return max(3, base // 2)
    return base


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def write_json(path: str | None, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False)
    if path:
        Path(path).write_text(text + "\n")
    else:
        print(text)


# -- the docs page ------------------------------------------------------------------------


def update_doc(section: str, markdown: str, page: Path = DOC_PAGE) -> None:
    """Replace the text between ``<!-- begin:section -->`` and ``<!-- end:section -->``."""
    begin, end = f"<!-- begin:{section} -->", f"<!-- end:{section} -->"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def save_plot(fig: Any, ax: Any, path: Path | str, *, title: str, legend_size: int) -> None:
    """Title, legend and grid the way every benchmark plot has them; write the PNG; close."""
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- rate-limited links -------------------------------------------------------------------


def _sh(*cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, check=check, capture_output=True)


class Link(NamedTuple):
    netns: str  # run servers here (ServerProcess(netns=...))
    client_ip: str
    server_ip: str  # connect to this
    client_if: str
    server_if: str


@contextlib.contextmanager
def rate_limited_link(rate: str, *, index: int | None = None) -> Iterator[Link]:
    """A veth pair into a fresh network namespace, each direction shaped by a ``tbf`` qdisc.

    Needs root. Everything is removed on exit, also on error. ``index`` (default: from the
    process id) keeps concurrent runs apart; addresses are 10.213.<index>.1 and .2.
    """
    index = index if index is not None else 16 + os.getpid() % 200
    ns, host_if, peer_if = f"ra_bench{index}", f"rab{index}a", f"rab{index}b"
    client_ip, server_ip = f"10.213.{index}.1", f"10.213.{index}.2"
    # tbf needs a burst of at least rate/HZ; 32 kbit is enough up to ~1 Gbit/s at HZ=1000,
    # larger rates get a proportionally larger bucket.
    bits = _rate_bits(rate)
    burst = f"{max(32_000, bits // 250) // 8}b"
    shape = ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]
    _sh("ip", "netns", "del", ns, check=False)
    _sh("ip", "link", "del", host_if, check=False)
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _sh("ip", "link", "set", peer_if, "netns", ns)
        _sh("ip", "addr", "add", f"{client_ip}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{server_ip}/24", "dev", peer_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("tc", "qdisc", "add", "dev", host_if, "root", *shape)
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", peer_if, "root", *shape)
        yield Link(ns, client_ip, server_ip, host_if, peer_if)
    finally:
        _sh("ip", "link", "del", host_if, check=False)
        _sh("ip", "netns", "del", ns, check=False)


def _rate_bits(rate: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not match:
        raise ValueError(f"rate must look like 100mbit or 1gbit, got {rate!r}")
    return int(float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]])
