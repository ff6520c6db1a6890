"""The tiny learning bar on CPU: pretrain, SFT, then GRPO on the tiny-RL task set, through the real stages.

    python -m dsaforge.model.rl.tiny --out runs/tiny-rl            # what tests/rl/test_learning.py runs; --rl-steps, --sft-steps
    python -m dsaforge.model.rl.tiny --from runs/tiny-rl --out runs/tiny-rl-b --set rl.lr=1e-4   # grpo only, on that SFT model
    python -m dsaforge.model.rl.tiny --model small --out runs/small-rl   # the small preset's model, on a GPU

1. `dsaforge.synth.tiny_rl` writes hundreds of short `lookup` tasks (train and held-out environments) and their
   reference trajectories, in the synthesize stage's layout;
2. the `prepare-data` stage ingests a corpus of the train environments' transcripts (each conversation after its
   system prompt, plus a few whole conversations so the tokenizer knows the system prompt's words): a byte-level
   BPE tokenizer in which every item name and every code is one token, and packed rows;
3. the `pretrain` stage trains a fresh tiny model on those short transcripts (documents masked from each other):
   with ~50 tokens of context instead of ~200 the copy from a prompt or a tool output into the reply forms in a
   few hundred steps, which on whole conversations takes thousands;
4. the `sft` stage fine-tunes it on the rendered train trajectories (loss on the assistant's tokens only), stopped
   early, where the held-out pass rate of the sampled policy is well below its ceiling;
5. the `grpo` stage trains it with GRPO (256 episodes a step from 64 prompts, with the KL to the SFT model that
   keeps the tokens it is already sure of in place), every tool call and verdict through the episode interface and
   the sandbox, evaluating the held-out pass rate (one sampled episode per held-out prompt, T = 1) before and after.

The gain is measured in standard errors of the difference of two independent proportions,
    SE = sqrt(p_before (1 - p_before) / n + p_after (1 - p_after) / n),
each p the share of the n held-out prompts whose one sampled episode passed its verifier (the per-evaluation SE
is `heldout/pass_rate_se`, the sample std over sqrt(n), which this combines in quadrature). Both evaluations use
the same prompts, so their outcomes are positively correlated and this SE overstates the paired one: the test is
conservative. `tests/rl/test_learning.py` asserts the bar (>= 10 points and > 3 standard errors).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def tiny_rl_config(model: str = "tiny", **overrides):
    """The tiny preset with the model and the pretrain, SFT and GRPO settings of the tiny learning bar.

    `model="small"`: the same tasks, data and stages with the small preset's model (1.25B parameters, 0.21B active,
    its attention, experts and depth; only the vocabulary cut to the tiny-RL tokenizer's) trained in bf16 on a GPU,
    with the learning rates and batches of a model that size (the learning run of `docs/rl.md`, "On an H200")."""
    from dsaforge.config import load_config

    if model not in ("tiny", "small"):
        raise ValueError(f"model must be 'tiny' (CPU) or 'small' (one GPU), not {model!r}")
    cfg = load_config("tiny")
    cfg.train.device = "cpu"
    if model == "small":
        big = load_config("small")
        cfg.model, cfg.train.dtype, cfg.train.device = big.model, big.train.dtype, "auto"
    m = cfg.model
    m.vocab_size = 1024           # the tiny-RL tokenizer has ~600 tokens: a smaller head, less compute
    if model == "tiny":
        # attention wide enough to carry a token's identity through one head (the copy): a full-rank latent and value
        m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.v_head_dim = 64, 64, 16, 32
    d = cfg.data
    d.seq_len, d.val_fraction, d.max_documents, d.min_doc_bytes = 128, 0.02, None, 16
    p = cfg.train.pretrain
    p.steps, p.lr, p.batch_size, p.micro_batch_size, p.seq_len, p.doc_mask = 400, 3e-3, 16, 16, 128, True
    p.warmup_steps, p.eval_every, p.ckpt_every, p.eval_batches, p.min_lr_ratio = 20, 1000, 1000, 1, 0.1
    s = cfg.train.sft
    s.steps, s.lr, s.batch_size, s.micro_batch_size, s.seq_len = 12, 1e-3, 8, 8, 200
    s.warmup_steps, s.eval_every, s.ckpt_every, s.eval_batches, s.min_lr_ratio = 5, 1000, 1000, 1, 1.0
    rl = cfg.rl
    rl.mode = "dense"
    rl.steps, rl.lr, rl.group_size, rl.prompts_per_step, rl.micro_batch_size = 40, 6e-4, 4, 64, 64
    rl.kl_coef, rl.temperature, rl.top_p, rl.max_new_tokens, rl.max_turns = 0.05, 1.0, 1.0, 32, 2
    rl.reward.format_weight = 0.2
    rl.eval_every, rl.eval_prompts, rl.eval_sampled, rl.save_every = 1000, 1000, True, 1000
    if model == "small":
        # a 1.25B model: the small preset's pretraining lr, twice the rows a step (a GPU has the room), gentler
        # SFT and GRPO steps; one checkpoint per stage (each is 17.5 GB of fp32 weights and AdamW moments)
        p.lr, p.batch_size, p.micro_batch_size = 6e-4, 32, 32
        s.lr = 1e-4
        rl.lr = 3e-5
        for stage in (p, s):
            stage.keep_last = 1
    for k, v in overrides.items():
        section, field = k.split(".", 1)
        obj = getattr(cfg, section)
        *path, last = field.split(".")
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, last):
            raise ValueError(f"unknown setting {k!r}")
        setattr(obj, last, v)
    return type(cfg).model_validate(cfg.model_dump())      # the overrides checked like any config


def write_corpus(synth: Path, path: Path, whole: int = 20) -> int:
    """The pretraining corpus as JSONL: every train trajectory's transcript after the system prompt, and the first
    `whole` train conversations in full (for the tokenizer). Held-out environments stay out."""
    from dsaforge.data.chat import USER, ChatTemplate
    from dsaforge.synth.trajectory import load_trajectories

    render = ChatTemplate(None, thinking=True).render
    rows = []
    for i, t in enumerate(x for x in load_trajectories(synth) if x["split"] == "train"):
        text = render(t["messages"], t["tools"], add_generation_prompt=False)
        rows.append(text if i < whole else text[text.index(USER):])
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return len(rows)


def run(out: Path, cfg=None, envs: int = 125, heldout_envs: int = 50, reuse: Path | None = None) -> dict:
    """The four steps into `out`; with `reuse` (an earlier run's directory) its tasks, data and SFT model are taken
    as they are and only grpo runs (for comparing GRPO settings on one SFT model)."""
    import torch

    from dsaforge.data.prepare import prepare
    from dsaforge.model.rl import stage as rl_stage
    from dsaforge.model.train import stages
    from dsaforge.stages import StageContext
    from dsaforge.synth.tiny_rl import write_tiny_rl
    from dsaforge.tracking import NullTracker

    cfg = cfg or tiny_rl_config()
    torch.set_num_threads(min(2, torch.get_num_threads()))     # 2 (fewer where OMP_NUM_THREADS says so)
    out = Path(out)
    times, t0 = {}, time.perf_counter()
    if reuse is None:
        synth, data, sft_dir = out / "synthesize", out / "data", out / "sft"
        write_tiny_rl(synth, envs=envs, heldout_envs=heldout_envs, seed=cfg.rl.seed)
        cfg.data.sources = [str(out / "corpus.jsonl")]
        write_corpus(synth, out / "corpus.jsonl")
        prepare(cfg, data)
        times["data_s"] = time.perf_counter() - t0
        pre = stages.pretrain(StageContext(cfg, out / "pretrain", {"prepare-data": data}, NullTracker()))
        times["pretrain_s"] = time.perf_counter() - t0 - sum(times.values())
        sft = stages.sft(StageContext(cfg, sft_dir, {"prepare-data": data, "pretrain": out / "pretrain",
                                                     "synthesize": synth}, NullTracker()))
        times["sft_s"] = time.perf_counter() - t0 - sum(times.values())
    else:
        synth, data, sft_dir = Path(reuse) / "synthesize", Path(reuse) / "data", Path(reuse) / "sft"
        pre, sft = None, json.loads((sft_dir / "metrics.json").read_text())
    tracker = NullTracker()
    grpo = rl_stage.run(StageContext(cfg, out / "grpo", {"prepare-data": data, "sft": sft_dir,
                                                         "synthesize": synth}, tracker))
    times["grpo_s"] = time.perf_counter() - t0 - sum(times.values())
    before, after = grpo["start.heldout/pass_rate"], grpo["end.heldout/pass_rate"]
    gain_se = gain_in_se(before, after, grpo["start.heldout/pass_rate_se"], grpo["end.heldout/pass_rate_se"])
    result = {"pretrain": pre, "sft": sft, "grpo": grpo, "tracker": tracker, "times": times,
              "before": before, "after": after, "before_se": grpo["start.heldout/pass_rate_se"],
              "after_se": grpo["end.heldout/pass_rate_se"], "gain_se": gain_se,
              "heldout": int(grpo["end.heldout/n"])}
    print(table(result))
    return result


def gain_in_se(before: float, after: float, se_before: float, se_after: float) -> float:
    """The pass rate's gain in standard errors of the difference of two independent evaluations. Without any spread
    (every episode failed, or every one passed, in both) a gain is certain (+-inf) and no gain is 0, not inf."""
    se = math.hypot(se_before, se_after)
    if se:
        return (after - before) / se
    return math.copysign(math.inf, after - before) if after != before else 0.0


def table(r: dict) -> str:
    lines = [f"held-out pass rate, n = {r['heldout']} prompts, one sampled episode each (T = 1)",
             "| after | pass rate | SE |", "|---|---|---|",
             f"| sft | {r['before']:.3f} | {r['before_se']:.3f} |",
             f"| grpo ({r['grpo']['steps']} steps) | {r['after']:.3f} | {r['after_se']:.3f} |",
             f"gain {100 * (r['after'] - r['before']):+.1f} points = {r['gain_se']:.1f} standard errors; "
             + ", ".join(f"{k} {v:.0f}" for k, v in r["times"].items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a new directory: stage outputs, result.json, table.md")
    ap.add_argument("--model", choices=("tiny", "small"), default="tiny",
                    help="tiny: the CPU model of the test; small: the small preset's model, on a GPU")
    ap.add_argument("--rl-steps", type=int, default=None, help="GRPO steps (the test runs the default)")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--from", dest="reuse", type=Path, default=None,
                    help="an earlier run's directory: reuse its tasks, data and SFT model, run only grpo")
    ap.add_argument("--envs", type=int, default=None, help="environments in all, the held-out ones included "
                    "(default: run()'s)")
    ap.add_argument("--heldout-envs", type=int, default=None, help="environments whose tasks are only evaluated")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the tiny-RL config, the value as JSON (e.g. rl.top_p=0.9)")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("rl.steps", args.rl_steps), ("train.sft.steps", args.sft_steps)) if v}
    for kv in args.sets:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--set {kv!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    sizes = {k: v for k, v in (("envs", args.envs), ("heldout_envs", args.heldout_envs)) if v is not None}
    r = run(args.out, tiny_rl_config(args.model, **overrides), reuse=args.reuse, **sizes)
    (args.out / "result.json").write_text(json.dumps({k: v for k, v in r.items() if k != "tracker"}, indent=2,
                                                     default=str))
    (args.out / "table.md").write_text(table(r) + "\n")


if __name__ == "__main__":
    main()
