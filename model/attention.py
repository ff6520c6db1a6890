"""MLA with DSA: the lightning indexer, top-k selection, MHA and absorbed-MQA forms, the indexer KL, the KV cache.

Shapes: B batch, S queries in this call, T = start_pos + S visible positions, H heads, Hi indexer heads,
C = kv_lora_rank, R = qk_rope_head_dim, K = index_topk. Queries are the last S of T positions (the kernels'
convention), so one [B, S, T] boolean `allowed` mask (causal, and same segment when documents are packed) serves
every mode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsaforge import kernels
from dsaforge.kernels import causal_mask
from dsaforge.config.model import ModelConfig
from dsaforge.model.layers import RMSNorm, apply_rope, fp8_block_quant, hadamard, yarn_softmax_scale

Mode = Literal["dense", "warmup", "sparse"]
Form = Literal["mha", "mqa"]


class LayerCache:
    """One layer's inference state: the 576-d MQA entry [c_kv (C, RMS-normed latent), k_pe (R, rotated)] and the
    indexer key (after RoPE, and Hadamard/FP8 when enabled), each [B, max_len, *]."""

    def __init__(self, batch_size: int, max_len: int, cfg: ModelConfig, dtype, device):
        self.kv = torch.zeros(batch_size, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.index_k = torch.zeros(batch_size, max_len, cfg.index_head_dim, dtype=dtype, device=device)

    def update(self, start: int, kv: torch.Tensor, index_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions [start, start+S) and return all T visible entries: views of the cache in inference, so a
        sparse decode step touches only what its kernels read. When gradients are on, the new chunk is returned live
        (not re-read from the cache) so they still reach this call's keys."""
        b, s = kv.shape[:2]
        self.kv[:b, start:start + s] = kv.detach().to(self.kv.dtype)
        self.index_k[:b, start:start + s] = index_k.detach().to(self.index_k.dtype)
        if not (torch.is_grad_enabled() and (kv.requires_grad or index_k.requires_grad)):
            return self.kv[:b, :start + s], self.index_k[:b, :start + s]
        kv_all = torch.cat((self.kv[:b, :start].to(kv.dtype), kv), dim=1)                      # [B, T, C+R]
        k_all = torch.cat((self.index_k[:b, :start].to(index_k.dtype), index_k), dim=1)        # [B, T, Di]
        return kv_all, k_all


@dataclass
class AttnContext:
    """Per-call settings shared by every layer."""
    mode: Mode
    start_pos: int
    allowed: Optional[torch.Tensor]  # [B|1, S, T] bool: causal & same segment; None = plain causal (built lazily)
    top_k: int
    form: Optional[Form] = None      # None: MHA for multi-token dense/warmup calls, MQA otherwise
    cache: Optional[LayerCache] = None
    # Long-context path: top-k and the indexer KL through the kernels' fused entry points (no [S, T] scores).
    fused: bool = False
    cu_seqlens: Optional[torch.Tensor] = None   # [N+1] document starts for a packed B == 1 row (fused path)
    # Sparse mode under activation checkpointing: the forward leaves its top-k indices and indexer-KL results here,
    # and the recomputation takes them back instead of computing them again.
    replay: Optional[dict] = None


