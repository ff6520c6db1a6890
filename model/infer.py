"""The inference forward of the rollout engine: the Transformer's own weights, run with per-row positions over a
slot cache, with no indexer KL and no autograd.

Shapes: N cache slots, B rows in this call (each a slot), S tokens per row (right-padded; row b has n[b] real
ones starting at position start[b]), T visible keys (max over rows of start + S), L the cache's length.
A row's tokens at padded places are written to the cache's spare column L, never to a real position, so a padded
batch can never corrupt another row or a later token of its own row.

Dense mode: MHA form with SDPA for multi-token calls, absorbed MQA for decode. Sparse mode: the lightning indexer
scores the row's visible keys, top-k selects, and sparse MLA attends to the selection (`kernels.sparse_mla` for
prefill, the fused `kernels.sparse_mla_decode` for decode; their torch references on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from dsaforge import kernels
from dsaforge.model.attention import MLA, Indexer
from dsaforge.model.layers import rotate
from dsaforge.model.moe import MoE, grouped_swiglu, use_grouped_mm
from dsaforge.model.transformer import Transformer


@dataclass
class SlotCache:
    """Per layer: the 576-d-style MQA entries [N, L+1, C+R] and indexer keys [N, L+1, Di] (the +1 is the spare
    column padded tokens write to)."""
    kv: list[torch.Tensor]
    index_k: list[Optional[torch.Tensor]]
    max_len: int

    @classmethod
    def allocate(cls, model: Transformer, slots: int, max_len: int, with_indexer: bool) -> "SlotCache":
        cfg, p = model.cfg, model.embed.weight
        kv = [torch.zeros(slots, max_len + 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=p.dtype, device=p.device)
              for _ in range(cfg.n_layers)]
        ik = [torch.zeros(slots, max_len + 1, cfg.index_head_dim, dtype=p.dtype, device=p.device) if with_indexer
              else None for _ in range(cfg.n_layers)]
        return cls(kv, ik, max_len)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv + [k for k in self.index_k if k is not None])


@dataclass
class Capture:
    """What a forward records for the engine, per layer, at every input position."""
    routing: bool = False
    topk: bool = False
    moe_indices: list[torch.Tensor] = field(default_factory=list)     # per MoE layer [B, S, k]
    topk_indices: list[torch.Tensor] = field(default_factory=list)    # per layer [B, S, K] (-1 = empty)


@dataclass
class Step:
    """Per-call constants every layer shares, computed once per forward (not once per layer)."""
    flat_pos: torch.Tensor            # [B*S] row in a cache viewed as [N*(L+1), D]: slot * (L+1) + write column
    visible: torch.Tensor             # [B, S, T] bool key mask of each query
    hidden: torch.Tensor              # ~visible
    cis: torch.Tensor                 # [B, S, R/2] complex64: cos + i sin of each token's position
    all_keys: Optional[torch.Tensor]  # [B, S, T] int32, key where visible else -1: the top-k when T <= top_k


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: bf16 operands stay bf16 on a GPU (fp32 accumulation, `out_dtype`) instead of being
    copied to fp32 first (at batch 64 the copy of every cached key cost more than the product)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _OUT_DTYPE[0]:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):   # a torch without bmm(out_dtype=) on this device: upcast instead
            _OUT_DTYPE[0] = False
    return torch.bmm(a.float(), b.float())


_OUT_DTYPE = [True]


def _rope(x: torch.Tensor, cis: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """`layers.rotate` with one angle per row and token: x [B, S, ..., R], cis [B, S, R/2]."""
    return rotate(x, cis.view(cis.shape[:2] + (1,) * (x.dim() - 3) + cis.shape[-1:]), interleaved)


def _index_rope(ix: Indexer, t: torch.Tensor, cis) -> torch.Tensor:
    pe, nope = t.split([ix.rope_dim, ix.head_dim - ix.rope_dim], dim=-1)
    return ix._numerics(torch.cat((_rope(pe, cis, interleaved=False), nope), dim=-1))


def index_keys(ix: Indexer, x: torch.Tensor, cis) -> torch.Tensor:
    """Indexer.keys with per-row positions: x [B, S, dim] -> [B, S, Di]. (layer_norm computes its statistics in
    fp32 for bf16 input, as Indexer.keys does after its explicit upcast.)"""
    k = F.layer_norm(ix.wk(x), (ix.head_dim,), ix.k_norm.weight, ix.k_norm.bias, ix.k_norm.eps)
    return _index_rope(ix, k, cis)


def index_queries(ix: Indexer, x: torch.Tensor, qr: torch.Tensor, cis) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer.queries with per-row positions -> q [B, S, Hi, Di], w [B, S, Hi] fp32."""
    b, s, _ = x.shape
    q = _index_rope(ix, ix.wq_b(qr).view(b, s, ix.n_heads, ix.head_dim), cis)
    w = F.linear(x.float(), ix.weights_proj.weight.float()) * (ix.n_heads * ix.head_dim) ** -0.5
    return q, w


