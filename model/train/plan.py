"""Memory plan: per GPU, what a training stage holds under each candidate layout, and the layout to use.

    dsaforge plan --preset v32 --gpus 64 --gpu-mem 141 [--seq-len 131072] [--stage sparse]

For each layout (tp x pp x dp, ep dividing dp) that the model's shapes allow, the busiest rank's bytes of:
parameters (fp32, as the trainer keeps them), gradients (megatron's fp32 grad buffer, trainable parameters only),
optimizer state (AdamW m and v, sharded over the data-parallel group with the distributed optimizer), activations
(with `train.activation_checkpointing`: the block inputs kept for recomputation plus one block's working set;
without: every block's saved tensors) and the bytes each rank sends per optimizer step (DP gradient reduce-scatter
and parameter all-gather, TP all-reduces, EP all-to-alls, PP activations). The recommended layout is the one that
fits with the least model parallelism, ties broken by communication volume.

Parameters are counted from the real modules (built on the meta device) and sharded by the megatron bridge's
rules: MLA's wq_b / wkv_b / wo and the dense and shared-expert FFNs split over TP; routed experts split over EP
(whole experts) or, with ep = 1, over TP; embedding, head, routers, indexers and norms replicated; blocks split
over PP with the embedding on the first stage and the head on the last. Activations are an estimate from the
tensors each block saves for backward (bf16 under autocast, fp32 where the code keeps fp32).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from dsaforge.config import Config, ConfigError
from dsaforge.config.model import ModelConfig

GiB = 2**30
PARAM_BYTES = GRAD_BYTES = 4          # fp32 parameters and megatron's fp32 gradient buffer
ADAM_BYTES = 8                        # exp_avg + exp_avg_sq (fp32); fp32 params are their own main copy
HEADROOM = 0.9                        # plan to 90% of the GPU: allocator fragmentation, NCCL buffers, CUDA context


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        return ".".join(f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("dp", self.dp)))


@dataclass
class RankPlan:
    layout: str
    params: int                  # parameters the busiest rank holds
    param_gib: float
    grad_gib: float
    optimizer_gib: float
    activation_gib: float
    total_gib: float
    comm_gib_per_step: float     # bytes this rank sends per optimizer step
    fits: bool


@functools.lru_cache(maxsize=32)
def _block_tensors(cfg_json: str, moe: bool) -> tuple[tuple[str, int], ...]:
    """(name, numel) of every parameter of one block, read from the real module built on the meta device."""
    from dsaforge.model.transformer import Block
    cfg = ModelConfig.model_validate_json(cfg_json)
    probe = cfg.model_copy(update={"n_layers": 1, "n_dense_layers": 0 if moe else 1})
    with torch.device("meta"):
        block = Block(probe, moe=moe)
    return tuple((name, p.numel()) for name, p in block.named_parameters())


def _block_params(cfg: ModelConfig, moe: bool, lay: Layout, mode: str) -> tuple[float, float, float, float]:
    """(params, trainable, dense-trainable, expert-trainable) one rank holds of one block, by the bridge's rules."""
    held = trainable = dense_tr = expert_tr = 0.0
    for name, numel in _block_tensors(cfg.model_dump_json(), moe):
        n = float(numel)
        if name.startswith("ffn.experts."):
            n /= lay.ep if lay.ep > 1 else lay.tp
        elif (name.startswith(("attn.wq_b.", "attn.wkv_b.", "ffn.shared_experts.")) or name == "attn.wo.weight"
              or (not moe and name.startswith("ffn."))):
            n /= lay.tp
        held += n
        if _trains(name, mode):
            trainable += n
            if name.startswith("ffn.experts.") and lay.ep > 1:
                expert_tr += n
            else:
                dense_tr += n
    return held, trainable, dense_tr, expert_tr


def _trains(name: str, mode: str) -> bool:
    """set_trainable's rule: warmup trains only the indexer, pretrain (dense) all but it, sparse everything."""
    idx = ".indexer." in f".{name}"
    return mode == "sparse" or idx == (mode == "warmup")


