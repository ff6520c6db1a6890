"""Row log-sum-exp of dense causal attention in absorbed (MQA) form: the dense warm-up's KL target normaliser.

The warm-up trains the indexer towards the main attention's head-summed probabilities over the whole causal row.
`indexer_kl` recomputes those probabilities from (q, kv, lse) block by block, so all it needs from the attention is
its LSE per (query, head). The attention itself runs through SDPA, which does not return it; this kernel
computes it in one streaming pass (bf16 products, fp32 accumulation and online max/sum, as flash attention does),
where the torch fallback walks fp32 einsums over blocks of query rows.

Rows are (query, head) pairs, BLOCK_M of them per program; each row sees keys [start, end) of its query (causal,
or its document's part of the row under cu_seqlens).

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernel in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import FLOAT_DTYPES, check, check_tensor, empty, next_pow2, record, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# (BLOCK_M rows, BLOCK_N keys, warps, stages) by d_v. From ptxas's sm_90a resource usage (not timed on its own): at 8
# warps nothing spills for d_v 256 and 512; at 4 warps 1.2-1.7 KB of stack a thread spill. At d_v 512, 64 keys x 3
# stages asked the H200 for 292 KB of shared memory (227 KB is the limit), so that shape streams 32 keys a block.
LSE_CONFIG = {256: (64, 64, 8, 3), 512: (64, 32, 8, 3)}


if triton is not None:

    @triton.jit
    def _attention_lse_kernel(Q, KV, START, END, LSE, scale_log2,
                              sqb, sqs, sqh, skb, skt, slb, sls, slh, S, H, T,
                              D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)             # flattened (query, head) pairs
        row_ok = rows < S * H
        s = rows // H
        h = rows % H
        lo = tl.load(START + s, mask=row_ok, other=0)
        hi = tl.load(END + s, mask=row_ok, other=0)
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        mask_p = offs_p < D_PE
        q_rows = Q + b * sqb + s.to(tl.int64)[:, None] * sqs + h[:, None] * sqh
        q_n = tl.load(q_rows + offs_v[None, :], mask=row_ok[:, None], other=0.0)                # [BM, D_V]
        q_p = tl.load(q_rows + D_V + offs_p[None, :], mask=row_ok[:, None] & mask_p[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        k_lo = tl.min(tl.where(row_ok, lo, T), 0)
        k_hi = tl.max(tl.where(row_ok, hi, 0), 0)
        kv_base = KV + b * skb
        for n0 in range(k_lo - k_lo % BLOCK_N, k_hi, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = (keys >= 0) & (keys < T)
            kv_rows = kv_base + keys.to(tl.int64)[:, None] * skt
            kn = tl.load(kv_rows + offs_v[None, :], mask=key_ok[:, None], other=0.0)            # [BN, D_V]
            kp = tl.load(kv_rows + D_V + offs_p[None, :], mask=key_ok[:, None] & mask_p[None, :], other=0.0)
            qk = tl.dot(q_n, tl.trans(kn))
            qk = tl.dot(q_p, tl.trans(kp), qk) * scale_log2                                   # [BM, BN], log2 units
            seen = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(qk - m_use[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0.0, (m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + b * slb + s.to(tl.int64) * sls + h * slh, lse, mask=row_ok)


def attention_lse(q: torch.Tensor, kv: torch.Tensor, sm_scale: float, d_v: int,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[B,S,H] fp32 natural-log LSE of softmax(sm_scale * q . kv) over each query's causal row.

    q [B,S,H,Dqk] (absorbed queries), kv [B,T,Dqk] (shared latent + rope, the first d_v dims the value); queries
    are the last S of T positions, or packed documents with cu_seqlens (int [N+1], S == T). -inf for an empty row.
    """
    check_tensor("q", q, 4, FLOAT_DTYPES)
    check_tensor("kv", kv, 3, FLOAT_DTYPES)
    b, s, h, d = q.shape
    check(tuple(kv.shape[::2]) == (b, d), f"kv must be [B={b}, T, Dqk={d}], got {tuple(kv.shape)}")
    check(kv.shape[1] >= s, f"kv has {kv.shape[1]} positions, fewer than the {s} queries")
    check(0 < d_v <= d, f"d_v={d_v} must be in (0, d_qk={d}]")
    start, end = ref.key_bounds(s, kv.shape[1], cu_seqlens, q.device)
    ok, why = use_triton(q, kv)
    if ok and (d_v != next_pow2(d_v) or d_v < 16 or d - d_v > 128):
        ok, why = False, f"d_v={d_v}, d_pe={d - d_v} not covered"
    if ok and q.is_cuda and torch.float32 in (q.dtype, kv.dtype):
        ok, why = False, "float32 on GPU (the kernels take bf16/fp16)"
    if not ok or q.stride(-1) != 1 or kv.stride(-1) != 1:
        record("attention_lse", "reference", why or "inputs not contiguous in the last dim")
        return ref.attention_lse(q, kv, sm_scale, start, end)
    record("attention_lse", "triton", why)
    bm, bn, warps, stages = LSE_CONFIG.get(d_v, LSE_CONFIG[256] if d_v < 512 else LSE_CONFIG[512])
    lse = empty(b, s, h, device=q.device, dtype=torch.float32)
    _attention_lse_kernel[(triton.cdiv(s * h, bm), b)](
        q, kv, start.to(torch.int32), end.to(torch.int32), lse, sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), lse.stride(0), lse.stride(1),
        lse.stride(2), s, h, kv.shape[1], D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return lse


__all__ = ["attention_lse"]
