"""The tiny learning bar on CPU: SFT then GRPO on the tiny-RL task set, through the real stages.

    python -m dsaforge.model.rl.tiny --out runs/tiny-rl            # about 5 minutes on 2 CPU cores

1. `dsaforge.synth.tiny_rl` writes hundreds of short `lookup` tasks (train and held-out environments) and their
   reference trajectories, in the synthesize stage's layout;
2. a byte-level BPE tokenizer with the chat special tokens is trained on the train trajectories' text (the
   prepare-data stage's tokenizer, for a corpus of conversations);
3. the `sft` stage fine-tunes a freshly initialised tiny model on the rendered train trajectories;
4. the `grpo` stage trains it with GRPO (every tool call and verdict through the episode interface and the
   sandbox), evaluating held-out pass rate (sampled, pass@1) before and after.

Prints and returns the held-out pass rates with their standard errors; `tests/rl/test_learning.py` asserts the bar
(>= 10 points and > 3 standard errors).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def tiny_rl_config(**overrides):
    """The tiny preset with the SFT and GRPO settings of the tiny learning bar."""
    from dsaforge.config import load_config

    cfg = load_config("tiny")
    cfg.train.device = "cpu"
    s = cfg.train.sft
    s.steps, s.lr, s.batch_size, s.micro_batch_size, s.seq_len = 80, 3e-3, 8, 8, 208
    s.warmup_steps, s.eval_every, s.ckpt_every, s.eval_batches, s.min_lr_ratio = 10, 50, 1000, 1, 0.1
    rl = cfg.rl
    rl.mode = "dense"
    rl.steps, rl.lr, rl.group_size, rl.prompts_per_step, rl.micro_batch_size = 8, 5e-4, 8, 16, 16
    rl.kl_coef, rl.temperature, rl.top_p, rl.max_new_tokens, rl.max_turns = 0.0, 1.0, 1.0, 48, 3
    rl.eval_every, rl.eval_prompts, rl.eval_sampled, rl.save_every = 1000, 1000, True, 1000
    for k, v in overrides.items():
        section, field = k.split(".", 1)
        obj = getattr(cfg, section)
        *path, last = field.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg


def run(out: Path, cfg=None, envs: int = 60, heldout_envs: int = 20) -> dict:
    import torch

    from dsaforge.data.chat import ChatTemplate
    from dsaforge.data.tokenizer import train_tokenizer
    from dsaforge.model import Transformer
    from dsaforge.model.rl import stage as rl_stage
    from dsaforge.model.train import stages
    from dsaforge.model.train.state import export
    from dsaforge.stages import StageContext
    from dsaforge.synth.tiny_rl import write_tiny_rl
    from dsaforge.synth.trajectory import load_trajectories
    from dsaforge.tracking import NullTracker

    cfg = cfg or tiny_rl_config()
    out = Path(out)
    synth, data, base = out / "synthesize", out / "data", out / "init"
    write_tiny_rl(synth, envs=envs, heldout_envs=heldout_envs, seed=cfg.rl.seed)
    render = ChatTemplate(None, thinking=True).render
    texts = [render(t["messages"], t["tools"], add_generation_prompt=False)
             for t in load_trajectories(synth) if t["split"] == "train"]
    data.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, cfg.model.vocab_size).save(str(data / "tokenizer.json"))
    torch.manual_seed(cfg.train.seed)
    export(base / "hf", Transformer(cfg.model).state_dict(), cfg, {"stage": "init"})
    inputs = {"prepare-data": data, "sparse": base, "synthesize": synth}
    sft = stages.sft(StageContext(cfg, out / "sft", dict(inputs), NullTracker()))
    tracker = NullTracker()
    inputs = {"prepare-data": data, "sft": out / "sft", "synthesize": synth}
    grpo = rl_stage.run(StageContext(cfg, out / "grpo", inputs, tracker))
    result = {"sft": sft, "grpo": grpo, "tracker": tracker}
    before, after = grpo["start.heldout/pass_rate"], grpo["end.heldout/pass_rate"]
    se = (grpo["start.heldout/pass_rate_se"] ** 2 + grpo["end.heldout/pass_rate_se"] ** 2) ** 0.5
    result.update(before=before, after=after, gain_se=(after - before) / se if se else float("inf"),
                  heldout=int(grpo["end.heldout/n"]))
    print(f"held-out pass rate (n={result['heldout']}, sampled pass@1): after SFT {before:.3f} -> after GRPO "
          f"{after:.3f} ({100 * (after - before):+.1f} points, {result['gain_se']:.1f} standard errors)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rl-steps", type=int, default=None)
    args = ap.parse_args()
    cfg = tiny_rl_config(**({"rl.steps": args.rl_steps} if args.rl_steps else {}))
    r = run(args.out, cfg)
    (args.out / "result.json").write_text(json.dumps({k: v for k, v in r.items() if k != "tracker"}, indent=2,
                                                     default=str))


if __name__ == "__main__":
    main()
