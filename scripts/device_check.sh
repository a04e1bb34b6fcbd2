#!/usr/bin/env bash
# The GPU check: the CUDA tests, a CPU subset proving the install, and the GPT-2 training-step
# benchmark with the trunk on CUDA (loopback, every codec at 8 x 512 to check that a lossy codec,
# quantized on the GPU, is no slower than float32, then a 100 Mbit/s link where the machine
# allows, then a client on the CPU).
#
# On the GPU machine, from the repository root, with the wheels of setup.cfg's pins in .whl/
# (carried: lz4, msgpack, grpcio, grpcio-health-checking, grpcio-reflection, protobuf,
# transformers, peft; the image has torch):
#
#     bash scripts/device_check.sh
#
# Everything lands in $OUT (log.txt, summary.txt, env.txt, step_*.json: 7 files), written as it
# goes, so a run cut short still brings back what it did. Each stage is bounded by `timeout`,
# and all of them together by BUDGET seconds. Without CUDA (here) the same script runs as a CPU
# fallback that skips the GPU-only parts:
#
#     OUT=/tmp/devout PY=.venv/bin/python WHEELS=0 BENCH_PRESET=smoke bash scripts/device_check.sh
set -u -o pipefail

# ---- settings ---------------------------------------------------------------------------
OUT=${OUT:-/tmp/device_check}   # where the results go (the device tool brings back $OUT)
PY=${PY:-python3}               # the interpreter that has torch
WHEELS=${WHEELS:-1}             # 1: install .whl/*.whl into /tmp/site first
BENCH_PRESET=${BENCH_PRESET:-full}  # bench_step preset: full (GPT-2 small) or smoke (tiny)
CODECS=${CODECS:-none,bf16,int8}    # wire codecs of the step benchmark
BUDGET=${BUDGET:-420}           # seconds for the whole script; a stage gets at most what is left
# -----------------------------------------------------------------------------------------

mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
# No third-party pytest plugins from the image (warnings are errors in this suite).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
START=$SECONDS

say() { echo "== $*" | tee -a "$LOG"; }

# stage NAME MAX_SECONDS COMMAND...: run COMMAND under `timeout`, log it, record its verdict.
stage() {
    local name=$1 max=$2 left limit t0 rc verdict
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    limit=$((max < left ? max : left))
    if ((limit < 15)); then
        printf '%-24s %s\n' "$name" "SKIPPED: time budget spent" >>"$SUMMARY"
        return 1
    fi
    say "$name (at most ${limit}s, $((SECONDS - START))s in): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=$?
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="TIMED OUT after ${limit}s" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    printf '%-24s %-28s %4ds\n' "$name" "$verdict" $((SECONDS - t0)) >>"$SUMMARY"
    return "$rc"
}

skip() { printf '%-24s %s\n' "$1" "SKIPPED: $2" >>"$SUMMARY"; say "$1 skipped: $2"; }
# cuda_stage NAME MAX COMMAND...: a stage that needs CUDA, skipped without it ($DEV, below).
cuda_stage() { if [ "$DEV" = cuda ]; then stage "$@"; else skip "$1" "no CUDA"; fi; }

# ---- 1. dependencies --------------------------------------------------------------------
if [ "$WHEELS" = 1 ]; then
    stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    # transformers checks its dependencies' versions on import: fall back to the image's own
    # transformers and peft if ours do not fit what the image has.
    if ! "$PY" -c "import transformers, peft" >>"$LOG" 2>&1; then
        say "carried transformers/peft do not import here: using the image's"
        rm -rf /tmp/site/transformers /tmp/site/transformers-* /tmp/site/peft /tmp/site/peft-*
    fi
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- 2. the machine ---------------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  commit: $(git rev-parse --short HEAD 2>/dev/null)"
    echo "PYTHONPATH=$PYTHONPATH"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' 2>&1
import platform, grpc, google.protobuf, msgpack, lz4, torch, transformers, peft, remote_autograd
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("grpcio", grpc.__version__, "| protobuf", google.protobuf.__version__, "| msgpack",
      ".".join(map(str, msgpack.version)), "| lz4", lz4.__version__)
print("transformers", transformers.__version__, "| peft", peft.__version__)
print("remote_autograd", remote_autograd.__version__, "from", remote_autograd.__file__)
print("cpus", torch.get_num_threads(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
EOF
} | tee "$OUT/env.txt" | tee -a "$LOG"

DEV=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>>"$LOG")
if [ "$DEV" != cuda ]; then
    DEV=cpu
    say "NO CUDA HERE: CPU fallback (GPU-only stages are skipped, benchmarks run on the CPU)"
fi

# ---- 3. tests ---------------------------------------------------------------------------
stage test_cuda 200 "$PY" -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda.py