class AbsorbedQuery(torch.autograd.Function):
    """MLA's absorbed query [B, S, H, C+R] = [q_nope W_UK, rope(q_pe)] from q [B, S, H, nope+R], written in place:
    the head-batched product straight into the first C columns (a strided output, which cuBLAS takes as is) and the
    rotation into the last R, where the einsum-and-cat form wrote both and then copied them together (at 128 heads
    and 64K tokens a 9.7 GiB copy per pass). The backward writes dq the same way."""

    @staticmethod
    def forward(ctx, q, w_uk, cos, sin):
        b, s, h, d = q.shape
        nope, c = w_uk.shape[1:]
        with torch.autocast(q.device.type, enabled=False):
            w = w_uk.to(q.dtype)                                                   # [H, nope, C]
            out = torch.empty(b, s, h, c + d - nope, device=q.device, dtype=q.dtype)
            torch.bmm(_heads_first(q)[..., :nope], w, out=_heads_first(out)[..., :c])
            kernels.rope_into(out[..., c:], q[..., nope:], cos, sin, interleaved=True)
        ctx.save_for_backward(q, w, cos, sin)
        ctx.w_dtype = w_uk.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        q, w, cos, sin = ctx.saved_tensors
        nope, c = w.shape[1:]
        g = g.contiguous()
        dq = dw = None
        with torch.autocast(q.device.type, enabled=False):
            g = g.to(q.dtype)
            if ctx.needs_input_grad[0]:
                dq = torch.empty_like(q, memory_format=torch.contiguous_format)
                torch.bmm(_heads_first(g)[..., :c], w.transpose(1, 2), out=_heads_first(dq)[..., :nope])
                kernels.rope_into(dq[..., nope:], g[..., c:], cos, sin, interleaved=True, inverse=True)
            if ctx.needs_input_grad[1]:
                dw = torch.bmm(_heads_first(q)[..., :nope].transpose(1, 2), _heads_first(g)[..., :c]).to(ctx.w_dtype)
        return dq, dw, None, None


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[B, S, H, X] contiguous -> the [H, B*S, X] view (no copy)."""
    return t.view(-1, t.shape[2], t.shape[3]).transpose(0, 1)


def indexer_kl(p: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(p || softmax(logits)) over the valid entries of each row.

    p [B, S, N] non-negative attention mass (head-summed; L1-normalised here), logits [B, S, N] indexer scores,
    valid [B, S, N]. The paper sums over t; we average so the value does not grow with sequence length.
    """
    rows = valid.any(-1)                                                            # [B, S]
    p = p.float().masked_fill(~valid, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-10)
    # Rows with nothing valid would make log_softmax NaN (and its backward); give them finite logits.
    logits = torch.where(rows[..., None], logits.float().masked_fill(~valid, float("-inf")), 0.0)
    logq = torch.log_softmax(logits, dim=-1).masked_fill(~valid, 0.0)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), 0.0).sum(-1)   # [B, S]
    return kl[rows].sum() / rows.sum().clamp_min(1)


class Indexer(nn.Module):
    """DSA's lightning indexer: I[t,s] = sum_j w[t,j] * relu(q[t,j] . k[s]), one key shared by all Hi heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.use_hadamard, self.use_fp8 = cfg.index_hadamard, cfg.index_fp8
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.dim, self.n_heads, bias=False)   # run in fp32, as the reference does

    def _rope_first(self, t: torch.Tensor, cos, sin) -> torch.Tensor:
        # The rope slice comes FIRST here ([pe, nope]; MLA's q is [nope, pe]) and is NOT interleaved.
        pe, nope = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(pe, cos, sin, interleaved=False), nope), dim=-1)

    def _numerics(self, t: torch.Tensor) -> torch.Tensor:
        if self.use_hadamard:
            t = hadamard(t)
        if self.use_fp8:
            t = fp8_block_quant(t)
        return t

    def keys(self, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """x [B, S, dim] -> k [B, S, Di]."""
        k = self.wk(x)
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(),
                         self.k_norm.eps).to(k.dtype)
        return self._numerics(self._rope_first(k, cos, sin))

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, dim], qr [B, S, q_lora] (MLA's query latent) -> q [B, S, Hi, Di], w [B, S, Hi] (fp32)."""
        b, s, _ = x.shape
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = self._numerics(self._rope_first(q, cos, sin))
        # Hi^-1/2 and the dot-product scale Di^-1/2 are folded into the head weights (both are positive, so they
        # commute with the ReLU); this is where an FP8 kernel also folds q's per-head scale.
        w = F.linear(x.float(), self.weights_proj.weight.float()) * (self.n_heads * self.head_dim) ** -0.5
        return q, w

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos, sin, k: torch.Tensor) -> torch.Tensor:
        """Index scores [B, S, T] in fp32 against keys k [B, T, Di]; future keys are -inf."""
        q, w = self.queries(x, qr, cos, sin)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or w.requires_grad):
            # The fused score kernel has no backward; the materialised KL needs d(scores), so take the
            # kernels' differentiable torch reference (the fused path trains through kernels.indexer_kl instead).
            return kernels.reference.indexer_scores(q, k, w)
        return kernels.indexer_scores(q, k, w)


