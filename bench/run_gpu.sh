#!/usr/bin/env bash
# One short GPU run on a bare machine (the device tool's H100/H200: python3 with torch 2.11+ on
# CUDA, triton, nvcc, pytest, pytest-benchmark). Built to finish in 8 minutes:
#   build for sm_90a only with every core (<= 3 min; skipped when the extension was built
#   off the GPU and carried, as bench/RESULTS.md's "The next GPU run" describes), the GPU tests (<= 2 min), the op
#   benchmarks with Triton autotuning (<= 2.5 min), ticks and end to end (<= 3 min), the report.
# Everything is written under $OUT as it happens (progress.log, the logs, rows.jsonl one
# benchmark at a time), and the report runs whatever happened before it, so a timeout still
# brings back every figure measured so far:
#   results.md     the tables for bench/RESULTS.md (bench/gpu_report.py)
#   dispatch.json  this GPU's measured CUDA-vs-Triton choice per op, to review and commit as
#                  sideways_kernels/dispatch.json
# SANITIZE=1 adds compute-sanitizer memcheck on the CUDA kernel tests and the Triton box
# kernels' GPU test (about a minute more). A follow-up run can narrow each phase to a pytest -k
# expression and a time limit (seconds): TESTS_K/TESTS_S, OPS_K/OPS_S, E2E_K/E2E_S; an empty
# *_K runs the whole phase, "skip" skips it; TESTS_J sets the test phase's processes (default 4).
# The ops phase leaves out bench_gpu.py's test_other_layers (r3d_18's strided and R(2+1)D's
# layers, 200 cases) unless OPS_K names them.
# The end-to-end phase's default backend runs on the dispatch table this run measured (copied
# over sideways_kernels/dispatch.json in this checkout, which the device does not send back).
# Diagnostics, off unless asked, into one file (diagnostics.log): PROBE=1, the weight update
# config by config beside cuDNN (bench/wu_probe.py; PROBE_SPLITS, default "none": the autotuned
# config only); PROFILE="c3d r3d_18", where a 16-frame training clip's GPU time goes, eager
# (kernels attributed to the ops that launched them) and replayed from graphs (bench/profile_clip.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)  # pytest-benchmark's JSON: kept off $out, which brings back at most 8 files
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$out/progress.log"; }
# a phase gets SIGINT at its limit (pytest then writes what it has), SIGKILL 10 s later
phase() { local limit=$1; shift; timeout --signal=INT --kill-after=10 "$limit" "$@"; }

device=$($PY -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null) || { say "no CUDA GPU visible"; exit 1; }
say "$device; torch $($PY -c 'import torch; print(torch.__version__)'), triton $($PY -c 'import triton; print(triton.__version__)' 2>/dev/null || echo absent)"

export MAX_JOBS=${MAX_JOBS:-$(nproc)} SIDEWAYS_CUDA_ARCHS=${SIDEWAYS_CUDA_ARCHS:-90a}
# Built in place (nothing installed: the image's python may not be ours to write to); the
# repository root on PYTHONPATH makes this checkout the sideways_kernels every step imports.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if $PY -c 'import sideways_kernels as s; assert s.backends()["cuda"]' > /dev/null 2>&1; then
  say "build: skipped (the extension with its CUDA kernels is here already, e.g. built off the GPU and carried)"
else
  say "build: sm_$SIDEWAYS_CUDA_ARCHS, $MAX_JOBS jobs"
  phase 180 $PY setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; say "build failed (build.log)"; exit 1; }
fi
$PY -c 'import sideways_kernels as s; b = s.backends(); print(b); assert b["cuda"], "CUDA kernels not built"' \
  2>&1 | tee -a "$out/progress.log" || { say "CUDA kernels missing"; exit 1; }

# what compiling an autotuner's configs in parallel threads saves on this machine's CPUs (no GPU used; ~10 s)
phase 40 $PY bench/autotune_compile.py --threads 1 8 2>/dev/null | tee -a "$out/progress.log"

