"""Pure-torch references for the DSA kernels: the CPU fallback and the test oracle.

Layouts (the contract every fused kernel in this package keeps):
- indexer q `[B, S, Hi, D]`, indexer k `[B, T, D]` (one key shared by all indexer heads), head weights w `[B, S, Hi]`.
- MLA in MQA (absorbed) form: q `[B, S, H, Dqk]`, one shared latent KV entry per token kv `[B, T, Dqk]`,
  Dqk = kv_lora_rank + qk_rope_head_dim; the value is the latent part kv[..., :d_v] (d_v = kv_lora_rank).
- Queries are the last S of T positions: query s sits at absolute position (T - S) + s and may see keys <= it.
- indices `[B, S, K]` int32, -1 marks an empty slot (fewer than K visible keys); LSE in natural log, fp32.
"""
from __future__ import annotations

import torch


def causal_mask(s: int, t: int, device=None) -> torch.Tensor:
    """[S, T] bool, True where query s may see key t (queries are the last S of T positions)."""
    q_pos = torch.arange(t - s, t, device=device)[:, None]
    return torch.arange(t, device=device)[None, :] <= q_pos


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """I[b,s,t] = sum_j w[b,s,j] * relu(q[b,s,j] . k[b,t]) in fp32; future keys get -inf when causal."""
    scores = torch.einsum("bshd,btd->bsht", q.float(), k.float()).relu_()       # [B, S, Hi, T]
    scores = torch.einsum("bsht,bsh->bst", scores, w.float())                   # [B, S, T]
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    return scores


def topk_indices(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, S, K] int32 indices of the K largest scores per row (ties: lower index first); -inf slots become -1."""
    k = min(top_k, scores.shape[-1])
    # A stable descending sort makes ties deterministic (lower key index wins), matching the fused kernels.
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :k], idx[..., :k]
    return torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx).to(torch.int32)


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
               d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected latent entries only. Returns (out [B,S,H,d_v], lse [B,S,H])."""
    b, s, h, d = q.shape
    valid = indices >= 0                                                         # [B, S, K]
    safe = indices.clamp_min(0).long()
    gathered = torch.gather(kv[:, None].expand(b, s, *kv.shape[1:]), 2,
                            safe[..., None].expand(*safe.shape, d))              # [B, S, K, Dqk]
    logits = torch.einsum("bshd,bskd->bshk", q.float(), gathered.float()) * sm_scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                                        # [B, S, H]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)                   # rows with no key give 0
    out = torch.einsum("bshk,bskd->bshd", probs, gathered[..., :d_v].float())
    return out.to(q.dtype), lse
