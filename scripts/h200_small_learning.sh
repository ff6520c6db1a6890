#!/usr/bin/env bash
# The learning run of the small preset's model on one H200 (docs/rl.md, "Learning with the small preset's model"):
# the tiny-RL lookup tasks and stages of the tiny learning bar (`python -m dsaforge.model.rl.tiny`) with the small
# preset's model in bf16 (1.25B parameters, 0.21B active): data, pretrain, sft, then grpo evaluated on the held-out
# prompts before and after, and the report of its curves and per-class pass rates.
#
#   scripts/h200_small_learning.sh OUT
#       OUT gets run/ (the stages' outputs, result.json, table.md), run.log and
#       report/rl_small_learning_h200.{md,json}; the pretrain and sft checkpoints (17.5 GB each) are deleted once the
#       run has finished, their HF exports kept.
#   EXTRA_SETS="synth.sandbox.backend=unsafe-subprocess rl.lr=1e-4" scripts/h200_small_learning.sh OUT
#       Space-separated overrides of the run's config (here: a machine without bubblewrap, another GRPO lr).
#   STABILISERS=1 scripts/h200_small_learning.sh OUT
#       Then the stabilisers' same-run comparison on the same SFT model (4 grpo steps at top-p 0.9 with
#       rl.diagnostics, as docs/benchmarks/rl_tiny_stabilisers_cpu.md on CPU), into OUT/run-stab and
#       OUT/report/rl_small_stabilisers_h200.{md,json}.
#   B_SETS="rl.lr=1e-4" scripts/h200_small_learning.sh OUT
#       Then (after the stabilisers' run, if asked for) a second grpo on the same SFT model with these overrides
#       added, into OUT/run-b and its report.
set -euo pipefail

out=${1:?usage: $0 OUT}
py=${PYTHON:-python}
sets() { for kv in "$@"; do printf -- '--set\n%s\n' "$kv"; done; }
read -r -a extra <<< "${EXTRA_SETS:-}"
mapfile -t args < <(sets "${extra[@]}")
mkdir -p "$out/report"

"$py" -m dsaforge.model.rl.tiny --model small --out "$out/run" "${args[@]}" 2>&1 | tee "$out/run.log"
"$py" -m dsaforge.model.rl.report "$out/run/grpo" --out "$out/report/rl_small_learning_h200"
rm -rf "$out/run/pretrain/checkpoints"
if [[ -n ${STABILISERS:-} ]]; then
    mapfile -t s_args < <(sets "${extra[@]}" rl.steps=4 rl.diagnostics=true rl.top_p=0.9 rl.updates_per_step=2 \
        rl.prompts_per_step=16 rl.group_size=4 rl.micro_batch_size=32 rl.eval_prompts=64)
    "$py" -m dsaforge.model.rl.tiny --model small --from "$out/run" --out "$out/run-stab" "${s_args[@]}" 2>&1 \
        | tee "$out/run-stab.log"
    "$py" -m dsaforge.model.rl.report "$out/run-stab/grpo" --out "$out/report/rl_small_stabilisers_h200"
fi
if [[ -n ${B_SETS:-} ]]; then
    read -r -a b <<< "$B_SETS"
    mapfile -t b_args < <(sets "${extra[@]}" "${b[@]}")
    "$py" -m dsaforge.model.rl.tiny --model small --from "$out/run" --out "$out/run-b" "${b_args[@]}" 2>&1 \
        | tee "$out/run-b.log"
    "$py" -m dsaforge.model.rl.report "$out/run-b/grpo" --out "$out/report/rl_small_learning_h200_b"
fi
rm -rf "$out/run/sft/checkpoints"
