"""Pure-torch references for the DSA kernels: the CPU fallback and the test oracle.

Layouts (the contract every fused kernel in this package keeps):
- indexer q `[B, S, Hi, D]`, indexer k `[B, T, D]` (one key shared by all indexer heads), head weights w `[B, S, Hi]`.
- MLA in MQA (absorbed) form: q `[B, S, H, Dqk]`, one shared latent KV entry per token kv `[B, T, Dqk]`,
  Dqk = kv_lora_rank + qk_rope_head_dim; the value is the latent part kv[..., :d_v] (d_v = kv_lora_rank).
- Queries are the last S of T positions: query s sits at absolute position (T - S) + s and may see keys <= it.
- indices `[B, S, K]` int32, -1 marks an empty slot (fewer than K visible keys); LSE in natural log, fp32.
"""
from __future__ import annotations

import functools

import torch


def fp32_math(fn):
    """Run a reference in the precision it states: autocast would silently turn its fp32 einsums into bf16."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def causal_mask(s: int, t: int, device=None) -> torch.Tensor:
    """[S, T] bool, True where query s may see key t (queries are the last S of T positions)."""
    q_pos = torch.arange(t - s, t, device=device)[:, None]
    return torch.arange(t, device=device)[None, :] <= q_pos


@fp32_math
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


@fp32_math
def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
               d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected latent entries only. Returns (out [B,S,H,d_v], lse [B,S,H])."""
    b, s, h, d = q.shape
    valid = indices >= 0                                                         # [B, S, K]
    safe = indices.clamp_min(0).long()
    gathered = torch.gather(kv[:, None].expand(b, s, *kv.shape[1:]), 2,
                            safe[..., None].expand(*safe.shape, d))              # [B, S, K, Dqk]
    logits = torch.einsum("bshd,bskd->bshk", q.float(), gathered.float()) * sm_scale
    # Rows with no valid key give out 0 and lse -inf; they are computed on zeros so that no NaN reaches autograd.
    empty = ~valid.any(-1)[:, :, None, None]                                     # [B, S, 1, 1]
    logits = logits.masked_fill(~valid[:, :, None, :] & ~empty, float("-inf")).masked_fill(empty, 0.0)
    lse = torch.logsumexp(logits, dim=-1)                                        # [B, S, H]
    probs = torch.exp(logits - lse[..., None]) * valid[:, :, None, :]
    lse = lse.masked_fill(empty[..., 0], float("-inf"))
    out = torch.einsum("bshk,bskd->bshd", probs, gathered[..., :d_v].float())
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------------------------------------------
# Extensions used by the fused kernels' tests: FP8 indexer simulation, varlen bounds, indexer KL, sparse decode.


