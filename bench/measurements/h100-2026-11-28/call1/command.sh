#!/usr/bin/env bash
# call 1: the box weight update's time split (probe, variants, ncu), then the unverified GPU tests and e2e memory rows
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*" | tee -a $OUT/progress.log; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a $OUT/progress.log
say "probe full"
timeout 110 python3 bench/wu_probe.py --shapes 0,2,4,6 --splits auto,0.5,2 > $OUT/probe.log 2>&1
say "probe full: $?"
for v in no-epilogue no-partials; do
  timeout 45 python3 bench/wu_probe.py --variant $v --shapes 0,4 --splits auto --configs 128x64x64-s4-w8-bw8,64x64x64-s4-w4-bw16 >> $OUT/probe.log 2>&1
  say "probe $v: $?"
done
timeout 60 ncu --clock-control none --set detailed -k regex:_box_weight_update_kernel -c 1 python3 bench/wu_probe.py --shapes 0 --once 128x64x64-s4-w8-bw8,15 > $OUT/ncu.txt 2>&1
say "ncu: $?"
cat $OUT/probe.log
TESTS_K="cached_cast or box_kernels or clip-True or derived_weights" TESTS_S=60 OPS_K=skip \
E2E_K="(r3d_18 and T48 and (clip_bp or (causal and default))) or T256" E2E_S=100 timeout 200 bash bench/run_gpu.sh > /tmp/run_gpu.log 2>&1
say "run_gpu: $?"
tail -5 $OUT/gpu_tests.log; tail -30 /tmp/run_gpu.log