def _activation_bytes_per_token(cfg: ModelConfig, moe: bool, mode: str) -> float:
    """Bytes one block saves for backward per token (bf16 matmul outputs under autocast, fp32 norms and router)."""
    c, bf, f32 = cfg, 2, 4
    attn = (bf * c.dim + f32 * 2 * c.q_lora_rank + bf * c.n_heads * c.qk_head_dim
            + bf * (c.kv_lora_rank + c.qk_rope_head_dim) + f32 * c.kv_lora_rank
            + bf * c.n_heads * (c.kv_lora_rank + c.qk_rope_head_dim)                  # absorbed query
            + bf * c.n_heads * (c.kv_lora_rank + c.v_head_dim) + f32 * c.n_heads       # o_lat, o, lse
            + f32 * c.dim)                                                              # residual in
    if mode != "dense":
        attn += bf * (c.index_n_heads * c.index_head_dim + c.index_head_dim) + f32 * c.index_n_heads
    if mode == "sparse":
        attn += 4 * c.index_topk                                                        # int32 top-k indices
    if moe:
        k, inter = c.n_activated_experts, c.moe_inter_dim
        ffn = (f32 * c.dim + f32 * 2 * c.n_routed_experts + bf * k * c.dim + bf * 4 * k * inter + bf * k * c.dim
               + bf * 4 * c.n_shared_experts * inter)
    else:
        ffn = f32 * c.dim + bf * 4 * c.inter_dim
    return attn + ffn + f32 * c.dim


def _sparse_backward_peak(cfg: ModelConfig, tokens: int, tp: int) -> float:
    """Bytes the sparse MLA's backward holds beyond the block's saved tensors: dO [tokens, H, C] and dQ [tokens, H,
    C+R] in bf16, live together, and the split backward's dS/P scratch (from SPLIT_MIN_HEADS heads, bounded over
    the whole micro-batch). At 64K tokens and 128 heads that is 17 + 2 GiB, the gap between the plan without it
    (70.7 GiB) and the measured peak (84.8) of the `h200` sparse row."""
    from dsaforge.kernels.sparse_mla_bwd import BWD_SCRATCH_BYTES, SPLIT_MIN_HEADS
    heads = cfg.n_heads // tp
    grads = 2 * heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * tokens
    scratch = min(BWD_SCRATCH_BYTES, 2 * 2 * heads * cfg.index_topk * tokens) if heads >= SPLIT_MIN_HEADS else 0
    return float(grads + scratch)


def _stages(cfg: ModelConfig, lay: Layout) -> list[tuple[int, int, bool, bool]]:
    """(dense blocks, MoE blocks, holds embedding, holds head) per pipeline stage."""
    per = cfg.n_layers // lay.pp
    out = []
    for s in range(lay.pp):
        lo, hi = s * per, (s + 1) * per
        dense = max(0, min(hi, cfg.n_dense_layers) - lo)
        out.append((dense, per - dense, s == 0, s == lay.pp - 1))
    return out