def key_bounds(s: int, t: int, cu_seqlens: torch.Tensor | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row the visible key range [start, end) (int32 [S] each), causal.

    Without cu_seqlens the queries are the last S of T positions (one sequence). With cu_seqlens (int [N+1],
    packed sequences, S == T) query s sees keys from its document's start up to and including itself.
    """
    pos = torch.arange(t - s, t, device=device, dtype=torch.int64)
    end = pos + 1
    if cu_seqlens is None:
        start = torch.zeros_like(pos)
    else:
        if s != t:
            raise ValueError(f"packed sequences need S == T, got S={s}, T={t}")
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        doc = torch.searchsorted(cu, pos, right=True) - 1                          # [S] document of each row
        start = cu[doc]
    return start.to(torch.int32), end.to(torch.int32)


def bounds_mask(start: torch.Tensor, end: torch.Tensor, t: int) -> torch.Tensor:
    """[S, T] bool from per-row [start, end)."""
    ar = torch.arange(t, device=start.device)[None, :]
    return (ar >= start[:, None].long()) & (ar < end[:, None].long())


@torch.no_grad()
def attention_lse(q: torch.Tensor, kv: torch.Tensor, sm_scale: float, start: torch.Tensor | None = None,
                  end: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                  budget: int = 1 << 26) -> torch.Tensor:
    """[B,S,H] fp32 LSE of absorbed-form attention softmax(sm_scale * q . kv) over the keys each query sees: [start,
    end) per row, or an explicit `allowed` [B|1, S, T] bool mask. fp32 einsums over blocks of query rows (about
    `budget` logits at a time), so no [B, S, H, T] tensor is held."""
    b, s, h, _ = q.shape
    t = kv.shape[1]
    keys = torch.arange(t, device=q.device)
    rows = max(1, budget // (b * h * t))
    out = []
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        logits = torch.einsum("bshd,btd->bsht", q[:, r0:r1].float(), kv.float()) * sm_scale
        if allowed is not None:
            seen = allowed[:, r0:r1]                                                        # [B|1, rows, T]
        else:
            seen = ((keys >= start[r0:r1, None]) & (keys < end[r0:r1, None]))[None]          # [1, rows, T]
        out.append(logits.masked_fill(~seen[:, :, None], float("-inf")).logsumexp(-1))
    return torch.cat(out, dim=1)


def act_quant_fp8(x: torch.Tensor, block: int = 128, round_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's `act_quant`: e4m3 with one fp32 scale per `block` of the last dim (amax/448, amax >= 1e-4,
    the scale rounded up to a power of two as with scale_fmt=ue8m0). Returns (x_fp8, scale[..., D/block])."""
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"last dim {d} is not a multiple of the quantization block {block}")
    xb = x.float().unflatten(-1, (d // block, block))
    amax = xb.abs().amax(-1).clamp_min(1e-4)
    scale = amax / 448.0
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    xq = (xb / scale[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return xq.flatten(-2), scale


def indexer_fp8_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """Quantize indexer inputs as DeepSeek's inference does: q per (token, head), k per token (head_dim 128 = one
    block), and the q scale folded into the head weights. Returns (q_fp8, k_fp8, k_scale [B,T], w_folded [B,S,Hi])."""
    q8, qs = act_quant_fp8(q, block=q.shape[-1])                                  # qs [B,S,Hi,1]
    k8, ks = act_quant_fp8(k, block=k.shape[-1])                                  # ks [B,T,1]
    return q8, k8, ks[..., 0].contiguous(), (w.float() * qs[..., 0]).contiguous()


@fp32_math
def indexer_scores_fp8(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, w_folded: torch.Tensor,
                       causal: bool = True) -> torch.Tensor:
    """I[b,s,t] = k_scale[b,t] * sum_j w_folded[b,s,j] * relu(q8[b,s,j] . k8[b,t]) (fp32; DeepSeek's fp8_index)."""
    scores = indexer_scores(q8.float(), k8.float(), w_folded, causal=causal)
    return scores * k_scale.float()[:, None, :]


@fp32_math
def attention_target(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, sm_scale: float,
                     indices: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer's KL target p (paper §2.1): main-attention probabilities summed over heads, L1-normalised per row.

    Sparse stage (indices given): [B,S,K] over the selected set (-1 slots get 0). Dense warm-up: [B,S,T] over the
    causal row (reference only: it materialises the row scores, so keep it to test sizes).
    """
    if indices is not None:
        valid = indices >= 0
        safe = indices.clamp_min(0).long()
        b, s, h, d = q.shape
        kvg = torch.gather(kv[:, None].expand(b, s, *kv.shape[1:]), 2, safe[..., None].expand(*safe.shape, d))
        logits = torch.einsum("bshd,bskd->bshk", q.double(), kvg.double()) * sm_scale
        p = torch.exp(logits - lse.double()[..., None]).sum(2) * valid            # [B,S,K]
    else:
        start, end = key_bounds(q.shape[1], kv.shape[1], cu_seqlens, q.device)
        mask = bounds_mask(start, end, kv.shape[1])
        logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * sm_scale
        p = (torch.exp(logits - lse.double()[..., None]) * mask[None, :, None, :]).sum(2)
    return (p / p.sum(-1, keepdim=True).clamp_min(1e-30)).float()


@torch.no_grad()
def selected_mass(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor,
                  sm_scale: float) -> torch.Tensor:
    """[B,S,K] fp32: sum over heads of exp(sm_scale * q_h . kv[idx] - lse_h) at each selected slot, 0 at -1 slots
    (the sparse-stage KL target before normalisation; `attention_target` normalises it, in float64)."""
    b, s, h, d = q.shape
    kvg = torch.gather(kv[:, None].expand(b, s, *kv.shape[1:]), 2,
                       indices.clamp_min(0).long()[..., None].expand(*indices.shape, d))
    logits = torch.einsum("bshd,bskd->bshk", q.float(), kvg.float()) * sm_scale
    # -1 slots masked before the exponent: a row with no valid key has lse = -inf, and exp(logit + inf) summed over
    # heads is inf, which a mask applied afterwards turns into nan
    logits = torch.where((indices >= 0)[:, :, None, :], logits - lse.float()[..., None], float("-inf"))
    return torch.exp(logits).sum(2).float()


@fp32_math
def indexer_kl(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
               indices: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row KL(p || softmax(I)) [B,S] in fp32, differentiable in q, k, w (paper §2.1).

    Sparse stage: I and p restricted to the selected set (indices [B,S,K], target [B,S,K]). Dense warm-up:
    indices None, target [B,S,T] over the causal (or per-document) row.
    """
    b, s = q.shape[:2]
    if indices is not None:
        valid = indices >= 0
        safe = indices.clamp_min(0).long()
        kg = torch.gather(k[:, None].expand(b, s, *k.shape[1:]), 2,
                          safe[..., None].expand(*safe.shape, k.shape[-1]))       # [B,S,K,D]
        logits = torch.einsum("bshd,bskd->bshk", q.float(), kg.float()).relu()
        scores = torch.einsum("bshk,bsh->bsk", logits, w.float())
    else:
        start, end = key_bounds(s, k.shape[1], cu_seqlens, q.device)
        valid = bounds_mask(start, end, k.shape[1])[None].expand(b, -1, -1)
        scores = indexer_scores(q, k, w, causal=False)
    scores = scores.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1).masked_fill(~valid, 0.0)
    p = target.float()
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    return (plogp - p * logp).sum(-1)


def rotate(x: torch.Tensor, cis: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotary rotation of x: each pair of x as a complex number times cis = cos + i sin (complex64, already
    shaped to broadcast over x's pairs), in fp32; the result is contiguous, in x's dtype."""
    if interleaved:
        z = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2))) * cis
        return torch.view_as_real(z).flatten(-2).to(x.dtype)
    x1, x2 = x.float().chunk(2, dim=-1)
    z = torch.complex(x1, x2) * cis
    return torch.view_as_real(z).movedim(-1, -2).to(x.dtype, memory_format=torch.contiguous_format).flatten(-2)