# pytest's -k for a phase from its *_K variable: nothing (the whole phase) or the expression
only() { local k=$1 default=$2; k=${k:-$default}; [ -n "$k" ] && printf '%s\n' -k "$k"; }
mapfile -t tests_k < <(only "${TESTS_K:-}" "")
mapfile -t ops_k < <(only "${OPS_K:-}" "ceiling or weight_update or forward_and_input_grad or bias_grad or tick_first_convs")
mapfile -t e2e_k < <(only "${E2E_K:-}" "tick or end_to_end")

if [ "${TESTS_K:-}" != skip ]; then
  # in TESTS_J processes at once (default 4): their time is Triton compiling, one test at a time per process
  say "GPU tests (python_tests/test_gpu.py ${tests_k[*]}, ${TESTS_J:-4} processes: no Triton interpreter)"
  phase $(( ${TESTS_S:-120} + 30 )) $PY bench/parallel_tests.py --jobs "${TESTS_J:-4}" --limit "${TESTS_S:-120}" \
    --log "$out/gpu_tests.log" -- python_tests/test_gpu.py "${tests_k[@]}" > /dev/null 2>&1
  say "GPU tests: exit $? — $(tail -1 "$out/gpu_tests.log")"
fi

if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer > /dev/null; then
  phase 90 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest python_tests/test_gpu.py -q -x \
    -k "cuda_ops_match or fused_sgd or box_kernels_on_gpu" -p no:cacheprovider > "$out/sanitizer_memcheck.log" 2>&1
  say "compute-sanitizer memcheck: exit $?"
fi

report() { $PY bench/gpu_report.py "$out/rows.jsonl" --device "$device" --dispatch "$out/dispatch.json" \
  > "$out/results.md" 2>&1; }

# benchmarks NAME LIMIT -k... : bench/bench_gpu.py's rows appended to rows.jsonl, its log in bench_NAME.log
benchmarks() {
  local name=$1 limit=$2; shift 2
  SIDEWAYS_BENCH_ROWS="$out/rows.jsonl" phase "$limit" $PY -m pytest bench/bench_gpu.py --benchmark-only -q "$@" \
    -p no:cacheprovider --benchmark-json "$work/gpu_$name.json" --benchmark-columns=median,rounds \
    > "$out/bench_$name.log" 2>&1
  say "benchmarks $name: exit $? — $(grep -c . "$out/rows.jsonl" 2>/dev/null || echo 0) rows"
}

if [ "${OPS_K:-}" != skip ]; then
  say "benchmarks 1/2 (ceiling, ops vs cuDNN at the C3D and r3d_18 shapes, eager and graph-replayed, Triton autotuning)"
  benchmarks ops "${OPS_S:-150}" "${ops_k[@]}"
  report && cp "$out/dispatch.json" sideways_kernels/dispatch.json && say "default backend: this run's dispatch table"
fi

if [ "${E2E_K:-}" != skip ]; then
  say "benchmarks 2/2 (graph ticks, end to end per network, backend and graphs, equal memory)"
  benchmarks e2e "${E2E_S:-170}" "${e2e_k[@]}"
fi

if [ "${PROBE:-0}" = 1 ]; then
  phase "${PROBE_S:-90}" $PY bench/wu_probe.py --splits "${PROBE_SPLITS:-none}" >> "$out/diagnostics.log" 2>&1
  say "weight-update probe: exit $?"
fi
for net in ${PROFILE:-}; do
  pad=$([ "$net" = r3d_18 ] && echo causal || echo same)
  for eager in --eager ""; do
    phase 40 $PY bench/profile_clip.py --network "$net" --padding "$pad" --frames 16 $eager \
      >> "$out/diagnostics.log" 2>&1
    say "profile $net ${eager:-graphs}: exit $?"
  done
done

report
cat "$out/results.md"
say "done"
