"""Presets are small functions deriving from `base()`: state what differs, inherit the rest.

- tiny:  the whole end-to-end pipeline on a 2-core CPU in minutes (2 layers, hidden 64).
- small: one H200 (~1.2B total / ~0.15B activated parameters, 64K context).
- h200:  DeepSeek-V3.2's attention block exactly, on one H200 (1.75B total / 1.12B activated, 64K-128K context).
- v32:   DeepSeek-V3.2's real dimensions, for planning and meta-device instantiation.
"""
from __future__ import annotations

from typing import Callable

from dsaforge.config.base import ConfigError
from dsaforge.config.sections import Config


def base() -> Config:
    """Defaults: DeepSeek-V3.2's architecture (the model section's defaults) and the paper's stage settings."""
    return Config(preset="base")


def v32() -> Config:
    cfg = base()
    cfg.preset = "v32"
    cfg.model.n_mtp_layers = 1
    cfg.data.seq_len = 131072
    # 1024 GPUs: data-parallel size 16, so the paper's warm-up batch (16 sequences) is one sequence per replica
    # and its sparse batch (480) is 30; the pretraining batch follows the same multiple.
    cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.pp = 8, 64, 8
    cfg.parallel.nproc_per_node, cfg.parallel.nnodes = 8, 128
    cfg.train.pretrain.batch_size = 16
    cfg.pipeline.gpus_per_stage = 8
    return cfg


def small() -> Config:
    cfg = base()
    cfg.preset = "small"
    m = cfg.model
    m.vocab_size, m.dim, m.inter_dim, m.moe_inter_dim = 32768, 1024, 2816, 512
    m.n_layers, m.n_dense_layers, m.n_heads = 12, 1, 16
    m.n_routed_experts, m.n_shared_experts, m.n_activated_experts = 64, 1, 6
    m.n_expert_groups, m.n_limited_groups = 8, 4
    m.q_lora_rank, m.kv_lora_rank = 384, 256
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 64, 64, 64
    m.index_n_heads, m.index_head_dim, m.index_topk = 16, 128, 2048
    m.max_seq_len, m.original_seq_len, m.rope_factor = 65536, 4096, 16.0
    cfg.data.seq_len = 4096
    t = cfg.train
    t.pretrain.steps, t.pretrain.lr, t.pretrain.batch_size, t.pretrain.seq_len = 2000, 6e-4, 32, 4096
    t.pretrain.micro_batch_size = 16     # 64K tokens per forward, as one 64K sequence: 28.7 GiB by the memory plan
    t.warmup.steps, t.warmup.batch_size, t.warmup.seq_len = 200, 8, 16384
    t.sparse.steps, t.sparse.lr, t.sparse.batch_size, t.sparse.seq_len = 500, 7.3e-6, 8, 16384
    cfg.pipeline.gpus_per_stage = 1
    cfg.train.activation_checkpointing = True     # 16K-64K sequences on one H200
    cfg.synth.tasks_per_class, cfg.synth.envs_per_class = 2000, 200
    t.sft.steps, t.sft.lr, t.sft.batch_size, t.sft.seq_len = 300, 2e-5, 32, 8192
    r = cfg.rl
    r.steps, r.lr, r.group_size, r.prompts_per_step, r.micro_batch_size = 200, 1e-6, 8, 32, 4
    r.max_new_tokens, r.max_turns, r.top_k = 2048, 8, 512      # top_k bounds the kept sets Keep Sampling Mask stores
    r.kl_coef_by_class = {"code_interpreter": 0.0}            # the paper: weak or no KL for math-like domains
    r.eval_every, r.eval_prompts = 20, 256
    return cfg


