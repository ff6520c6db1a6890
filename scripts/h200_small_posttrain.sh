#!/usr/bin/env bash
# Small-preset post-training on one H200 in about 8 minutes of wall time: sft, then grpo with the same-run stabiliser
# comparison (rl.diagnostics, top-p 0.9 so the kept sets matter, 2 updates per rollout batch so the second one's
# routes differ from the engine's), then the report. Each stage is timed.
#
#   scripts/h200_small_posttrain.sh OUT [RUNS]
#       RUNS (default runs/small) holds the small preset's data/ (prepare-data), sparse/ (the sparse stage) and
#       synth/ (synthesize). OUT gets sft/ and grpo/ (the stages' outputs), report/rl_small_h200.{md,json} (the
#       curves, held-out pass rate per agent class before and after, stage wall times), times.tsv and a log per
#       stage.
#   EXTRA_SETS="synth.sandbox.backend=unsafe-subprocess" scripts/h200_small_posttrain.sh OUT RUNS
#       Space-separated overrides added to both stages (here: a machine without bubblewrap).
#   STAGE_ARGS="--no-track" scripts/h200_small_posttrain.sh OUT RUNS
#       Space-separated arguments added to both stage commands (here: no MLflow; the report reads the stages'
#       metrics.jsonl either way).
#   PRE_STEPS=30 scripts/h200_small_posttrain.sh OUT RUNS
#       RUNS without sparse/: first a short pretrain of that many steps (8 x 4K a step) into RUNS/sparse, its
#       checkpoints deleted once its HF export exists (sft starts from the export). Far too short to learn the tasks:
#       a run of the pipeline and the stabiliser numbers, not of learning.
#   PRESET=tiny scripts/h200_small_posttrain.sh OUT RUNS
#       The same commands and --set keys with tiny sizes, on CPU: a dry run of the sequence (RUNS from the tiny
#       preset's prepare-data, any earlier training stage as sparse/, synthesize).
#
# Budget (estimated from docs/benchmarks/train_small_h200*.md and generation_h200.md; see docs/rl.md): sft 20 steps x
# 8 conversations x 4K tokens (about 2-3 s a step at 8-15K tokens/s, plus start-up, the final evaluation, checkpoint
# and HF export: about 2.5 min); grpo 5 steps x 8 prompts x 4 samples, at most 256 tokens per segment and 2
# tool-calling segments (decode at about 10 ms a step for 32 sequences with CUDA graphs, so at most about 8 s of
# generation a step, plus two updates, the reference and diagnostic forwards: about 25 s a step), evaluated on 32
# held-out prompts before and after: about 4.5 min. SFT_STEPS and RL_STEPS change the step counts.
set -euo pipefail

out=${1:?usage: $0 OUT [RUNS]}
runs=${2:-runs/small}
preset=${PRESET:-small}
py=${PYTHON:-python}

report=$out/report/rl_small_h200
if [[ $preset == small ]]; then
    sft_sets=(train.sft.steps=${SFT_STEPS:-20} train.sft.batch_size=8 train.sft.micro_batch_size=2
              train.sft.seq_len=4096 train.sft.warmup_steps=2 train.sft.eval_every=1000 train.sft.eval_batches=1
              train.sft.ckpt_every=1000)
    rl_sets=(rl.steps=${RL_STEPS:-5} rl.prompts_per_step=8 rl.group_size=4 rl.micro_batch_size=4
             rl.max_new_tokens=256 rl.max_turns=2 rl.eval_prompts=32 rl.eval_every=1000 rl.save_every=1000)
elif [[ $preset == tiny ]]; then
    report=$out/report/rl_tiny_cpu
    sft_sets=(train.sft.steps=${SFT_STEPS:-2} train.sft.batch_size=4 train.sft.micro_batch_size=2
              train.sft.seq_len=512 train.sft.warmup_steps=0 train.sft.eval_every=1000 train.sft.eval_batches=1
              train.sft.ckpt_every=1000)
    rl_sets=(rl.steps=${RL_STEPS:-2} rl.prompts_per_step=2 rl.group_size=2 rl.micro_batch_size=4
             rl.max_new_tokens=16 rl.max_turns=1 rl.eval_prompts=4 rl.eval_every=1000 rl.save_every=1000)
else
    echo "PRESET must be small (one H200) or tiny (CPU dry run), not '$preset'" >&2
    exit 2
fi
# what the run is for: the same-run stabiliser comparison (docs/rl.md)
rl_sets+=(rl.diagnostics=true rl.top_p=0.9 rl.updates_per_step=2)
read -r -a extra <<< "${EXTRA_SETS:-}"
sft_sets+=("${extra[@]}")
rl_sets+=("${extra[@]}")
read -r -a stage_args <<< "${STAGE_ARGS:-}"
sets() { for kv in "$@"; do printf -- '--set\n%s\n' "$kv"; done; }

if [[ -n ${PRE_STEPS:-} && ! -d $runs/sparse ]]; then
    pre_sets=(train.pretrain.steps=$PRE_STEPS train.pretrain.eval_every=1000 train.pretrain.ckpt_every=1000
              train.pretrain.eval_batches=1 train.pretrain.keep_last=1)
    [[ $preset == small ]] && pre_sets+=(train.pretrain.batch_size=8 train.pretrain.micro_batch_size=8
                                         train.pretrain.warmup_steps=4)
    mapfile -t pre_args < <(sets "${pre_sets[@]}")
    "$py" -m dsaforge stage pretrain --preset "$preset" "${stage_args[@]}" "${pre_args[@]}" \
        --input prepare-data="$runs/data" --out "$runs/sparse"
    rm -rf "$runs/sparse/checkpoints"
fi
for input in data sparse synth; do
    [[ -d $runs/$input ]] || { echo "$runs/$input does not exist (expected the $preset preset's $input output)" >&2; exit 2; }
done
mkdir -p "$out/report"
: > "$out/times.tsv"

# timed NAME COMMAND...: run, log to OUT/NAME.log, append "NAME<TAB>seconds" to OUT/times.tsv
timed() {
    local name=$1 t0 t1
    shift
    echo "== $name: $*"
    t0=$(date +%s.%N)
    "$@" 2>&1 | tee "$out/$name.log"
    t1=$(date +%s.%N)
    awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s\t%.1f\n", n, b - a }' >> "$out/times.tsv"
    tail -n 1 "$out/times.tsv"
}

mapfile -t sft_args < <(sets "${sft_sets[@]}")
mapfile -t rl_args < <(sets "${rl_sets[@]}")

timed sft "$py" -m dsaforge stage sft --preset "$preset" "${stage_args[@]}" "${sft_args[@]}" \
    --input prepare-data="$runs/data" --input sparse="$runs/sparse" --input synthesize="$runs/synth" --out "$out/sft"
timed grpo "$py" -m dsaforge stage grpo --preset "$preset" "${stage_args[@]}" "${rl_args[@]}" \
    --input prepare-data="$runs/data" --input sft="$out/sft" --input synthesize="$runs/synth" --out "$out/grpo"
timed report "$py" -m dsaforge.model.rl.report "$out/grpo" --out "$report"

total=$(awk '{ s += $2 } END { printf "%.1f", s }' "$out/times.tsv")
{
    printf '\n## Wall time per stage\n\nMeasured by `scripts/h200_small_posttrain.sh` (preset %s).\n\n' "$preset"
    printf '| stage | wall s |\n|---|---|\n'
    awk -F'\t' '{ printf "| %s | %s |\n", $1, $2 }' "$out/times.tsv"
    printf '| total | %s |\n' "$total"
} >> "$report.md"
echo "total ${total} s; report: $report.md"
