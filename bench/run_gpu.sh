#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (the device tool's Python: torch 2.11+ with CUDA, triton):
# builds the extension with its CUDA kernels, runs the GPU tests (and compute-sanitizer's
# memcheck/racecheck on the kernel tests when present), then the GPU benchmarks, and
# appends one row per figure to bench/RESULTS.md. Fits one 10-minute call.
# Under the device tool ($OUT set) the logs, the benchmark JSON, the new rows and the updated
# bench/RESULTS.md are also written to $OUT, the only thing that comes back from that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
device=$($PY -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "== $device, torch $($PY -c 'import torch; print(torch.__version__)')" | tee "$out/device.txt"

$PY -m pip install --no-build-isolation --no-deps -e . -q > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
$PY -c 'import sideways_kernels as s; b = s.backends(); print(b); assert b["cuda"], "CUDA kernels not built"'

$PY -m pytest python_tests -q -m "gpu" -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -5
$PY -m pytest python_tests/test_ops.py python_tests/test_pipeline.py python_tests/test_triton.py \
  python_tests/test_cuda_graphs.py -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -3

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 \
      $PY -m pytest python_tests/test_gpu.py -q -x -k "fused_sgd or ops_match" -p no:cacheprovider \
      > "$out/sanitizer_$tool.log" 2>&1 || { tail -30 "$out/sanitizer_$tool.log"; exit 1; }
    echo "compute-sanitizer $tool: clean"
  done
fi

$PY -m pytest bench/bench_gpu.py --benchmark-only --benchmark-json "$out/gpu.json" -q -p no:cacheprovider \
  > "$out/bench.log" 2>&1 || { tail -40 "$out/bench.log"; exit 1; }
$PY bench/results_table.py "$out/gpu.json" --device "$device" | tee "$out/rows.md"
cp bench/RESULTS.md "$out/RESULTS.md"
