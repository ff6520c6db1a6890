"""Parameter and FLOP accounting for MFU and cost curves.

count_params builds the model on the meta device (no memory), so it cannot drift from the architecture.
flops_per_token counts matmul FLOPs (2 per multiply-add) of one token averaged over a causal sequence of
length L; a query at position t sees t keys (1..L), so dense attention averages (L+1)/2 keys per query and
top-k attention averages mean_t min(k, t).
"""
from __future__ import annotations

from typing import Literal

import torch

from dsaforge.config.model import ModelConfig

Mode = Literal["dense", "warmup", "sparse"]


def count_params(cfg: ModelConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, activated per token). Activated counts the k routed experts a token visits and every other weight
    a token multiplies by (the output head included, the input embedding lookup not). MTP modules are excluded
    unless asked: DeepSeek's 671B / 37B exclude them.

    Built on the meta device with one block of each kind (dense FFN, MoE) and scaled by the layer counts, so it
    reads the real modules yet takes well under a second even for v32.
    """
    from dsaforge.model.moe import MoE
    from dsaforge.model.transformer import Transformer

    n_moe = cfg.n_layers - cfg.n_dense_layers
    probe_dense, probe_moe = min(cfg.n_dense_layers, 1), min(n_moe, 1)
    probe = cfg.model_copy(update={"n_layers": probe_dense + probe_moe, "n_dense_layers": probe_dense,
                                   "n_mtp_layers": min(cfg.n_mtp_layers, 1) if include_mtp else 0})
    with torch.device("meta"):
        model = Transformer(probe)

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def idle(module) -> int:   # routed experts a token does not visit
        return sum((m.n_experts - m.topk) * numel(m.experts[0]) for m in module.modules() if isinstance(m, MoE))

    layers = list(model.layers)
    dense = layers[0] if probe_dense else None
    moe = layers[-1] if probe_moe else None
    total = numel(model.embed) + numel(model.norm) + numel(model.head)
    total += cfg.n_dense_layers * (numel(dense) if dense else 0) + n_moe * (numel(moe) if moe else 0)
    idle_total = n_moe * (idle(moe) if moe else 0)
    if include_mtp and cfg.n_mtp_layers:
        total += cfg.n_mtp_layers * numel(model.mtp[0])
        idle_total += cfg.n_mtp_layers * idle(model.mtp[0])
    return total, total - idle_total - model.embed.weight.numel()


def _mean_keys(seq_len: int, k: int | None) -> float:
    """Average number of keys a query attends to over positions 1..L (all of them, or at most k)."""
    if k is None or k >= seq_len:
        return (seq_len + 1) / 2
    # positions 1..k see t keys, positions k+1..L see k keys
    return (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len


def flops_breakdown(cfg: ModelConfig, seq_len: int, mode: Mode = "dense", training: bool = True) -> dict[str, float]:
    """Forward(+backward) FLOPs per token, by part. Training counts backward as 2x forward for what trains:

    - dense: everything trains except the indexer, which does not run.
    - warmup: backbone forward only (frozen, and the indexer's inputs are detached so no backward reaches it);
      indexer forward + backward over all causal keys.
    - sparse: everything trains; core attention over top-k keys in MQA form; the indexer scores all causal keys
      forward, but its KL backward only touches the selected keys.
    """
    if mode not in ("dense", "warmup", "sparse"):
        raise ValueError(f"mode must be dense, warmup or sparse, got {mode!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    c = cfg
    n_moe = c.n_layers - c.n_dense_layers
    lin = lambda i, o: 2.0 * i * o   # noqa: E731
    attn_proj = (lin(c.dim, c.q_lora_rank) + lin(c.q_lora_rank, c.n_heads * c.qk_head_dim)
                 + lin(c.dim, c.kv_lora_rank + c.qk_rope_head_dim)
                 + lin(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim))   # W_UK, W_UV (either form)
                 + lin(c.n_heads * c.v_head_dim, c.dim))
    ffn_dense = 3 * lin(c.dim, c.inter_dim)
    ffn_moe = ((c.n_activated_experts + c.n_shared_experts) * 3 * lin(c.dim, c.moe_inter_dim)
               + lin(c.dim, c.n_routed_experts))
    head = lin(c.dim, c.vocab_size)
    idx_proj, idx_pair = _indexer_flops(c)
    dense_keys = _mean_keys(seq_len, None)
    if mode == "sparse":
        # absorbed MQA: q.[c;k_pe] (C+R) and p.c (C) for each of the H heads
        keys = _mean_keys(seq_len, c.index_topk)
        core = keys * 2.0 * c.n_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    else:
        # MHA form: q.k (nope+rope) and p.v (v) per head
        keys = dense_keys
        core = keys * 2.0 * c.n_heads * (c.qk_head_dim + c.v_head_dim)
    layers_fwd = (c.n_layers + c.n_mtp_layers) * (attn_proj + core)
    layers_fwd += c.n_dense_layers * ffn_dense + (n_moe + c.n_mtp_layers) * ffn_moe
    mtp_extra = c.n_mtp_layers * (lin(2 * c.dim, c.dim) + head)
    backbone_fwd = layers_fwd + head + mtp_extra
    n_idx_layers = c.n_layers + c.n_mtp_layers
    idx_fwd = n_idx_layers * (idx_proj + dense_keys * idx_pair) if mode != "dense" else 0.0
    if not training:
        return {"backbone": backbone_fwd, "indexer": idx_fwd, "total": backbone_fwd + idx_fwd}
    if mode == "dense":
        backbone, indexer = 3 * backbone_fwd, 0.0
    elif mode == "warmup":
        backbone, indexer = backbone_fwd, 3 * idx_fwd
    else:
        sel = _mean_keys(seq_len, c.index_topk)
        idx_bwd = n_idx_layers * 2 * (idx_proj + sel * idx_pair)
        backbone, indexer = 3 * backbone_fwd, idx_fwd + idx_bwd
    return {"backbone": backbone, "indexer": indexer, "total": backbone + indexer}


def _indexer_flops(c: ModelConfig) -> tuple[float, float]:
    """(projections per token, scoring per (query, key) pair: q.k over heads, then the weighted head sum)."""
    proj = 2.0 * (c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.dim * c.index_head_dim
                  + c.dim * c.index_n_heads)
    return proj, 2.0 * c.index_n_heads * c.index_head_dim + 2.0 * c.index_n_heads


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, mode: Mode = "dense",
                              activation_checkpointing: bool = True, replay_topk: bool = True) -> float:
    """FLOPs per token a training step runs again in backward, on top of `flops_per_token` (for MFU counted with
    recomputation, i.e. the hardware's work):

    - the chunked LM loss recomputes each chunk's logits (one head matmul) wherever the head trains, i.e. not in
      the warm-up, where nothing but the indexer has a gradient and nothing is recomputed;
    - with activation checkpointing every block's forward runs again (not in the warm-up, whose frozen backbone
      carries no graph) up to its last tensor saved for backward: torch's non-reentrant checkpoint stops there, so
      the FFN's final down-projection (the shared expert's in MoE blocks) is not run again. In the sparse mode with
      `replay_topk` the indexer's scores, selection and KL forward are replayed, not recomputed, so only its
      projections run again.
    """
    c = cfg
    head = 2.0 * c.dim * c.vocab_size
    if mode == "warmup":
        return 0.0
    if not activation_checkpointing:
        return head
    fwd = flops_breakdown(cfg, seq_len, mode, training=False)
    blocks = fwd["backbone"] - head - c.n_mtp_layers * head       # every block (main and MTP) forward
    has_moe = c.n_layers > c.n_dense_layers                       # MTP blocks are MoE blocks when the model has any
    n_dense = c.n_dense_layers + (0 if has_moe else c.n_mtp_layers)
    n_moe = c.n_layers + c.n_mtp_layers - n_dense
    blocks -= 2.0 * c.dim * (n_dense * c.inter_dim + n_moe * c.n_shared_experts * c.moe_inter_dim)
    if mode == "sparse":
        proj, _ = _indexer_flops(c)
        blocks += (c.n_layers + c.n_mtp_layers) * proj if replay_topk else fwd["indexer"]
    return head + blocks


def flops_per_token(cfg: ModelConfig, seq_len: int, mode: Mode = "dense", training: bool = True) -> float:
    """Training (or, with training=False, forward/prefill) FLOPs per token at context length seq_len."""
    return flops_breakdown(cfg, seq_len, mode, training)["total"]
