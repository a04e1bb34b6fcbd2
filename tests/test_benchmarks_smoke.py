"""Each benchmark script runs end to end with ``--preset smoke`` and writes valid JSON.

No timing assertions: the numbers live in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_script(module: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{module.rsplit('.', 1)[-1]}.json"
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]  # the caller's may hold the dependencies
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    completed = subprocess.run(
        [sys.executable, "-m", module, "--preset", "smoke", "--json", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


def test_transfer_smoke(tmp_path: Path) -> None:
    data = run_script("benchmarks.bench_transfer", tmp_path)
    assert data["benchmark"] == "transfer"
    for row in data["baselines"].values():
        assert set(row) == {"tcp", "grpc_unary", "grpc_stream", "torch_rpc"}
        assert all(v["s"] > 0 and v["MBps"] > 0 for v in row.values())
    for by_size in data["remote_autograd"].values():
        for result in by_size.values():
            assert result["backward_s"] > 0 and result["compute_s"] > 0
            assert result["wire_bytes_per_roundtrip"] > 0
    assert data["ratios"]


def test_native_echo_smoke(tmp_path: Path) -> None:
    """The C echo (benchmarks/native_echo.c) is built, echoes, and is measured beside TCP; or,
    without a compiler or OpenSSL's headers, the run says why it is left out."""
    data = run_script(
        "benchmarks.bench_transfer", tmp_path, "--baselines", "tcp,native", "--codecs", "none"
    )
    buildable = shutil.which("cc") and Path("/usr/include/openssl/ssl.h").exists()
    for row in data["baselines"].values():
        assert "tcp" in row
        if buildable:
            assert row["native"]["s"] > 0 and row["native"]["MBps"] > 0
        else:
            assert "native" in row or data["native_skipped"]
    if buildable:
        for by_size in data["ratios"]["none"].values():
            assert by_size["backward_vs_native"] > 0


def test_step_smoke(tmp_path: Path) -> None:
    data = run_script("benchmarks.bench_step", tmp_path, "--micro-batches", "2")
    assert data["benchmark"] == "step"
    assert data["monolithic"]["step_s"] > 0
    runs = [*data["split"].values(), *data["sliced"].values()]
    for result in runs:
        assert result["step_s"] > 0
        assert len(result["losses"]) == len(data["monolithic"]["losses"])
    # The split run computes what the monolithic one does: float32 on the wire is the same
    # arithmetic (last-bit differences at most), bf16 rounds activations and gradients. The
    # sliced run (micro_batches=2) is the same model on halves of each batch.
    bounds = {"none": 1e-5, "bf16": 1e-3}
    assert set(data["split"]) == set(data["sliced"]) == set(bounds)
    for codec, result in data["sliced"].items():
        torch.testing.assert_close(
            result["losses"], data["monolithic"]["losses"], rtol=bounds[codec], atol=0
        )
        assert data["ratios"][f"{codec}, sliced"]["step_vs_sequential"] > 0
    for codec, result in data["split"].items():
        torch.testing.assert_close(
            result["losses"], data["monolithic"]["losses"], rtol=bounds[codec], atol=0
        )
        assert {"client_s", "server_compute_s", "server_codec_s", "wire_and_rest_s"} <= set(
            result["breakdown"]
        )
    assert data["ratios"]


def test_adapters_smoke(tmp_path: Path) -> None:
    data = run_script("benchmarks.bench_adapters", tmp_path)
    assert data["benchmark"] == "adapters"
    shared, separate = data["per_client_server"], data["separate_servers"]
    for result in (shared, separate):
        assert result["rss_per_client_bytes"] > 0 and result["tokens_per_s"] > 0
    assert shared["tokens_per_s_one_client_at_a_time"] > 0
    assert set(data["ratios"]) == {
        "memory_per_client_separate_over_shared",
        "tokens_per_s_shared_over_separate",
        "tokens_per_s_concurrent_over_serialised",
    }


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the rate-limited link needs root, ip and tc",
)
def test_transfer_over_shaped_link_smoke(tmp_path: Path) -> None:
    data = run_script(
        "benchmarks.bench_transfer",
        tmp_path,
        "--link",
        "1gbit",
        "--sizes",
        "65536",
        "--codecs",
        "auto",
    )
    assert data["link"] == "1gbit"
    assert data["remote_autograd"]["auto"]["65536"]["backward_s"] > 0


def test_pipeline_smoke(tmp_path: Path) -> None:
    data = run_script("benchmarks.bench_pipeline", tmp_path, "--overlap-step")
    assert data["benchmark"] == "pipeline"
    overlapped = ("sequential, overlapped step", "pipelined, overlapped step")
    for name in ("monolithic", "sequential", "pipelined", "pipelined, split backward", *overlapped):
        assert data[name]["step_s"] > 0
        assert len(data[name]["losses"]) == data["preset"]["steps"]
    # Stepping the trunk beside the client changes no number.
    assert data["ratios"]["losses_equal_overlapped_vs_plain"] is True
    for name in ("sequential", "pipelined"):
        assert data[name]["trunk_busy_s"] > 0
        assert data[name]["trunk_idle_fraction"] < 1
    # The pipelined step computes what the sequential one does (float32 summation order).
    assert data["ratios"]["max_loss_rel_diff_pipelined_vs_sequential"] < 1e-4
    # Splitting the top's backward changes no number either.
    assert data["ratios"]["losses_equal_split_backward_vs_pipelined"] is True
    assert data["parallel_capacity_before"] is None  # the probe is off in the smoke preset


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distributed_smoke(tmp_path: Path, parallel: str) -> None:
    data = run_script("benchmarks.bench_distributed", tmp_path, "--parallel", parallel)
    assert (data["benchmark"], data["parallel"]) == ("distributed", parallel)
    assert set(data["servers"]) == {"plain", "1 rank", "2 ranks"}
    for result in data["servers"].values():
        assert result["step_s"] > 0 and result["samples_per_s"] > 0 and result["tiny_call_s"] > 0
        assert result["busiest_rank_cpu_s_per_step"] > 0
    assert data["speedup_2_vs_1"] > 0 and data["cpu_speedup_2_vs_1"] > 0
    assert set(data["front_door_overhead_s"]) == {"1 rank", "2 ranks"}


def test_guard_smoke(tmp_path: Path) -> None:
    data = run_script("benchmarks.bench_guard", tmp_path)
    assert data["benchmark"] == "guard" and data["parameters"] > 0
    ways = ["bare", "guarded_back_to_back", "guarded_after_a_pause", "guarded_nothing_prepared"]
    assert set(data["ms"]) == {*ways, "copy"}
    for name, times in data["times"].items():
        assert len(times) == data["preset"]["steps"] and all(t > 0 for t in times), name
    assert set(data["ratios"]) == {f"{name}_vs_bare" for name in [*ways[1:], "copy"]}
    # Each guarded way timed what it says: the copy taken before it, or not.
    found = data["tensors_found_prepared"]
    for name in ("guarded_back_to_back", "guarded_after_a_pause"):
        assert found[name] == [data["tensors"]] * data["preset"]["steps"], name
    assert set(found["guarded_nothing_prepared"]) == set(found["copy"]) == {0}