def rank_plan(cfg: Config, lay: Layout, stage: str, seq_len: int, gpu_mem_gib: float) -> RankPlan:
    m, scfg = cfg.model, getattr(cfg.train, stage)
    if m.n_layers % lay.pp or lay.dp % lay.ep or m.n_routed_experts % lay.ep or m.n_heads % lay.tp:
        raise ConfigError(f"layout {lay.name} does not divide the model (n_layers {m.n_layers}, n_heads {m.n_heads}, "
                          f"n_routed_experts {m.n_routed_experts}) or has ep not dividing dp")
    mode = {"pretrain": "dense"}.get(stage, stage)
    mb = scfg.micro_batch_size
    n_micro = max(1, scfg.batch_size // (lay.dp * mb))
    recompute = cfg.train.activation_checkpointing
    dense_b = _block_params(m, False, lay, mode) if m.n_dense_layers else (0, 0, 0, 0)
    moe_b = _block_params(m, True, lay, mode) if m.n_layers > m.n_dense_layers else (0, 0, 0, 0)
    emb = float(m.vocab_size * m.dim)
    emb_tr = emb if mode != "warmup" else 0.0
    edp = max(1, lay.dp // lay.ep) if lay.ep > 1 else lay.dp
    worst: Optional[tuple] = None
    for dense, moe, first, last in _stages(m, lay):
        held = dense * dense_b[0] + moe * moe_b[0]
        dense_tr = dense * dense_b[2] + moe * moe_b[2]
        expert_tr = dense * dense_b[3] + moe * moe_b[3]
        held += (emb if first else 0) + ((emb + m.dim) if last else 0)
        dense_tr += (emb_tr if first else 0) + ((emb_tr + m.dim * (mode != "warmup")) if last else 0)
        if last and m.n_mtp_layers:                       # MTP needs pp = 1 (the bridge refuses it otherwise)
            mtp_b = moe_b if m.n_layers > m.n_dense_layers else dense_b
            held += m.n_mtp_layers * (mtp_b[0] + 2 * m.dim * m.dim + 3 * m.dim)
            dense_tr += m.n_mtp_layers * (mtp_b[2] + (2 * m.dim * m.dim + 3 * m.dim) * (mode != "warmup"))
            expert_tr += m.n_mtp_layers * mtp_b[3]
        trainable = dense_tr + expert_tr
        shard = lay.dp if cfg.parallel.distributed_optimizer and lay.world > 1 else 1
        eshard = edp if cfg.parallel.distributed_optimizer and lay.world > 1 else 1
        opt = ADAM_BYTES * (dense_tr / shard + expert_tr / eshard)
        # activations: 1F1B keeps up to pp micro-batches in flight on the first stage
        tokens = mb * seq_len                             # per micro-batch (sequence parallelism off)
        in_flight = min(lay.pp, n_micro)
        n_blocks = dense + moe + (m.n_mtp_layers if last else 0)
        per_tok = [(_activation_bytes_per_token(m, False, mode), dense),
                   (_activation_bytes_per_token(m, True, mode), moe + (m.n_mtp_layers if last else 0))]
        full = sum(b * n for b, n in per_tok)       # an upper bound under TP: head-split tensors are counted whole
        biggest = max(b for b, n in per_tok if n) if n_blocks else 0.0
        if recompute:
            # replay_topk holds each layer's [S, top_k] int32 indices and fp32 KL target until its backward, with
            # the KL's per-row value and statistics ([S] + [S, 2] fp32)
            kept = 4 * m.dim + (8 * m.index_topk + 12 if mode == "sparse" and cfg.train.replay_topk else 0)
            act = tokens * (in_flight * n_blocks * kept + biggest)
        else:
            act = tokens * in_flight * full
        if mode == "sparse" and n_blocks:
            act += _sparse_backward_peak(m, tokens, lay.tp)
        if last:   # chunked loss: one 4096-position chunk of fp32 logits and their gradient, plus the hidden
            act += 2 * 4 * min(4096, tokens) * m.vocab_size + 4 * tokens * m.dim
        total = PARAM_BYTES * held + GRAD_BYTES * trainable + opt + act
        comm = _comm_bytes(m, lay, dense_tr, expert_tr, tokens, n_micro, dense + moe, moe, recompute, mode,
                           first or last)
        row = (total, held, trainable, opt, act, comm)
        if worst is None or row[0] > worst[0]:
            worst = row
    total, held, trainable, opt, act, comm = worst
    return RankPlan(layout=lay.name, params=int(held), param_gib=PARAM_BYTES * held / GiB,
                    grad_gib=GRAD_BYTES * trainable / GiB, optimizer_gib=opt / GiB, activation_gib=act / GiB,
                    total_gib=total / GiB, comm_gib_per_step=comm / GiB, fits=total / GiB <= HEADROOM * gpu_mem_gib)


def _comm_bytes(m: ModelConfig, lay: Layout, dense_tr: float, expert_tr: float, tokens: float, n_micro: int,
                n_blocks: int, n_moe: int, recompute: bool, mode: str, edge_stage: bool) -> float:
    """Bytes this rank sends per optimizer step (ring collectives: an all-reduce sends 2(n-1)/n of the buffer)."""
    ring = lambda n: (n - 1) / n   # noqa: E731
    out = 0.0
    # DP: reduce-scatter of fp32 gradients + all-gather of updated fp32 parameters (distributed optimizer)
    edp = max(1, lay.dp // lay.ep) if lay.ep > 1 else lay.dp
    out += 2 * 4 * (dense_tr * ring(lay.dp) + expert_tr * ring(edp))
    passes = 3 if recompute else 2                 # forward, backward, and the recomputed forward
    if lay.tp > 1 and mode != "warmup":             # attention and FFN outputs all-reduced, bf16 [tokens, dim]
        out += n_micro * n_blocks * 2 * passes * 2 * ring(lay.tp) * 2 * tokens * m.dim
    if lay.ep > 1:                                  # dispatch + combine of k token copies, bf16
        out += n_micro * n_moe * passes * 2 * ring(lay.ep) * 2 * tokens * m.n_activated_experts * m.dim
    if lay.pp > 1:                                  # fp32 activations forward, their gradients backward
        out += n_micro * (1 if edge_stage else 2) * 2 * 4 * tokens * m.dim
    return out


def candidate_layouts(cfg: Config, gpus: int, max_tp: int = 8) -> list[Layout]:
    """Every (tp, pp, ep, dp) with tp * pp * dp = gpus that the model's shapes and the bridge allow."""
    m = cfg.model
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp and gpus % t == 0 and m.n_heads % t == 0):
        for pp in (p for p in range(1, gpus // tp + 1) if (gpus // tp) % p == 0 and m.n_layers % p == 0):
            if pp > 1 and m.n_mtp_layers:
                continue
            dp = gpus // (tp * pp)
            for ep in (e for e in range(1, dp + 1) if dp % e == 0 and m.n_routed_experts % e == 0):
                out.append(Layout(tp, pp, ep, dp))
    return out


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, seq_len: Optional[int] = None,
         stage: str = "sparse") -> tuple[list[RankPlan], Optional[RankPlan]]:
    """Every candidate layout's busiest rank, and the recommended one (None when nothing fits)."""
    if gpus < 1 or gpu_mem_gib <= 0:
        raise ConfigError(f"--gpus must be >= 1 and --gpu-mem > 0, got {gpus} and {gpu_mem_gib}")
    if stage not in ("pretrain", "warmup", "sparse"):
        raise ConfigError(f"stage must be pretrain, warmup or sparse, got {stage!r}")
    seq_len = seq_len or getattr(cfg.train, stage).seq_len
    layouts = candidate_layouts(cfg, gpus)
    if not layouts:
        raise ConfigError(f"no tp x pp x dp layout of {gpus} GPUs divides the model's heads and layers")
    rows = [rank_plan(cfg, lay, stage, seq_len, gpu_mem_gib) for lay in layouts]
    rows.sort(key=lambda r: r.total_gib)
    fitting = [r for r in rows if r.fits]
    model_parallel = lambda r: math.prod(int(p[2:]) for p in r.layout.split(".") if p[:2] in ("tp", "pp"))  # noqa
    best = min(fitting, key=lambda r: (model_parallel(r), r.comm_gib_per_step), default=None)
    return rows, best


def plan_params(cfg: Config, stage: str) -> dict[str, float | str]:
    """The plan of this run's own layout, as MLflow params (`plan.*`)."""
    p = cfg.parallel
    dp = p.world_size // (p.tp * p.pp)
    seq_len = getattr(cfg.train, stage).seq_len
    row = rank_plan(cfg, Layout(p.tp, p.pp, p.ep, dp), stage, seq_len, gpu_mem_gib=float("inf"))
    return {f"plan.{k}": (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(row).items()
            if k != "fits"}


def format_table(rows: list[RankPlan], best: Optional[RankPlan], gpu_mem_gib: float,
                 activation_checkpointing: bool = True) -> str:
    head = (f"{'layout':<22} {'params':>10} {'param':>8} {'grad':>8} {'optim':>8} {'activ':>8} {'total':>8} "
            f"{'comm/step':>10}  fits {gpu_mem_gib:g} GiB")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "  <- recommended" if best is not None and r.layout == best.layout else ""
        lines.append(f"{r.layout:<22} {r.params / 1e9:>9.2f}B {r.param_gib:>8.1f} {r.grad_gib:>8.1f} "
                     f"{r.optimizer_gib:>8.1f} {r.activation_gib:>8.1f} {r.total_gib:>8.1f} "
                     f"{r.comm_gib_per_step:>10.1f}  {'yes' if r.fits else 'no'}{mark}")
    lines.append("GiB per GPU (busiest rank); comm = GiB each GPU sends per optimizer step.")
    lines.append(f"recommended: {best.layout}" if best else
                 f"nothing fits in {HEADROOM:.0%} of {gpu_mem_gib:g} GiB per GPU: more GPUs, a shorter --seq-len"
                 + ("" if activation_checkpointing else " or train.activation_checkpointing=true"))
    return "\n".join(lines)