# Evidence that the stress test can fail: the same calls with the copy holds switched off
# should corrupt some outputs (pooled buffers refilled while a copy still reads them).
read -r -d '' NO_HOLD <<'EOF'
import sys
sys.path.insert(0, "tests")
from test_cuda import Scale, corrupted_replies
from remote_autograd import RemoteModule, ServerOptions, memory, serve
server = serve(Scale(), "127.0.0.1:0", options=ServerOptions(device="cpu"))
remote = RemoteModule(server.address, device="cuda")
held = corrupted_replies(remote, 50, 20_000_000)
memory._COPIES.hold = lambda source, device: None  # the pool as it would be without the holds
unheld = corrupted_replies(remote, 50, 20_000_000)
print(f"no-hold check: corrupted outputs {len(held)}/50 with the holds, "
      f"{len(unheld)}/50 without (expected: 0, and some)")
server.stop(None)
EOF
cuda_stage no_hold_check 60 "$PY" -c "$NO_HOLD"

# The distributed trunk's NCCL path, one rank (issue 14): torchrun ... --parallel ddp|fsdp
# --device cuda, trained by a client as in tests/test_distributed.py, equal to local training.
read -r -d '' NCCL <<'EOF'
import sys
sys.path[:0] = ["tests"]
import torch
from factories import shifted_trunk
from test_distributed import TOL, _check_training, spawn_torchrun, stop_torchrun
from remote_autograd import serve
single = serve(shifted_trunk())
for mode in ("ddp", "fsdp"):
    process, address = spawn_torchrun(
        "factories:shifted_trunk", "--parallel", mode, "--device", "cuda", nproc=1
    )
    try:
        _check_training((mode, address), single.address, shifted_trunk, torch.float64, TOL)
        print(f"nccl check: 1 rank {mode} on cuda trains as locally")
    finally:
        stop_torchrun(process)
single.stop(None)
EOF
cuda_stage dist_nccl 120 "$PY" -c "$NCCL"

stage test_cpu_subset 150 "$PY" -m pytest -q -p no:cacheprovider -rfE \
    tests/test_split_training.py tests/test_codec.py tests/test_hf_split.py

# ---- 4. the training-step benchmark -----------------------------------------------------
BENCH=("$PY" -m benchmarks.bench_step --preset "$BENCH_PRESET" --codecs "$CODECS")
stage step_loopback 200 "${BENCH[@]}" --trunk-device "$DEV" --client-device "$DEV" \
    --json "$OUT/step_loopback.json"

# Every codec at 8 x 512 (the "large" preset, 12.6 MB of float32 per crossing), client and trunk
# on the GPU: the lossy codecs quantize on the GPU and must not be slower than float32
# (step_vs_split_float32 <= 1.0 in the summary).
cuda_stage step_codecs_large 150 "$PY" -m benchmarks.bench_step --preset large \
    --codecs none,bf16,fp16,int8 --steps 6 --trunk-device cuda --client-device cuda \
    --json "$OUT/step_codecs_large.json"

# The shaped link needs root, ip, tc, network namespaces, veth and tbf: try each first.
link_ok() {
    local ns=ra_probe$$ a=rap$$a
    [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null || return 1
    ip netns add "$ns" || return 1
    ip link add "$a" type veth peer name "rap$$b" &&
        tc qdisc add dev "$a" root tbf rate 100mbit burst 32kbit latency 50ms
    local rc=$?
    ip link del "$a" 2>/dev/null
    ip netns del "$ns"
    return $rc
}
if link_ok >>"$LOG" 2>&1; then
    stage step_100mbit 180 "${BENCH[@]}" --trunk-device "$DEV" --client-device "$DEV" \
        --link 100mbit --json "$OUT/step_100mbit.json"
else
    skip step_100mbit "no root, ip, tc, netns, veth or tbf here"
fi

# The usual split: a client without a GPU, the trunk on one (if time is left).
cuda_stage step_client_cpu 150 "${BENCH[@]}" --trunk-device cuda --client-device cpu \
    --json "$OUT/step_client_cpu.json"

# ---- 5. summary -------------------------------------------------------------------------
{
    echo
    echo "== summary ($((SECONDS - START))s; device: $DEV)"
    cat "$SUMMARY"
    grep -h "no-hold check\|nccl check" "$LOG"
    "$PY" - "$OUT" <<'EOF' 2>&1
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("step_*.json")):
    data = json.loads(path.read_text())
    mono = data["monolithic"]["step_s"]
    print(f"{path.name}: {data['link']}, trunk {data['devices']['trunk']}, client "
          f"{data['devices']['client']}, gpu {data['gpu']}: monolithic {mono * 1e3:.1f} ms")
    for codec, result in data["split"].items():
        ratios, parts = data["ratios"][codec], result["breakdown"]
        print(f"  split {codec:5s} {result['step_s'] * 1e3:7.1f} ms  "
              f"x{ratios['step_vs_monolithic']:.2f} of monolithic  "
              f"x{ratios['step_vs_split_float32'] or 0:.2f} of split float32  "
              f"wire+gRPC {parts['wire_and_rest_s'] * 1e3:.1f} ms  "
              f"server compute {parts['server_compute_s'] * 1e3:.1f} ms  "
              f"max loss rel diff {ratios['max_loss_rel_diff_vs_monolithic']:.1e}")
EOF
} | tee -a "$LOG"
