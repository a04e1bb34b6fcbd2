"""Run every benchmark: ``python -m benchmarks.run_all --preset smoke|full [--links]``.

``full`` writes JSON into ``--out`` and updates docs/benchmarks.md and its plots; ``--links``
adds the runs over 1 Gbit/s and 100 Mbit/s veth links shaped with tbf (root only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT


def runs(preset: str, links: bool) -> list[tuple[str, list[str]]]:
    doc = ["--doc"] if preset == "full" else []
    out = [
        ("transfer", ["benchmarks.bench_transfer", "--preset", preset, *doc]),
        ("step", ["benchmarks.bench_step", "--preset", preset, *doc]),
        ("adapters", ["benchmarks.bench_adapters", "--preset", preset, *doc]),
    ]
    if links:
        link_preset = "link" if preset == "full" else "smoke"
        for rate in ("1gbit", "100mbit"):
            out.append(
                (
                    f"transfer_{rate}",
                    ["benchmarks.bench_transfer", "--preset", link_preset, "--link", rate, *doc],
                )
            )
        out.append(
            (
                "step_100mbit",
                ["benchmarks.bench_step", "--preset", preset, "--link", "100mbit", *doc],
            )
        )
        if preset == "full":  # a step that is mostly wire, as with a GPU trunk
            out.append(
                (
                    "step_wire_100mbit",
                    ["benchmarks.bench_step", "--preset", "wire", "--link", "100mbit", *doc],
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["smoke", "full"], default="smoke")
    parser.add_argument("--links", action="store_true", help="also over shaped links (root)")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, cmd in runs(args.preset, args.links):
        start = time.monotonic()
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        code = subprocess.call(
            [sys.executable, "-m", *cmd, "--json", str(out / f"{name}.json")], cwd=ROOT
        )
        print(f"== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
