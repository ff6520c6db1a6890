"""The `grpo` stage: GRPO with DeepSeek-V3.2's four stabilisers on the synthesized agent tasks, from the SFT model.

    dsaforge stage grpo --preset tiny --input prepare-data=DATA --input sft=SFT --input synthesize=SYN --out RL
    (1 GPU: the same command; train.device=auto picks CUDA. N GPUs: add --set parallel.nproc_per_node=N, and the
    stage launches torchrun itself, data parallel, as the training stages do)

The policy is trained in this process and generates with the in-process rollout engine on the same weights
(`dsaforge.model.engine`), so "sync weights" refreshes the engine's derived weights rather than copying anything.
Under torchrun every rank holds the whole policy and its own engine; ranks split each step's prompts (whole groups)
and the held-out prompts, and megatron's DDP reduces the gradients (`dsaforge.model.rl.loop`); tensor, expert and
pipeline parallel layouts are refused (`check_settings`). Train-split tasks are the RL prompts; held-out tasks (by
environment) are evaluated before training, every rl.eval_every steps and at the end.

Output directory:
    hf/                          HF export of the trained policy
    checkpoints/step-XXXXXXXX/   model + optimizer, resumed from when the directory already holds one
    rollouts/step-XXXXXX.parquet every step's episodes (tokens, engine log-probs, rewards, advantages, transcripts)
    metrics.jsonl, metrics.json  per-step metrics (what goes to MLflow under rl/ and heldout/) and the summary
"""
from __future__ import annotations

import json
from pathlib import Path

from dsaforge.config import ConfigError
from dsaforge.outputs import write_atomic


def _inputs(ctx):
    for need in ("prepare-data", "sft", "synthesize"):
        if need not in ctx.inputs:
            raise ConfigError(f"stage 'grpo' needs the {need} output (--input {need}=DIR)")
    init = Path(ctx.inputs["sft"]) / "hf"
    if not (init / "config.json").is_file():
        raise ConfigError(f"grpo: input sft={ctx.inputs['sft']} has no hf/ export (that stage did not finish)")
    return init


def _tasks(ctx) -> tuple[list, list]:
    """(train-split tasks, held-out tasks; the train ones when there are none) of the classes rl.agent_classes."""
    from dsaforge.synth.task import load_tasks

    rl = ctx.cfg.rl
    try:
        tasks = [t for t in load_tasks(ctx.inputs["synthesize"]) if t.agent_class in rl.agent_classes]
    except FileNotFoundError as e:
        raise ConfigError(f"grpo: {e}") from None
    train = [t for t in tasks if t.split == "train"]
    if not train:
        raise ConfigError(f"grpo: {ctx.inputs['synthesize']} holds no train-split task of the classes "
                          f"{', '.join(rl.agent_classes)} (rl.agent_classes)")
    return train, [t for t in tasks if t.split == "heldout"] or train


def check_settings(cfg) -> None:
    """What grpo refuses before it starts: sharded layouts (it is data parallel: every rank holds the whole policy,
    which its rollout engine generates with), an engine context longer than the model's, and prompts that do not
    split evenly over the ranks."""
    p = cfg.parallel
    if p.tp > 1 or p.ep > 1 or p.pp > 1:
        raise ConfigError(f"grpo runs data parallel only, and parallel.tp={p.tp}, ep={p.ep}, pp={p.pp} shards the "
                          "model: the rollout engine generates on each rank's whole copy of the policy (set "
                          "parallel.tp, ep and pp to 1; parallel.nproc_per_node x nnodes ranks split the prompts)")
    if cfg.rl.context_len > cfg.model.max_seq_len:
        raise ConfigError(f"rl.context_len {cfg.rl.context_len} exceeds model.max_seq_len {cfg.model.max_seq_len} "
                          "(the rollout engine's context cannot be longer than the model's)")
    if cfg.rl.prompts_per_step % p.world_size:
        raise ConfigError(f"rl.prompts_per_step {cfg.rl.prompts_per_step} must be a multiple of the data-parallel "
                          f"size {p.world_size} (each rank rolls out the whole groups of an equal share of the "
                          "prompts)")