def _write(cache: torch.Tensor, step: Step, x: torch.Tensor) -> None:
    """Write x [B, S, D] at each token's cache column (one index_copy_ over the flattened cache)."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, step.flat_pos, x.reshape(-1, x.shape[-1]).to(cache.dtype))


def mla_infer(attn: MLA, x: torch.Tensor, step: Step, kv_cache: torch.Tensor, ik_cache: Optional[torch.Tensor],
              rows: Optional[torch.Tensor], t: int, mode: str, top_k: int, capture: Optional[Capture]) -> torch.Tensor:
    """x [B, S, dim] (attn_norm output) -> [B, S, dim].

    rows [B] slot of each row (None: rows are slots 0..B-1, read as views)."""
    b, s, _ = x.shape
    qr = attn.q_norm(attn.wq_a(x))
    q_nope, q_pe = attn.wq_b(qr).view(b, s, attn.n_heads, -1).split([attn.nope, attn.rope], dim=-1)
    q_pe = _rope(q_pe, step.cis, interleaved=True)
    c, k_pe = attn.wkv_a(x).split([attn.kv_lora_rank, attn.rope], dim=-1)
    _write(kv_cache, step, torch.cat((attn.kv_norm(c), _rope(k_pe, step.cis, interleaved=True)), dim=-1))
    need_index = mode == "sparse" or (capture is not None and capture.topk)
    if need_index:   # the keys are cached even when this call selects every key: later, longer calls need them
        _write(ik_cache, step, index_keys(attn.indexer, x, step.cis))
    kv_all = kv_cache[:b, :t] if rows is None else kv_cache[rows, :t]                          # [B, T, C+R]

    indices = None
    if need_index and step.all_keys is not None:
        indices = step.all_keys          # no more visible keys than top_k: the selection is all of them (exact)
    elif need_index:
        k_all = ik_cache[:b, :t] if rows is None else ik_cache[rows, :t]                        # [B, T, Di]
        q_i, w_i = index_queries(attn.indexer, x, qr, step.cis)
        if s > 1:
            scores = kernels.indexer_scores(q_i, k_all.to(q_i.dtype), w_i, causal=False)
        else:   # one query per row: two batched products (no per-row launches; CUDA-graph friendly)
            per_head = bmm_f32(q_i[:, 0], k_all.transpose(1, 2)).relu_()                        # [B, Hi, T]
            scores = torch.bmm(w_i, per_head)                                                   # [B, 1, T]
        scores = scores.masked_fill(step.hidden, float("-inf"))                                 # [B, S, T]
        indices = kernels.topk_indices(scores.contiguous(), top_k)                              # [B, S, K]
    if indices is not None and capture is not None and capture.topk:
        short = top_k - indices.shape[-1]        # fewer visible keys than top_k: pad with empty slots
        capture.topk_indices.append(F.pad(indices, (0, short), value=-1) if short > 0 else indices)

    if mode == "sparse":
        q_lat = attn._mqa_query(q_nope, q_pe)                                                   # [B, S, H, C+R]
        if s == 1:
            o_lat, _ = kernels.sparse_mla_decode(q_lat, kv_all, indices, attn.softmax_scale, attn.kv_lora_rank)
        else:
            o_lat, _ = kernels.sparse_mla(q_lat, kv_all, indices, attn.softmax_scale, attn.kv_lora_rank)
        o = torch.einsum("bshc,hvc->bshv", o_lat, attn._absorb_weights()[1])
    elif s == 1:
        q_lat = attn._mqa_query(q_nope, q_pe)[:, 0]                                            # [B, H, C+R]
        logits = bmm_f32(q_lat, kv_all.transpose(1, 2)).mul_(attn.softmax_scale)               # [B, H, T]
        probs = logits.masked_fill_(step.hidden, float("-inf")).softmax(-1)
        o_lat = torch.bmm(probs.to(kv_all.dtype), kv_all[..., :attn.kv_lora_rank])            # [B, H, C]
        o = torch.einsum("bhc,hvc->bhv", o_lat, attn._absorb_weights()[1])[:, None]
    else:
        o, _ = attn._mha(q_nope, q_pe, kv_all, step.visible, need_probs=False)
    return attn.wo(o.flatten(2))


@dataclass
class Experts:
    """A MoE layer's routed experts stacked once (torch._grouped_mm's layout): w1, w3 [E', I, dim], w2 [E', dim, I],
    where E' = E + 1 when the shared expert has the routed experts' shape (it rides along as expert E in
    `all_experts`)."""
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    n_routed: int

    @property
    def with_shared(self) -> bool:
        return self.w1.shape[0] > self.n_routed


def all_experts(flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, ex: Experts) -> torch.Tensor:
    """The routed experts (and the shared one, if stacked) in dense form for a few tokens: every token through every
    expert as three batched products over the stacked weights, each expert's output scaled by its mixing weight
    (0 where not chosen) and summed. No sort, count or scatter of token slots: once a batch touches most experts,
    reading every expert's weights costs what the grouped product reads anyway, in 8 kernels instead of ~25.
    flat [N, dim], weights / indices [N, k] -> [N, dim]."""
    n, d = flat.shape
    e, i = ex.w1.shape[:2]
    gate = torch.zeros(n, e, dtype=flat.dtype, device=flat.device).scatter_(1, indices, weights.to(flat.dtype))
    if ex.with_shared:
        gate[:, ex.n_routed] = 1
    a = F.linear(flat, ex.w1.view(e * i, d))                                        # [N, E'*I]
    b = F.linear(flat, ex.w3.view(e * i, d))
    h = (F.silu(a) * b).view(n, e, i) * gate[:, :, None]                            # [N, E', I]
    return torch.bmm(h.transpose(0, 1), ex.w2.transpose(1, 2)).sum(0, dtype=torch.float32).to(flat.dtype)


def moe_infer(moe: MoE, x: torch.Tensor, ex: Optional[Experts]) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE.forward without load counting or aux loss, and without host syncs when stacked expert weights `ex` are
    given and N*k <= 16E: routable inside a CUDA graph. A few tokens that touch most experts (2E <= N*k <= 16E: a
    decode step over many rows) take `all_experts`, others the grouped product over token slots sorted by expert
    (bf16 on Hopper, torch._grouped_mm); where that product is unavailable (fp32), every N*k <= 16E takes
    `all_experts` and larger calls the per-expert loop of `MoE.routed` (eager: it reads counts back)."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    weights, indices, _ = moe.gate(flat)
    n_pairs, e = flat.shape[0] * moe.topk, moe.n_experts
    grouped = ex is not None and use_grouped_mm(flat)
    if ex is not None and n_pairs <= 16 * e and (n_pairs >= 2 * e or not grouped):
        y = all_experts(flat, weights, indices, ex)
        if moe.shared_experts is not None and not ex.with_shared:
            y = y + moe.shared_experts(flat)
        return y.view(b, s, d), indices.view(b, s, moe.topk)
    if grouped:
        counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(
            0, indices.flatten(), torch.ones_like(indices.flatten()))
        order = indices.flatten().argsort(stable=True)
        token = order // moe.topk
        y_sorted = grouped_swiglu(flat[token], counts, ex.w1[:e], ex.w3[:e], ex.w2[:e])
        y = torch.zeros_like(flat).index_add_(0, token, y_sorted * weights.flatten()[order, None])
    else:
        counts = torch.bincount(indices.flatten(), minlength=e)
        y = moe.routed(flat, weights, indices, counts)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(b, s, d), indices.view(b, s, moe.topk)


def stack(moe: MoE) -> Experts:
    """`moe`'s experts stacked (a copy), the shared expert appended when it has the routed experts' shape."""
    experts = list(moe.experts)
    shared = moe.shared_experts
    if shared is not None and shared.w1.weight.shape == experts[0].w1.weight.shape:
        experts.append(shared)
    w1, w3, w2 = (torch.stack([getattr(m, n).weight for m in experts]).contiguous() for n in ("w1", "w3", "w2"))
    return Experts(w1, w3, w2, moe.n_experts)


def stack_experts(model: Transformer) -> list[Optional[Experts]]:
    """Per layer, the experts stacked once for torch._grouped_mm and `all_experts` (on a GPU; None on CPU, where
    nothing is captured and the per-expert loop serves). Re-run after the weights change (an RL step)."""
    return [stack(b.ffn) if isinstance(b.ffn, MoE) and b.ffn.experts[0].w1.weight.is_cuda else None
            for b in model.layers]


@torch.no_grad()
def forward_rows(model: Transformer, cache: SlotCache, tokens: torch.Tensor, start: torch.Tensor,
                 n: torch.Tensor, rows: Optional[torch.Tensor], mode: str, stacked: list,
                 capture: Optional[Capture] = None, t: Optional[int] = None,
                 last_only: bool = True) -> torch.Tensor:
    """Run tokens [B, S] (row b: n[b] real tokens at positions start[b]...) through the model, writing their cache
    entries, and return logits [B, V] at each row's last real token (last_only) or [B, S, V].

    t: visible keys (>= max(start + n)); pass it to keep shapes static (decode under a CUDA graph)."""
    b, s = tokens.shape
    dev = tokens.device
    offs = torch.arange(s, device=dev)
    pos = start[:, None] + offs[None]                                                  # [B, S]
    real = offs[None] < n[:, None]
    write_pos = torch.where(real, pos, cache.max_len)
    if t is None:
        t = int((start + n).max())
    cos_all, sin_all = model.rope(dev)
    ang = pos.clamp_max(cos_all.shape[0] - 1)
    slot = rows if rows is not None else torch.arange(b, device=dev)
    visible = torch.arange(t, device=dev)[None, None] <= pos[:, :, None]               # [B, S, T]
    top_k = model.cfg.index_topk
    step = Step(flat_pos=(slot[:, None] * (cache.max_len + 1) + write_pos).flatten(), visible=visible,
                hidden=~visible, cis=torch.complex(cos_all[ang], sin_all[ang]),
                all_keys=torch.where(visible, torch.arange(t, device=dev, dtype=torch.int32), -1) if t <= top_k
                else None)
    h = model.embed(tokens)
    for i, block in enumerate(model.layers):
        a = mla_infer(block.attn, block.attn_norm(h), step, cache.kv[i], cache.index_k[i], rows, t, mode,
                      top_k, capture)
        h = h + a
        if isinstance(block.ffn, MoE):
            f, idx = moe_infer(block.ffn, block.ffn_norm(h), stacked[i])
            if capture is not None and capture.routing:
                capture.moe_indices.append(idx)
        else:
            f = block.ffn(block.ffn_norm(h))
        h = h + f
    if last_only:
        h = h.gather(1, (n - 1).clamp_min(0)[:, None, None].expand(b, 1, h.shape[-1]))[:, 0]   # [B, dim]
    return model.head(model.norm(h)).float()