class MLA(nn.Module):
    """Multi-head latent attention with DSA. MHA form expands the latent into per-head keys/values (training,
    prefill); MQA form absorbs W_UK into the query and W_UV into the output so every head reads one shared
    [C+R] entry per token (decode, and the form DSA's sparse attention is defined in)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_lora_rank = cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.q_lora_rank)       # eps 1e-6 fixed, as in the reference and HF
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg)
        self.softmax_scale = yarn_softmax_scale(cfg)

    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]                                  # W_UK [H, nope, C], W_UV [H, v, C]

    def _mha(self, q_nope, q_pe, kv_all, mask, need_probs):
        """Per-head keys/values from the latent. Returns o [B, S, H, v] and probs [B, S, H, T] (or None)."""
        b, t, _ = kv_all.shape
        c, k_pe = kv_all.split([self.kv_lora_rank, self.rope], dim=-1)
        k_nope, v = self.wkv_b(c).view(b, t, self.n_heads, self.nope + self.v_dim).split([self.nope, self.v_dim], -1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(b, t, self.n_heads, self.rope)), dim=-1)   # [B, T, H, qk]
        q = torch.cat((q_nope, q_pe), dim=-1)                                                       # [B, S, H, qk]
        s = q.shape[1]
        if not need_probs:
            # Plain causal over the whole sequence needs no mask tensor (flash kernels on GPU).
            causal = mask is None and s == t
            if mask is None and not causal:
                mask = causal_mask(s, t, q.device)[None]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=None if causal else mask[:, None], is_causal=causal,
                                               scale=self.softmax_scale)
            return o.transpose(1, 2), None
        if mask is None:
            mask = causal_mask(s, t, q.device)[None]
        logits = torch.einsum("bshd,bthd->bsht", q.float(), k.float()) * self.softmax_scale
        probs = logits.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)                   # [B, S, H, T]
        o = probs.to(v.dtype).transpose(1, 2) @ v.transpose(1, 2)                                   # [B, H, S, v]
        return o.transpose(1, 2), probs

    def _mqa_query(self, q_nope, q_pe):
        w_uk, _ = self._absorb_weights()
        return torch.cat((torch.einsum("bshn,hnc->bshc", q_nope, w_uk), q_pe), dim=-1)            # [B, S, H, C+R]

    def _mqa(self, q_lat, kv_all, mask):
        """Dense attention in absorbed form. Returns latent output [B, S, H, C] and probs [B, S, H, T]."""
        logits = torch.einsum("bshd,btd->bsht", q_lat.float(), kv_all.float()) * self.softmax_scale
        probs = logits.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
        return torch.einsum("bsht,btc->bshc", probs.to(kv_all.dtype), kv_all[..., :self.kv_lora_rank]), probs

    def _selected_mass(self, q_lat, kv_all, indices, lse):
        """Head-summed attention probability at each selected key, [B, S, K] (the sparse-stage KL target)."""
        b, s, k = indices.shape
        safe = indices.clamp_min(0).long()
        kv_sel = torch.gather(kv_all[:, None].expand(b, s, *kv_all.shape[1:]), 2,
                              safe[..., None].expand(b, s, k, kv_all.shape[-1]))                  # [B, S, K, C+R]
        logits = torch.einsum("bshd,bskd->bshk", q_lat.float(), kv_sel.float()) * self.softmax_scale
        p = torch.exp(logits - lse[..., None].float()).sum(2)                                      # [B, S, K]
        return p.masked_fill(indices < 0, 0.0)

    @staticmethod
    def _replayed(ctx: AttnContext, select) -> torch.Tensor:
        """The top-k indices: selected now, or, in a recomputation, the ones the forward selected."""
        if ctx.replay is None:
            return select()
        if "indices" not in ctx.replay:
            ctx.replay["indices"] = select()
        return ctx.replay["indices"]

    @torch.no_grad()
    def _dense_lse(self, q_lat, kv_all, allowed, cu_seqlens):
        """LSE [B, S, H] of dense absorbed-form attention (the warm-up KL target is recomputed from it), so neither
        [B, S, H, T] probabilities nor an [S, T] mask are ever held: the kernel for causal rows and documents, the
        blockwise torch form for an explicit [B|1, S, T] mask."""
        if allowed is None:
            return kernels.attention_lse(q_lat, kv_all, self.softmax_scale, self.kv_lora_rank, cu_seqlens)
        return kernels.reference.attention_lse(q_lat, kv_all, self.softmax_scale, allowed=allowed)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttnContext) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B, S, dim] (attn_norm output) -> (out [B, S, dim], indexer KL or None)."""
        b, s, _ = x.shape
        qr = self.q_norm(self.wq_a(x))                                                 # [B, S, q_lora]
        q = self.wq_b(qr).view(b, s, self.n_heads, -1)                                 # [B, S, H, nope+R]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        fused_sparse = ctx.mode == "sparse" and ctx.fused and ctx.form != "mha"
        if not fused_sparse:      # the fused sparse path rotates q_pe inside AbsorbedQuery
            q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        c, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = torch.cat((self.kv_norm(c), apply_rope(k_pe, cos, sin, interleaved=True)), dim=-1)   # [B, S, C+R]

        use_indexer = ctx.mode != "dense" or ctx.cache is not None
        if use_indexer:
            # Detached inputs: the indexer learns only from its KL, and its KL never moves the backbone.
            x_i, qr_i = x.detach(), qr.detach()
            k_idx = self.indexer.keys(x_i, cos, sin)                                   # [B, S, Di]
        kv_all = kv
        if ctx.cache is not None:
            kv_all, k_idx = ctx.cache.update(ctx.start_pos, kv, k_idx)                # [B, T, C+R], [B, T, Di]
        t = kv_all.shape[1]
        mask = ctx.allowed                                                             # [B|1, S, T] or None
        if mask is not None and mask.shape[-1] != t:
            raise ValueError(f"attention mask covers {mask.shape[-1]} keys but {t} are visible")

        def full_mask() -> torch.Tensor:   # the [B|1, S, T] mask, built only by the paths that need one
            return mask if mask is not None else causal_mask(s, t, x.device)[None]

        kl = None
        if fused_sparse:
            # Same math as below without materialising the [B, S, T] index scores: the kernels select top-k
            # chunk by chunk and recompute the KL target from (q_lat, kv, lse). Single-rank heads only: the
            # tensor-parallel head reduction hooks `indexer_kl` below, which this path does not call.
            q_i, w_i = self.indexer.queries(x_i, qr_i, cos, sin)                       # [B,S,Hi,Di], [B,S,Hi]
            indices = self._replayed(ctx, lambda: kernels.indexer_topk(
                q_i.detach(), k_idx.detach().to(q_i.dtype), w_i.detach(), ctx.top_k,
                cu_seqlens=ctx.cu_seqlens))                                            # [B, S, K]
            q_lat = AbsorbedQuery.apply(q, self._absorb_weights()[0], cos, sin)       # [B, S, H, C+R]
            # The KL target comes out of the attention's forward (its own probabilities, no second pass over the
            # selected rows); a recomputation takes the forward's back. DSAFORGE_FUSED_TARGET=0 measures the
            # separate target kernel instead.
            mass = None if ctx.replay is None else ctx.replay.get("target")
            with_target = mass is None and os.environ.get("DSAFORGE_FUSED_TARGET", "1") != "0"
            o_lat, lse, *fresh = kernels.sparse_mla(q_lat, kv_all, indices, self.softmax_scale, self.kv_lora_rank,
                                                    target=with_target)
            if fresh:
                mass = fresh[0]                                                        # [B, S, K] fp32
                if ctx.replay is not None:
                    ctx.replay["target"] = mass     # the same tensor the KL's memo holds: no extra memory
            o = torch.einsum("bshc,hvc->bshv", o_lat, self._absorb_weights()[1])
            kl = kernels.indexer_kl(q_i, k_idx.to(q_i.dtype), w_i, q_lat.detach(), kv_all.detach(), lse.detach(),
                                    self.softmax_scale, self.kv_lora_rank, indices=indices, cu_seqlens=ctx.cu_seqlens,
                                    memo=None if ctx.replay is None else ctx.replay.setdefault("kl", {}),
                                    target=mass).mean()                                # every row sees itself
        elif ctx.mode == "sparse":
            mask = full_mask()
            scores = self.indexer(x_i, qr_i, cos, sin, k_idx).masked_fill(~mask, float("-inf"))   # [B, S, T]
            indices = self._replayed(ctx, lambda: kernels.topk_indices(scores.detach(), ctx.top_k))  # [B,S,K]; -1 empty
            if (ctx.form or "mqa") == "mqa":
                q_lat = self._mqa_query(q_nope, q_pe)
                o_lat, lse = kernels.sparse_mla(q_lat, kv_all, indices, self.softmax_scale, self.kv_lora_rank)
                o = torch.einsum("bshc,hvc->bshv", o_lat, self._absorb_weights()[1])
                p_sel = self._selected_mass(q_lat.detach(), kv_all.detach(), indices, lse.detach())
            else:   # masked MHA: dense math restricted to the selected keys (cheaper for short prefill)
                # Empty slots (-1) point at a spare column T that is dropped, so they never unselect key 0.
                slot = torch.where(indices >= 0, indices, t).long()
                selected = scores.new_zeros(*scores.shape[:-1], t + 1, dtype=torch.bool).scatter_(
                    -1, slot, True)[..., :t]                                           # [B, S, T]
                o, probs = self._mha(q_nope, q_pe, kv_all, mask & selected, need_probs=True)
                p_sel = probs.detach().sum(2).gather(-1, indices.clamp_min(0).long())
            kl = indexer_kl(p_sel, scores.gather(-1, indices.clamp_min(0).long()), indices >= 0)
        else:
            warmup = ctx.mode == "warmup"
            fused = warmup and ctx.fused
            if (ctx.form or ("mha" if s > 1 else "mqa")) == "mha":
                o, probs = self._mha(q_nope, q_pe, kv_all, mask, need_probs=warmup and not fused)
            else:
                o_lat, probs = self._mqa(self._mqa_query(q_nope, q_pe), kv_all, full_mask())
                o = torch.einsum("bshc,hvc->bshv", o_lat, self._absorb_weights()[1])
            if fused:
                # Target recomputed by the kernel from (q_lat, kv, lse): no [B, S, H, T] probabilities held.
                q_i, w_i = self.indexer.queries(x_i, qr_i, cos, sin)
                q_lat = self._mqa_query(q_nope, q_pe).detach()
                lse = self._dense_lse(q_lat, kv_all.detach(), mask, ctx.cu_seqlens)
                kl = kernels.indexer_kl(q_i, k_idx.to(q_i.dtype), w_i, q_lat, kv_all.detach(), lse,
                                        self.softmax_scale, self.kv_lora_rank, cu_seqlens=ctx.cu_seqlens).mean()
            elif warmup:
                scores = self.indexer(x_i, qr_i, cos, sin, k_idx)                      # [B, S, T]
                kl = indexer_kl(probs.detach().sum(2), scores, full_mask().expand_as(scores))
        return self.wo(o.flatten(2)), kl