def run(ctx) -> dict:
    """The stage: checks, then the training where the layout says (this process, torchrun, or a TrainJob), then
    its artifacts."""
    from dsaforge.model.train.stages import run_parallel

    cfg, rl = ctx.cfg, ctx.cfg.rl
    _inputs(ctx)
    check_settings(cfg)
    _tasks(ctx)
    ctx.tracker.log_params({f"rl.{k}": v for k, v in rl.model_dump().items() if k != "reward"}
                           | {f"rl.reward.{k}": v for k, v in rl.reward.model_dump().items()})
    summary = run_parallel(ctx, "grpo", train)
    out = Path(ctx.out_dir)
    for name in ("metrics.json", "hf/config.json"):
        ctx.tracker.log_artifact(out / name)
    last = sorted((out / "rollouts").glob("*.parquet"))
    if last:
        ctx.tracker.log_artifact(last[-1], "rollouts")
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    for part in ("start", "end"):
        flat.update({f"{part}.{k}": v for k, v in summary[part].items()})
    return flat


def train(ctx) -> dict:
    """GRPO in this process: on one device, or as one rank of a torchrun job (data parallel). -> the summary."""
    from dsaforge.data.chat import ChatTemplate
    from dsaforge.data.tokenizer import PAD, load_tokenizer
    from dsaforge.model.engine import Engine
    from dsaforge.model.rl.loop import GRPO
    from dsaforge.model.rl.rollout import Rollout
    from dsaforge.model.train.state import TrainState, build_model

    cfg, rl = ctx.cfg, ctx.cfg.rl
    init = _inputs(ctx)
    train_tasks, heldout = _tasks(ctx)
    check_settings(cfg)
    try:
        tokenizer = load_tokenizer(ctx.inputs["prepare-data"])
    except FileNotFoundError as e:
        raise ConfigError(f"grpo: {e}") from None
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    state = TrainState(cfg, "sparse" if rl.mode == "sparse" else "dense", rl, init)
    dp_rank, dp = state.dp
    reference = None
    if rl.kl_coef > 0 or any(v > 0 for v in rl.kl_coef_by_class.values()):
        reference = build_model(cfg, init, state.device).eval().requires_grad_(False)
        reference.fused_dsa = state.model.fused_dsa
    engine = Engine(state.model, mode=rl.mode, max_batch=min(256, rl.prompts_per_step // dp * rl.group_size),
                    max_len=rl.context_len or cfg.model.max_seq_len, capture_routing=rl.keep_routing or rl.diagnostics,
                    capture_kept=(rl.keep_sampling_mask or rl.diagnostics) and (rl.top_p < 1 or rl.top_k > 0),
                    seed=rl.seed)   # each episode has its own key: the rank holding it does not matter
    rollout = Rollout(engine, ChatTemplate(tokenizer, thinking=True), rl, cfg.synth.sandbox)

    def sync(model):
        model.eval()                 # rollouts must not count expert loads or take training paths
        engine.refresh_weights()

    grpo = GRPO(cfg, state, reference, rollout, train_tasks, heldout, out, ctx.tracker, tokenizer.token_to_id(PAD),
                sync)
    found = state.resume(out / "checkpoints")
    if found:
        grpo.step = found[1]["step"]
    try:
        history = grpo.fit()
    finally:
        rollout.close()
    summary = {"stage": "grpo", "steps": grpo.step, "train_tasks": len(train_tasks), "heldout_tasks": len(heldout),
               "data_parallel": dp, "resumed_from": str(found[0]) if found else None, "start": history["start"],
               "end": history["end"]}
    state.export(out / "hf", summary)
    if state.is_main:
        write_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=str))   # "finished" for outputs
    state.close()
    return summary
