"""Sparse MLA in MQA (absorbed) form: forward, split-K decode and the autograd Function (backward in `sparse_mla_bwd`).

Each query token attends to its own K selected latent entries; all H query heads share one latent KV head of
d_qk = d_v + d_pe dims (V3.2: 512 + 64), and the value is the first d_v dims of the same entry. Layouts and the
-1 = empty slot convention are those of `reference.sparse_mla`.

Run: CPU falls back to the reference (or, with TRITON_INTERPRET=1, runs the kernels in Triton's interpreter on
float32 inputs); one GPU runs the Triton kernels on bf16/fp16 inputs.
"""
from __future__ import annotations

import os

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import sparse_mla_sm90 as sm90
from dsaforge.kernels._dispatch import check, empty, next_pow2, record
from dsaforge.kernels.sparse_mla_blocks import LOG2E, block_config, check_inputs, triton_path
from dsaforge.kernels.sparse_mla_bwd import sparse_mla_bwd

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

# (BLOCK_H, BLOCK_K, num_warps, num_stages) by d_v; overridable per call for the benchmark's sweeps.
# Chosen by `bench --sweep` on an H200 at s_kv 64K (v32: h 128; small: h 16); BLOCK_H is capped at the head count.
FWD_CONFIG = {512: (64, 64, 8, 2), 256: (16, 128, 4, 2)}


