#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (the device tool's Python: torch 2.11+ with CUDA, triton):
# builds the extension with its CUDA kernels, runs the GPU tests (and compute-sanitizer's
# memcheck/racecheck on the kernel tests when present), then the GPU benchmarks, and
# appends one row per figure to bench/RESULTS.md. Fits one 10-minute call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
device=$($PY -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "== $device, torch $($PY -c 'import torch; print(torch.__version__)')"

$PY -m pip install --no-build-isolation --no-deps -e . -q
$PY -c 'import sideways_kernels as s; b = s.backends(); print(b); assert b["cuda"], "CUDA kernels not built"'

$PY -m pytest python_tests -q -m "gpu" -p no:cacheprovider
$PY -m pytest python_tests/test_ops.py python_tests/test_pipeline.py python_tests/test_triton.py -q -x -p no:cacheprovider

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 \
      $PY -m pytest python_tests/test_gpu.py -q -x -k "fused_sgd or ops_match" -p no:cacheprovider
  done
fi

out=$(mktemp -d)
$PY -m pytest bench/bench_gpu.py --benchmark-only --benchmark-json "$out/gpu.json" -q -p no:cacheprovider
$PY bench/results_table.py "$out/gpu.json" --device "$device"
