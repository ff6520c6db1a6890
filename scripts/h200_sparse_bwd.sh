#!/usr/bin/env bash
# The Hopper (Gluon) kernels of the sparse MLA backward on one H200, in about 9.5 minutes: their GPU checks, the
# backward alone with the Triton dq kernel, the Hopper dq kernel and the Hopper kernel forming dKV too, side by side,
# the `h200` preset's sparse 64K step with each (and the dense step, for the ratio), and a profile of the dense 4K
# step, where the MFU bar is furthest off.
#
#   scripts/h200_sparse_bwd.sh [OUT]
#       OUT (default docs/benchmarks/sparse_bwd_h200) gets OUT_gpu_tests.txt, OUT.{md,json} (bench_bwd),
#       OUT_step.{md,json} (64K dense and sparse, Triton dq, the sparse step profiled), OUT_step_sm90.{md,json}
#       (64K sparse, Hopper dq, profiled), OUT_step_fused.{md,json} (64K sparse, Hopper dq + dKV, profiled) and
#       OUT_dense_4k.{md,json} (4K dense, profiled).
#
# Budget, each part under its own timeout, 580 s in all: the gpu tests (the Hopper backward against float64 and
# against the Triton path, the forward schedules with the prefetch barrier) 1-2 min (150 s); bench_bwd about a
# minute (110 s); 64K dense about 14 s a step and sparse about 8 s, 2 steps + 1 warm-up each plus the profiled step
# (140 s); 64K sparse with the Hopper dq, then with the fused one (60 s each); 4K dense, 16 sequences a step, about
# 3 s a step (50 s).
# If the gpu tests fail, the later parts still run but their Hopper rows are not to be trusted.
set -uo pipefail

out=${1:-docs/benchmarks/sparse_bwd_h200}
py=${PYTHON:-python}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$(dirname "$out")"
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }

stamp "gpu tests"
timeout 150 "$py" -m pytest -q -m gpu -rA tests/kernels/test_gpu.py tests/kernels/test_sparse_mla.py 2>&1 \
    | tee "${out}_gpu_tests.txt" | tail -30

stamp "backward: Triton dq against the Hopper kernels"
timeout 110 "$py" -m dsaforge.kernels.bench_bwd --out "$out"

stamp "64K dense and sparse, Triton dq"
DSAFORGE_SM90_BWD=0 timeout 140 "$py" -m dsaforge.model.train.bench --rows h200:65536:dense,sparse \
    --tokens-per-step 65536 --steps 2 --warmup 1 --profile 65536:sparse --time-budget 130 --out "${out}_step"

stamp "64K sparse, Hopper dq"
DSAFORGE_SM90_BWD=1 timeout 60 "$py" -m dsaforge.model.train.bench --rows h200:65536:sparse \
    --tokens-per-step 65536 --steps 1 --warmup 1 --profile 65536:sparse --time-budget 55 --out "${out}_step_sm90"

stamp "64K sparse, Hopper dq + dKV"
DSAFORGE_SM90_BWD=fused timeout 60 "$py" -m dsaforge.model.train.bench --rows h200:65536:sparse \
    --tokens-per-step 65536 --steps 1 --warmup 1 --profile 65536:sparse --time-budget 55 --out "${out}_step_fused"

stamp "4K dense, profiled"
timeout 50 "$py" -m dsaforge.model.train.bench --rows h200:4096:dense --tokens-per-step 65536 \
    --steps 1 --warmup 1 --profile 4096:dense --time-budget 45 --out "${out}_dense_4k"
stamp "done"