if triton is not None:
    from dsaforge.kernels.sparse_mla_blocks import qk_logits, query_heads, selected_rows

    @triton.jit
    def _sparse_mla_fwd_kernel(
            Q, KV, IDX, O, LSE, P, M, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sob, sos, soh, sosp, slb, sls, slh, slsp,
            spb, sps, sph, smb, sms, smh, s_offset,
            H, T, K, k_per_split,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr, PARTIAL: tl.constexpr,
            STORE_P: tl.constexpr):
        """STORE_P: also leave each block's P = exp2(S - m) (q's dtype, [B, rows, H, K] from row s_offset) and the
        running max m it is relative to ([B, rows, H, K / BLOCK_K]), for `sparse_mla_target`."""
        pid = tl.program_id(0)
        s_loc = pid // NUM_HB
        s = s_offset + s_loc                   # head blocks of one token are adjacent: they share the gathered KV in L2
        hb = pid % NUM_HB
        b = tl.program_id(1)
        split = tl.program_id(2)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_v = tl.arange(0, D_V)
        q_nope, q_pe = query_heads(Q + b.to(tl.int64) * sqb + s.to(tl.int64) * sqs + offs_h[:, None] * sqh, mask_h,
                                   D_V, D_PE, D_PE_P)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D_V], tl.float32)
        kv_base = KV + b.to(tl.int64) * skb
        idx_base = IDX + b.to(tl.int64) * sib + s.to(tl.int64) * sis
        k_lo = split * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            _, valid, kn, kp = selected_rows(kv_base, idx_base, offs_k, K, T, skt, D_V, D_PE, D_PE_P)   # [BK, D_V]
            qk = tl.where(valid[None, :], qk_logits(q_nope, q_pe, kn, kp) * scale_log2, float("-inf"))  # [BH, BK]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no valid key yet stays at 0
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(kn.dtype), kn, acc * alpha[:, None])
            m_i = m_new
            if STORE_P:
                row = b.to(tl.int64) * spb + s_loc.to(tl.int64) * sps + offs_h[:, None] * sph
                tl.store(P + row + offs_k[None, :], p.to(P.dtype.element_ty),
                         mask=mask_h[:, None] & (offs_k < K)[None, :])
                tl.store(M + b.to(tl.int64) * smb + s_loc.to(tl.int64) * sms + offs_h * smh + (k_lo + k0) // BLOCK_K,
                         m_use, mask=mask_h)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = (O + b.to(tl.int64) * sob + s.to(tl.int64) * sos + split.to(tl.int64) * sosp
                  + offs_h[:, None] * soh + offs_v[None, :])
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_h[:, None])
        l_ptrs = LSE + b.to(tl.int64) * slb + s.to(tl.int64) * sls + split * slsp + offs_h * slh
        tl.store(l_ptrs, lse, mask=mask_h)


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                   num_splits: int = 1, config: tuple | None = None, target: bool = False) -> tuple[torch.Tensor, ...]:
    """Fused forward. Returns (out [B,S,H,d_v] in q's dtype, lse [B,S,H] fp32, natural log; -inf for empty rows).

    target=True also returns the head-summed attention mass at each selected slot, [B,S,K] fp32 (0 at empty
    slots; the sparse-stage indexer KL's target before normalisation), taken from the forward's own probabilities
    (`sparse_mla_target.forward_with_target`) instead of a second pass over the selected rows.

    num_splits > 1 splits each row's K selected entries over that many programs (flash-decoding) and merges the
    partial results; it pays off only when B*S*ceil(H/64) is too small to fill the GPU (decode).
    On sm_90 GPUs the shapes `sparse_mla_sm90.supported` takes run the Hopper (Gluon) kernel (DSAFORGE_SM90_FWD=0
    turns it off); `config` overrides the block sizes: (BLOCK_H, BLOCK_K, warps, stages) for the Triton kernel, or
    ("sm90", BLOCK_K, stages, schedule) for the Hopper one (the benchmark's sweep).
    """
    check_inputs(q, kv, indices, d_v)
    ok, why = triton_path(q, kv, indices, d_v)
    if not ok:
        record("sparse_mla_fwd", "reference", why)
        out, lse = ref.sparse_mla(q, kv, indices, sm_scale, d_v)
        if target:
            return out, lse, ref.selected_mass(q, kv, lse, indices, sm_scale)
        return out, lse
    if target:
        check(num_splits == 1 and config is None, "target=True takes the default forward (no splits, no config)")
        from dsaforge.kernels.sparse_mla_target import forward_with_target   # it launches this module's kernel
        return forward_with_target(q, kv, indices, sm_scale, d_v)
    b, s, h, d = q.shape
    t, k = kv.shape[1], indices.shape[2]
    if num_splits == 1 and (config is None or config[0] == "sm90") and os.environ.get("DSAFORGE_SM90_FWD", "1") != "0":
        ok90, why90 = sm90.supported(q, kv, indices, d_v)
        if ok90:
            record("sparse_mla_fwd", "triton", "sm90 gluon kernel")
            out = empty(b, s, h, d_v, device=q.device, dtype=q.dtype)
            lse = empty(b, s, h, device=q.device, dtype=torch.float32)
            sm90.launch(q, kv, indices, out, lse, sm_scale * LOG2E, d_v, config)
            return out, lse
        check(config is None, f"the sm_90 forward config {config} does not apply: {why90}")
    record("sparse_mla_fwd", "triton", why)
    bh, bk, warps, stages = block_config(FWD_CONFIG, d_v, h, config)
    nhb = triton.cdiv(h, bh)
    num_splits = max(1, min(num_splits, triton.cdiv(k, bk)))
    k_per_split = triton.cdiv(triton.cdiv(k, num_splits), bk) * bk
    num_splits = triton.cdiv(k, k_per_split)
    if num_splits == 1:
        out = empty(b, s, h, d_v, device=q.device, dtype=q.dtype)
        lse = empty(b, s, h, device=q.device, dtype=torch.float32)
        so, sl = (out.stride(0), out.stride(1), out.stride(2), 0), (lse.stride(0), lse.stride(1), lse.stride(2), 0)
    else:
        out = empty(b, s, num_splits, h, d_v, device=q.device, dtype=torch.float32)
        lse = empty(b, s, num_splits, h, device=q.device, dtype=torch.float32)
        so = (out.stride(0), out.stride(1), out.stride(3), out.stride(2))
        sl = (lse.stride(0), lse.stride(1), lse.stride(3), lse.stride(2))
    grid = (s * nhb, b, num_splits)
    _sparse_mla_fwd_kernel[grid](
        q, kv, indices, out, lse, lse, lse, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        so[0], so[1], so[2], so[3], sl[0], sl[1], sl[2], sl[3], 0, 0, 0, 0, 0, 0, 0,
        h, t, k, k_per_split,
        D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)), BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb,
        PARTIAL=num_splits > 1, STORE_P=False, num_warps=warps, num_stages=stages)
    if num_splits == 1:
        return out, lse
    lse_all = torch.logsumexp(lse, dim=2)                                               # [B,S,H]
    wts = torch.exp(lse - lse_all[:, :, None]).nan_to_num(0.0)                         # [B,S,NS,H]
    merged = (out * wts[..., None]).sum(2)
    return merged.to(q.dtype), lse_all