def h200() -> Config:
    """V3.2's attention block unchanged, with the rest sized so every stage trains on one H200 at 64K context.

    Attention is DeepSeek-V3.2's (the model defaults): 128 heads, q/kv LoRA ranks 1536/512, qk head dims 128 nope +
    64 rope, v head dim 128, indexer 64 heads x 128, top-k 2048, so the fused DSA kernels run at the shapes they were
    built for (64-head blocks, 576-d latent rows). Depth, width and experts come from the memory plan
    (`dsaforge plan --preset h200 --gpus 1 --gpu-mem 141 --seq-len L --stage S`): 8 layers (1 dense), dim 2048,
    32 routed experts of width 512 (6 active + 1 shared). The plan's busiest figures at 64K: pretrain 60, warm-up
    44, sparse 71 GiB; at 128K 94 / 79 / 114 GiB, all within 90% of 141 GiB (the plan was within -7% / -1% of the
    measured peaks of `small` at 4K / 64K on an H200). Twelve layers, or 64 experts, fit at 64K but not sparse at
    128K. The benchmark preset for long-context training speed next to `small`.
    """
    cfg = small()
    cfg.preset = "h200"
    m = cfg.model
    defaults = base().model        # V3.2's attention block
    for name in ("n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "index_n_heads", "index_head_dim", "index_topk"):
        setattr(m, name, getattr(defaults, name))
    m.dim, m.inter_dim, m.moe_inter_dim = 2048, 8192, 512
    m.n_layers, m.n_dense_layers = 8, 1
    m.n_routed_experts, m.n_shared_experts, m.n_activated_experts = 32, 1, 6
    m.n_expert_groups, m.n_limited_groups = 8, 4
    m.max_seq_len, m.original_seq_len, m.rope_factor = 131072, 4096, 32.0
    t = cfg.train
    t.pretrain.batch_size, t.pretrain.seq_len, t.pretrain.micro_batch_size = 32, 4096, 16   # plan: 60 GiB
    t.warmup.batch_size, t.warmup.seq_len = 8, 65536
    t.sparse.batch_size, t.sparse.seq_len = 8, 65536
    return cfg


def tiny() -> Config:
    cfg = base()
    cfg.preset = "tiny"
    m = cfg.model
    m.vocab_size, m.dim, m.inter_dim, m.moe_inter_dim = 2048, 64, 128, 32
    m.n_layers, m.n_dense_layers, m.n_heads = 2, 1, 4
    m.n_routed_experts, m.n_shared_experts, m.n_activated_experts = 8, 1, 2
    m.n_expert_groups, m.n_limited_groups = 4, 2
    m.q_lora_rank, m.kv_lora_rank = 32, 32
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 16, 8, 16
    m.index_n_heads, m.index_head_dim, m.index_topk = 4, 16, 32
    m.max_seq_len, m.original_seq_len, m.rope_factor = 512, 512, 1.0
    d = cfg.data
    d.max_documents, d.seq_len, d.shard_sequences, d.val_fraction = 400, 128, 1024, 0.05
    d.tokenizer_train_bytes = 4_000_000
    t = cfg.train
    t.dtype = "float32"
    t.pretrain.steps, t.pretrain.lr, t.pretrain.batch_size, t.pretrain.seq_len = 200, 3e-3, 8, 128
    t.pretrain.warmup_steps = 20
    t.warmup.steps, t.warmup.batch_size, t.warmup.seq_len = 60, 4, 128
    t.sparse.steps, t.sparse.lr, t.sparse.batch_size, t.sparse.seq_len = 60, 3e-4, 4, 128
    for s in (t.pretrain, t.warmup, t.sparse):
        s.eval_every, s.ckpt_every, s.eval_batches = 20, 50, 2
    t.sft.steps, t.sft.lr, t.sft.batch_size, t.sft.seq_len, t.sft.warmup_steps = 20, 1e-3, 4, 512, 2
    t.sft.eval_every, t.sft.ckpt_every, t.sft.eval_batches = 10, 50, 1
    r = cfg.rl
    r.steps, r.group_size, r.prompts_per_step, r.max_new_tokens, r.max_turns = 2, 2, 2, 24, 2
    r.micro_batch_size, r.eval_prompts, r.eval_every, r.lr = 4, 4, 2, 1e-4
    # the interpreter's Jupyter kernel takes seconds to start per episode: the demo's RL stays on the fast classes
    r.agent_classes = ["general", "search"]
    cfg.synth.tasks_per_class, cfg.synth.envs_per_class, cfg.synth.pass_k = 6, 3, 2
    cfg.synth.max_difficulty = 2
    cfg.eval.max_samples, cfg.eval.max_new_tokens, cfg.eval.batch_size = 16, 32, 8
    cfg.eval.long_context.samples, cfg.eval.long_context.depths = 2, [0.0, 0.5, 1.0]
    cfg.eval.max_turns = 2
    cfg.tracking.system_metrics_interval_s = 2.0
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "small": small, "h200": h200, "v32": v32, "base": base}


def preset(name: str) -> Config:
    """The named preset, validated as a whole (presets assign fields one by one, so cross-field checks run here)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return Config.model_validate(PRESETS[name]().model_dump())
