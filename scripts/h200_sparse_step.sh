#!/usr/bin/env bash
# The `h200` preset's training step at long context on one H200, in about 8 minutes: the GPU checks of the kernels the
# sparse step runs, then the dense and sparse steps at 64K (the sparse one profiled) and 128K, then the sparse 64K
# step with the KL target's separate kernel, for comparison with the target taken from the sparse forward.
#
#   scripts/h200_sparse_step.sh [OUT]
#       OUT (default docs/benchmarks/train_h200_sparse_step) gets OUT_gpu_tests.txt, OUT.{md,json} (64K, profile in
#       OUT_h200_sparse_65536.profile.txt), OUT_128k.{md,json} and OUT_separate_target.{md,json}.
#
# Budget (from docs/benchmarks/train_h200.md), each part under its own timeout, 565 s in all: the gpu tests about
# 1-2 min (160 s); 64K dense about 14 s a step and sparse under 10 s, 2 steps + 1 warm-up each plus the profiled
# step, about 2 min with start-up (170 s); 128K sparse about 20 s a step if it fits (the memory plan says 150 GiB, so
# it may stop at out of memory; the row then records the error) and dense about 50 s a step, 1 step + 1 warm-up
# each (170 s: the dense row may be cut); the separate-target row, 1 step + 1 warm-up (65 s). If time is short,
# drop the last part first, then the 128K part.
set -uo pipefail

out=${1:-docs/benchmarks/train_h200_sparse_step}
py=${PYTHON:-python}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$(dirname "$out")"
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }

stamp "gpu tests"
timeout 160 "$py" -m pytest -q -m gpu -rA tests/kernels/test_gpu.py tests/kernels/test_sparse_mla.py \
    tests/model/test_attention.py tests/train/test_plan.py 2>&1 | tee "${out}_gpu_tests.txt" | tail -30

stamp "64K dense and sparse"
timeout 170 "$py" -m dsaforge.model.train.bench --rows h200:65536:dense,sparse --tokens-per-step 65536 \
    --steps 2 --warmup 1 --profile 65536:sparse --time-budget 160 --out "$out"

stamp "128K sparse and dense"
timeout 170 "$py" -m dsaforge.model.train.bench --rows h200:131072:sparse,dense --tokens-per-step 65536 \
    --steps 1 --warmup 1 --time-budget 165 --out "${out}_128k"

stamp "64K sparse, separate KL target kernel"
DSAFORGE_FUSED_TARGET=0 timeout 65 "$py" -m dsaforge.model.train.bench --rows h200:65536:sparse \
    --tokens-per-step 65536 --steps 1 --warmup 1 --time-budget 60 --out "${out}_separate_target"
stamp "done"