def sparse_mla_decode(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                      num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode: one or a few queries per sequence (q [B,S_q,H,Dqk], S_q small) against the top-k entries of a
    long latent cache kv [B,T,Dqk]. Splits the top-k over programs so that a small batch still fills the GPU.

    Where the Hopper kernel takes the shape, it runs unsplit from 8 (query, 64-head block) programs up: on an H200 at
    V3.2's shape over a 64K cache, replayed from a CUDA graph, it took 60-63 us from batch 2 to 16 and 76 us at
    batch 64 (1.99 TB/s of gathered cache), where the best split Triton launch took 58-98 us and 163 us. Below that,
    32 split programs in all (batch 1: 16 splits, 43.8 us; 32 splits 46.0 us).
    `python -m dsaforge.kernels.bench_decode`, docs/benchmarks/decode_sweep_h200.md.
    """
    if num_splits is None:
        b, s, h = q.shape[:3]
        programs = b * s * max(1, -(-h // 64))
        if q.is_cuda and sm90.supported(q, kv, indices, d_v)[0]:
            num_splits = 1 if programs >= 8 else max(1, 32 // programs)
        else:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
            num_splits = max(1, min(32, -(-2 * sms // programs)))
    return sparse_mla_fwd(q, kv, indices, sm_scale, d_v, num_splits=num_splits)


class SparseMLAFunction(torch.autograd.Function):
    """Sparse MLA with the fused forward and backward; indices carry no gradient. With target=True the forward
    also returns the KL target's mass [B,S,K] (no gradient: the paper detaches the target)."""

    @staticmethod
    def forward(ctx, q, kv, indices, sm_scale, d_v, deterministic=False, target=False):
        res = sparse_mla_fwd(q, kv, indices, sm_scale, d_v, target=target)
        out, lse = res[0], res[1]
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.sm_scale, ctx.d_v, ctx.deterministic = sm_scale, d_v, deterministic
        if target:
            ctx.mark_non_differentiable(res[2])
        return res

    @staticmethod
    def backward(ctx, dout, dlse, dmass=None):
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_bwd(q, kv, indices, out, lse, dout, ctx.sm_scale, ctx.d_v, dlse=dlse,
                                 deterministic=ctx.deterministic)
        return dq, dkv, None, None, None, None, None


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
               deterministic: bool = False, target: bool = False) -> tuple[torch.Tensor, ...]:
    """Drop-in for `reference.sparse_mla` that runs the fused kernels and is differentiable in q and kv.

    Returns (out [B,S,H,d_v], lse [B,S,H] fp32), and with target=True the head-summed attention mass at each
    selected slot [B,S,K] fp32 (see `sparse_mla_fwd`). Falls back to the reference (differentiable through torch)
    where the kernels do not apply; `last_path("sparse_mla_fwd")` says which ran.
    """
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return SparseMLAFunction.apply(q, kv, indices, sm_scale, d_v, deterministic, target)
    return sparse_mla_fwd(q, kv, indices, sm_scale, d_v, target=target)


def sparse_mla_flops(s_q: int, top_k: int, h: int, d_qk: int, d_v: int, backward: bool = False) -> float:
    """FLOPs as FlashMLA counts the forward, 2*s_q*k*h*(d_qk+d_v); the backward recomputes QK^T and adds dP, dV, dQ,
    dK: 2*s_q*k*h*(3*d_qk + 2*d_v)."""
    return 2.0 * s_q * top_k * h * ((3 * d_qk + 2 * d_v) if backward else (d_qk + d_v))


__all__ = ["SparseMLAFunction", "sparse_mla", "sparse_mla_bwd", "sparse_mla_decode", "sparse_mla_fwd",
           "sparse_mla_flops"]
