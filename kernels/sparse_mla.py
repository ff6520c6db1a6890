"""Sparse MLA in MQA (absorbed) form: forward, backward, split-K decode and the autograd Function.

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
from dsaforge.kernels import sparse_mla_bwd_sm90 as bwd90
from dsaforge.kernels import sparse_mla_sm90 as sm90
from dsaforge.kernels._dispatch import (FLOAT_DTYPES, check, check_indices, check_same_device, check_tensor, empty,
                                        next_pow2, record, use_triton)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# (BLOCK_H, BLOCK_K, num_warps, num_stages) by d_v; overridable per call for the benchmark's sweeps.
# Chosen by `bench --sweep` on an H200 at s_kv 64K (v32: h 128; small: h 16); BLOCK_H is capped at the head count.
FWD_CONFIG = {512: (64, 64, 8, 2), 256: (16, 128, 4, 2)}
BWD_CONFIG = {512: (32, 32, 8, 1), 256: (16, 32, 4, 2)}          # fused backward
DQ_CONFIG = {512: (64, 64, 8, 1), 256: (16, 128, 4, 2)}          # split backward, kernel 1 (as FWD_CONFIG)
DKV_CONFIG = {512: (64, 128, 8, 3), 256: (128, 128, 8, 2)}       # kernel 2: (BLOCK_K, columns, warps, stages)
SPLIT_MIN_HEADS = 64     # below this the fused backward was faster on the H200 (h 16: 4.6 ms against 7.3 ms)
# The split backward's dS and P ([B, rows, H, K] each, q's dtype) are formed this many bytes at a time, whatever the
# batch: sized per sequence, 16 sequences of 4K at 128 heads held 32 GiB of them (measured 121.6 GiB peak against
# 84.8 for one sequence of 64K, the same tokens).
BWD_SCRATCH_BYTES = 2 << 30


if triton is not None:

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
        offs_p = tl.arange(0, D_PE_P)
        mask_p = offs_p < D_PE

        q_rows = Q + b.to(tl.int64) * sqb + s.to(tl.int64) * sqs + offs_h[:, None] * sqh
        q_nope = tl.load(q_rows + offs_v[None, :], mask=mask_h[:, None], other=0.0)
        q_pe = tl.load(q_rows + D_V + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D_V], tl.float32)
        kv_base = KV + b.to(tl.int64) * skb
        idx_base = IDX + b.to(tl.int64) * sib + s.to(tl.int64) * sis
        k_lo = split * k_per_split
        for k0 in range(0, k_per_split, BLOCK_K):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
            valid = (idx >= 0) & (idx < T)
            rows = kv_base + idx.to(tl.int64)[:, None] * skt
            kn = tl.load(rows + offs_v[None, :], mask=valid[:, None], other=0.0)                  # [BK, D_V]
            kp = tl.load(rows + D_V + offs_p[None, :], mask=valid[:, None] & mask_p[None, :], other=0.0)
            qk = tl.dot(q_nope, tl.trans(kn))
            qk = tl.dot(q_pe, tl.trans(kp), qk)                                                   # [BH, BK]
            qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
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

    @triton.jit
    def _sparse_mla_bwd_delta_kernel(O, DO, DLSE, DELTA, sob, sos, soh, sdb, sds, sdh, slb, sls, slh, H,
                      D_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DLSE: tl.constexpr):
        """DELTA[b,s,h] = sum_v O * dO (fp32), minus dLSE when the LSE has a gradient: one read of O and dO, where
        the torch form cast chunks of both to fp32 copies and multiplied them in separate kernels."""
        s64 = tl.program_id(0).to(tl.int64)
        b64 = tl.program_id(1).to(tl.int64)
        offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_v = tl.arange(0, D_V)
        h64 = offs_h[:, None].to(tl.int64)
        o = tl.load(O + b64 * sob + s64 * sos + h64 * soh + offs_v[None, :], mask=mask_h[:, None],
                    other=0.0).to(tl.float32)
        do = tl.load(DO + b64 * sdb + s64 * sds + h64 * sdh + offs_v[None, :], mask=mask_h[:, None],
                     other=0.0).to(tl.float32)
        delta = tl.sum(o * do, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=0.0).to(tl.float32)
        tl.store(DELTA + (b64 * tl.num_programs(0) + s64) * H + offs_h, delta, mask=mask_h)

    @triton.jit
    def _sparse_mla_bwd_kernel(
            Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, scale, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sdb, sds, sdh, slb, sls, slh, sqgb, sqgs, sqgh, sgb, sgt, H, T, K,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr):
        """Fused backward: dQ, and dKV added with fp32 atomics per head block."""
        pid = tl.program_id(0)
        s = pid // NUM_HB
        hb = pid % NUM_HB
        b = tl.program_id(1)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        mask_p = offs_p < D_PE
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)

        q_rows = Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh
        q_nope = tl.load(q_rows + offs_v[None, :], mask=mask_h[:, None], other=0.0)
        q_pe = tl.load(q_rows + D_V + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0)
        do = tl.load(DO + b64 * sdb + s64 * sds + offs_h[:, None].to(tl.int64) * sdh + offs_v[None, :],
                     mask=mask_h[:, None], other=0.0)
        lse = tl.load(LSE + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=float("-inf"))
        delta = tl.load(DELTA + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=0.0)
        row_ok = mask_h & (lse > float("-inf"))
        lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)

        dq_n = tl.zeros([BLOCK_H, D_V], tl.float32)
        dq_p = tl.zeros([BLOCK_H, D_PE_P], tl.float32)
        kv_base = KV + b64 * skb
        dkv_base = DKV + b64 * sgb
        idx_base = IDX + b64 * sib + s64 * sis
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
            valid = (idx >= 0) & (idx < T)
            rows = kv_base + idx.to(tl.int64)[:, None] * skt
            kn = tl.load(rows + offs_v[None, :], mask=valid[:, None], other=0.0)
            kp = tl.load(rows + D_V + offs_p[None, :], mask=valid[:, None] & mask_p[None, :], other=0.0)
            qk = tl.dot(q_nope, tl.trans(kn))
            qk = tl.dot(q_pe, tl.trans(kp), qk)
            p = tl.exp2(qk * scale_log2 - lse2[:, None])
            p = tl.where(row_ok[:, None] & valid[None, :], p, 0.0)                              # [BH, BK]
            dp = tl.dot(do, tl.trans(kn))
            ds = p * (dp - delta[:, None]) * scale
            ds_lo = ds.to(kn.dtype)
            dq_n = tl.dot(ds_lo, kn, dq_n)
            dq_p = tl.dot(ds_lo, kp, dq_p)
            dkn = tl.dot(tl.trans(ds_lo), q_nope)
            dkn = tl.dot(tl.trans(p.to(kn.dtype)), do, dkn)                                      # [BK, D_V]
            dkp = tl.dot(tl.trans(ds_lo), q_pe)                                                  # [BK, D_PE_P]
            g_rows = dkv_base + idx.to(tl.int64)[:, None] * sgt
            tl.atomic_add(g_rows + offs_v[None, :], dkn, mask=valid[:, None], sem="relaxed")
            tl.atomic_add(g_rows + D_V + offs_p[None, :], dkp, mask=valid[:, None] & mask_p[None, :], sem="relaxed")

        dq_rows = DQ + b64 * sqgb + s64 * sqgs + offs_h[:, None] * sqgh
        tl.store(dq_rows + offs_v[None, :], dq_n.to(DQ.dtype.element_ty), mask=mask_h[:, None])
        tl.store(dq_rows + D_V + offs_p[None, :], dq_p.to(DQ.dtype.element_ty),
                 mask=mask_h[:, None] & mask_p[None, :])

    @triton.jit
    def _sparse_mla_bwd_dq_kernel(
            Q, KV, IDX, DO, LSE, DELTA, DQ, DS, P, scale, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sdb, sds, sdh, slb, sls, slh, sqgb, sqgs, sqgh,
            spb, sps, sph, s_offset, H, T, K,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr):
        """Split backward, part 1: dQ, and dS = P*(dP - Delta)*scale and P stored (bf16) for part 2."""
        pid = tl.program_id(0)
        s_loc = pid // NUM_HB
        s = s_offset + s_loc
        hb = pid % NUM_HB
        b = tl.program_id(1)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        mask_p = offs_p < D_PE
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)
        q_rows = Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh
        q_nope = tl.load(q_rows + offs_v[None, :], mask=mask_h[:, None], other=0.0)
        q_pe = tl.load(q_rows + D_V + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0)
        do = tl.load(DO + b64 * sdb + s64 * sds + offs_h[:, None].to(tl.int64) * sdh + offs_v[None, :],
                     mask=mask_h[:, None], other=0.0)
        lse = tl.load(LSE + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=float("-inf"))
        delta = tl.load(DELTA + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=0.0)
        row_ok = mask_h & (lse > float("-inf"))
        lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
        dq_n = tl.zeros([BLOCK_H, D_V], tl.float32)
        dq_p = tl.zeros([BLOCK_H, D_PE_P], tl.float32)
        kv_base = KV + b64 * skb
        idx_base = IDX + b64 * sib + s64 * sis
        sp_rows = b64 * spb + s_loc.to(tl.int64) * sps + offs_h[:, None] * sph
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
            valid = (idx >= 0) & (idx < T)
            rows = kv_base + idx.to(tl.int64)[:, None] * skt
            kn = tl.load(rows + offs_v[None, :], mask=valid[:, None], other=0.0)
            kp = tl.load(rows + D_V + offs_p[None, :], mask=valid[:, None] & mask_p[None, :], other=0.0)
            qk = tl.dot(q_nope, tl.trans(kn))
            qk = tl.dot(q_pe, tl.trans(kp), qk)
            p = tl.exp2(qk * scale_log2 - lse2[:, None])
            p = tl.where(row_ok[:, None] & valid[None, :], p, 0.0)                              # [BH, BK]
            dp = tl.dot(do, tl.trans(kn))
            ds_lo = (p * (dp - delta[:, None]) * scale).to(kn.dtype)
            dq_n = tl.dot(ds_lo, kn, dq_n)
            dq_p = tl.dot(ds_lo, kp, dq_p)
            smask = mask_h[:, None] & (offs_k < K)[None, :]
            tl.store(DS + sp_rows + offs_k[None, :], ds_lo, mask=smask)
            tl.store(P + sp_rows + offs_k[None, :], p.to(kn.dtype), mask=smask)
        dq_rows = DQ + b64 * sqgb + s64 * sqgs + offs_h[:, None] * sqgh
        tl.store(dq_rows + offs_v[None, :], dq_n.to(DQ.dtype.element_ty), mask=mask_h[:, None])
        tl.store(dq_rows + D_V + offs_p[None, :], dq_p.to(DQ.dtype.element_ty),
                 mask=mask_h[:, None] & mask_p[None, :])

    @triton.jit
    def _sparse_mla_bwd_dkv_kernel(
            Q, DO, IDX, DS, P, DKV, PART,
            sqb, sqs, sqh, sdb, sds, sdh, sib, sis, spb, sps, sph, sgb, sgt, spr, spk, s_offset, H, T, K,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr, H_P: tl.constexpr, CW: tl.constexpr,
            BLOCK_K: tl.constexpr, N_PARTS: tl.constexpr, DETERMINISTIC: tl.constexpr):
        """Split backward, part 2: dKV[idx] += dS^T Q + P^T dO over all heads at once, one column chunk of the latent
        (CW of the d_v value/nope dims, or the rope dims for the last part) per program."""
        pid = tl.program_id(0)
        s_loc = pid // (N_PARTS + 1)
        part = pid % (N_PARTS + 1)
        s = s_offset + s_loc
        b = tl.program_id(1)
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)
        offs_h = tl.arange(0, H_P)
        mask_h = offs_h < H
        idx_base = IDX + b64 * sib + s64 * sis
        sp_base = b64 * spb + s_loc.to(tl.int64) * sps
        if part < N_PARTS:
            cols = part * CW + tl.arange(0, CW)
            qc = tl.load(Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh + cols[None, :], mask=mask_h[:, None],
                         other=0.0)                                                             # [H_P, CW]
            dc = tl.load(DO + b64 * sdb + s64 * sds + offs_h[:, None].to(tl.int64) * sdh + cols[None, :],
                         mask=mask_h[:, None], other=0.0)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                idx = tl.load(idx_base + offs_k, mask=kmask, other=-1)
                valid = (idx >= 0) & (idx < T)
                tmask = kmask[:, None] & mask_h[None, :]
                t_off = sp_base + offs_k[:, None] + offs_h[None, :].to(tl.int64) * sph               # [BK, H_P]
                ds_t = tl.load(DS + t_off, mask=tmask, other=0.0)
                p_t = tl.load(P + t_off, mask=tmask, other=0.0)
                acc = tl.dot(ds_t, qc)
                acc = tl.dot(p_t, dc, acc)                                                     # [BK, CW]
                if DETERMINISTIC:
                    tl.store(PART + s_loc.to(tl.int64) * spr + offs_k[:, None].to(tl.int64) * spk + cols[None, :],
                             acc, mask=kmask[:, None])
                else:
                    tl.atomic_add(DKV + b64 * sgb + idx.to(tl.int64)[:, None] * sgt + cols[None, :], acc,
                                  mask=valid[:, None], sem="relaxed")
        else:
            cols_p = tl.arange(0, D_PE_P)
            mask_p = cols_p < D_PE
            qp = tl.load(Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh + D_V + cols_p[None, :],
                         mask=mask_h[:, None] & mask_p[None, :], other=0.0)                     # [H_P, D_PE_P]
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                idx = tl.load(idx_base + offs_k, mask=kmask, other=-1)
                valid = (idx >= 0) & (idx < T)
                t_off = sp_base + offs_k[:, None] + offs_h[None, :].to(tl.int64) * sph
                ds_t = tl.load(DS + t_off, mask=kmask[:, None] & mask_h[None, :], other=0.0)
                acc = tl.dot(ds_t, qp)                                                         # [BK, D_PE_P]
                if DETERMINISTIC:
                    tl.store(PART + s_loc.to(tl.int64) * spr + offs_k[:, None].to(tl.int64) * spk + D_V
                             + cols_p[None, :], acc, mask=kmask[:, None] & mask_p[None, :])
                else:
                    tl.atomic_add(DKV + b64 * sgb + idx.to(tl.int64)[:, None] * sgt + D_V + cols_p[None, :], acc,
                                  mask=valid[:, None] & mask_p[None, :], sem="relaxed")

    @triton.jit
    def _segment_sum_kernel(PART, ORDER, OFFS, OUT, D, BLOCK_D: tl.constexpr):
        """OUT[t] += sum of PART rows ORDER[OFFS[t]:OFFS[t+1]] in that order: a deterministic scatter-add."""
        t = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        lo = tl.load(OFFS + t)
        hi = tl.load(OFFS + t + 1)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j in range(lo, hi):
            e = tl.load(ORDER + j).to(tl.int64)
            acc += tl.load(PART + e * D + offs_d, mask=mask_d, other=0.0)
        out = OUT + t.to(tl.int64) * D + offs_d
        tl.store(out, tl.load(out, mask=mask_d, other=0.0) + acc, mask=mask_d)


def _check_inputs(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> None:
    check_tensor("q", q, 4, FLOAT_DTYPES)
    check_tensor("kv", kv, 3, FLOAT_DTYPES)
    check_tensor("indices", indices, 3, (torch.int32, torch.int64))
    check_same_device(q=q, kv=kv, indices=indices)
    b, s, h, d = q.shape
    check(kv.shape[0] == b and kv.shape[2] == d,
          f"kv must be [B={b}, T, Dqk={d}] (one shared latent head), got {tuple(kv.shape)}")
    check(tuple(indices.shape[:2]) == (b, s), f"indices must be [B={b}, S={s}, K], got {tuple(indices.shape)}")
    check(q.dtype == kv.dtype, f"q and kv must share a dtype, got {q.dtype} and {kv.dtype}")
    check(0 < d_v <= d, f"d_v={d_v} must be in (0, d_qk={d}]")
    check_indices("indices", indices, kv.shape[1])


def _kernel_shape_ok(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> tuple[bool, str]:
    d = q.shape[-1]
    if d_v != next_pow2(d_v) or d_v < 16:
        return False, f"d_v={d_v} is not a power of two >= 16"
    if d - d_v > 128:
        return False, f"rope part d_qk - d_v = {d - d_v} > 128"
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        return False, "indices are not contiguous int32"
    if q.is_cuda and q.dtype == torch.float32:
        return False, "float32 on GPU (the kernels take bf16/fp16)"
    return True, ""


def _cfg(table: dict, d_v: int, h: int, override: tuple | None) -> tuple[int, int, int, int]:
    bh, bk, warps, stages = override or table.get(d_v, (64, 64 if d_v <= 256 else 32, 8, 2))
    return min(bh, max(16, next_pow2(h))), bk, warps, stages


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
    _check_inputs(q, kv, indices, d_v)
    ok, why = use_triton(q, kv, indices)
    if ok:
        ok, why2 = _kernel_shape_ok(q, kv, indices, d_v)
        why = why2 or why
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
    bh, bk, warps, stages = _cfg(FWD_CONFIG, d_v, h, config)
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
    32 split programs in all (batch 1: 16 splits, 43.8 us; 32 splits 46.0 us). `python -m dsaforge.kernels.bench_decode`, docs/benchmarks/decode_sweep_h200.md.
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


def sparse_mla_bwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, sm_scale: float, d_v: int, dlse: torch.Tensor | None = None,
                   deterministic: bool = False, config: tuple | None = None, chunk_rows: int | None = None,
                   algorithm: str = "auto", dkv_config: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (dq like q, dkv like kv), dkv accumulated in fp32 at the selected rows of the shared latent.

    algorithm "split": kernel 1 computes dQ and stores dS and P (bf16, a chunk of rows at a time); kernel 2 forms
    dKV = dS^T Q + P^T dO over all heads at once, so each selected row receives one fp32 atomic add per query
    instead of one per head block. "fused": one kernel, dKV added per head block. "auto" (default): split from
    SPLIT_MIN_HEADS heads up, else fused. `deterministic=True` (split) writes each (query, slot) contribution
    instead and sums them per key in a fixed order.
    On sm_90 GPUs the split algorithm's kernel 1 can be the Hopper (Gluon) one, where `sparse_mla_bwd_sm90.supported`
    takes the shape and deterministic=False: opt-in (DSAFORGE_SM90_BWD=1, or `config` ("sm90", BLOCK_K, stages))
    until it has been checked and timed on a GPU; else `config` is (BLOCK_H, BLOCK_K, warps, stages) for the
    Triton kernel.
    """
    _check_inputs(q, kv, indices, d_v)
    check(tuple(out.shape) == (*q.shape[:3], d_v), f"out must be {(*q.shape[:3], d_v)}, got {tuple(out.shape)}")
    check(tuple(dout.shape) == tuple(out.shape), f"dout must be {tuple(out.shape)}, got {tuple(dout.shape)}")
    check(tuple(lse.shape) == tuple(q.shape[:3]), f"lse must be {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    check(algorithm in ("auto", "split", "fused"), f"algorithm must be 'auto', 'split' or 'fused', got {algorithm!r}")
    check(not (deterministic and algorithm == "fused"), "deterministic=True needs algorithm='split'")
    if algorithm == "auto":
        algorithm = "split" if deterministic or q.shape[2] >= SPLIT_MIN_HEADS else "fused"
    ok, why = use_triton(q, kv, indices)
    if ok:
        ok, why2 = _kernel_shape_ok(q, kv, indices, d_v)
        why = why2 or why
    if not ok:
        record("sparse_mla_bwd", "reference", why)
        return _reference_bwd(q, kv, indices, dout, sm_scale, d_v, dlse)
    record("sparse_mla_bwd", "triton", why)
    b, s, h, d = q.shape
    t, k = kv.shape[1], indices.shape[2]
    # The kernels take any strides but a unit last one (dO's head offsets in int64): an einsum's gradient arrives
    # as a head-major buffer seen token-major (head stride B*S*d_v), and a contiguous copy of it would move
    # 2 x 8 GiB a layer at 64K tokens and 128 heads.
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.float().contiguous()
    delta = empty(b, s, h, device=q.device, dtype=torch.float32)                       # rowsum(O * dO) - dLSE
    dl = dlse if dlse is not None else lse
    bh_d = min(16, max(2, next_pow2(h)))
    _sparse_mla_bwd_delta_kernel[(s, b, triton.cdiv(h, bh_d))](
        out, dout, dl, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), dl.stride(0), dl.stride(1), dl.stride(2), h, D_V=d_v, BLOCK_H=bh_d,
        HAS_DLSE=dlse is not None, num_warps=4)       # d lse / d logits = p, so dLSE folds into Delta
    dq = empty(*q.shape, device=q.device, dtype=q.dtype)
    dkv = torch.zeros(b, t, d, device=q.device, dtype=torch.float32)
    d_pe, d_pe_p = d - d_v, max(16, next_pow2(d - d_v))
    common = (q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0),
              indices.stride(1), dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1),
              lse.stride(2), dq.stride(0), dq.stride(1), dq.stride(2))

    if algorithm == "fused":
        bh, bk, warps, stages = _cfg(BWD_CONFIG, d_v, h, config)
        nhb = triton.cdiv(h, bh)
        _sparse_mla_bwd_kernel[(s * nhb, b)](
            q, kv, indices, dout, lse, delta, dq, dkv, sm_scale, sm_scale * LOG2E, *common,
            dkv.stride(0), dkv.stride(1), h, t, k, D_V=d_v, D_PE=d_pe, D_PE_P=d_pe_p, BLOCK_H=bh,
            BLOCK_K=bk, NUM_HB=nhb, num_warps=warps, num_stages=stages)
        return dq, dkv.to(kv.dtype)

    cfg90 = config if config is not None and config[0] == "sm90" else None
    # Opt-in until it has been measured on a GPU: an ("sm90", ...) config or DSAFORGE_SM90_BWD=1.
    want90 = cfg90 is not None or (config is None and os.environ.get("DSAFORGE_SM90_BWD", "0") == "1")
    use90, why90 = False, "deterministic=True" if deterministic else "off (DSAFORGE_SM90_BWD=1 turns it on)"
    if want90 and not deterministic:
        use90, why90 = bwd90.supported(q, kv, indices, dout, d_v, cfg90)
    check(cfg90 is None or use90, f"the sm_90 backward config {config} does not apply: {why90}")
    if use90:
        record("sparse_mla_bwd", "triton", "sm90 gluon dq kernel")
    bh, bk, warps, stages = _cfg(DQ_CONFIG, d_v, h, None if cfg90 else config)
    nhb = triton.cdiv(h, bh)
    kbk, cw, kwarps, kstages = dkv_config or DKV_CONFIG.get(d_v, (64, min(256, d_v), 8, 2))
    cw = min(cw, d_v)
    n_parts = d_v // cw
    h_p = max(16, next_pow2(h))
    per_row = b * 2 * h * k * q.element_size()             # dS and P of one query row of every sequence
    if deterministic:
        per_row += k * d * 4                                # and its fp32 contributions (one sequence at a time)
    rows = chunk_rows or max(1, min(s, BWD_SCRATCH_BYTES // per_row))
    ds = empty(b, rows, h, k, device=q.device, dtype=q.dtype)
    pb = empty(b, rows, h, k, device=q.device, dtype=q.dtype)
    part = empty(rows, k, d, device=q.device, dtype=torch.float32) if deterministic else dkv
    for s0 in range(0, s, rows):
        n = min(rows, s - s0)
        if use90:
            bwd90.launch(q, kv, indices, dout, lse, delta, dq, ds, pb, s0, n, sm_scale, d_v, cfg90)
        else:
            _sparse_mla_bwd_dq_kernel[(n * nhb, b)](
                q, kv, indices, dout, lse, delta, dq, ds, pb, sm_scale, sm_scale * LOG2E, *common,
                ds.stride(0), ds.stride(1), ds.stride(2), s0, h, t, k, D_V=d_v, D_PE=d_pe, D_PE_P=d_pe_p,
                BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb, num_warps=warps, num_stages=stages)
        for bi in range(b) if deterministic else [None]:
            bsl = slice(None) if bi is None else slice(bi, bi + 1)
            qq, dd, ii, dss, pbb, gk = (x[bsl] for x in (q, dout, indices, ds, pb, dkv))
            _sparse_mla_bwd_dkv_kernel[(n * (n_parts + 1), qq.shape[0])](
                qq, dd, ii, dss, pbb, gk, part, qq.stride(0), qq.stride(1), qq.stride(2), dd.stride(0), dd.stride(1),
                dd.stride(2), ii.stride(0), ii.stride(1), dss.stride(0), dss.stride(1), dss.stride(2),
                gk.stride(0), gk.stride(1), part.stride(0), part.stride(1), s0, h, t, k,
                D_V=d_v, D_PE=d_pe, D_PE_P=d_pe_p, H_P=h_p, CW=cw, BLOCK_K=kbk, N_PARTS=n_parts,
                DETERMINISTIC=deterministic, num_warps=kwarps, num_stages=kstages)
            if deterministic:
                _segment_sum(part[:n], indices[bi, s0:s0 + n], dkv[bi])
    return dq, dkv.to(kv.dtype)


def _segment_sum(part: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[key] += sum of part rows (query, slot) that selected key, in (query, slot) order: deterministic."""
    n, k, d = part.shape
    t = out.shape[0]
    keys = idx.reshape(-1).long()
    valid = (keys >= 0) & (keys < t)
    entry = torch.arange(n * k, device=part.device)[valid]
    keys_sorted, perm = torch.sort(keys[valid], stable=True)
    order = entry[perm].contiguous()
    offs = torch.zeros(t + 1, device=part.device, dtype=torch.int64)
    offs[1:] = torch.cumsum(torch.bincount(keys_sorted, minlength=t), 0)
    block_d = min(256, next_pow2(d))
    _segment_sum_kernel[(t, triton.cdiv(d, block_d))](part, order, offs, out, d, BLOCK_D=block_d)


def _reference_bwd(q, kv, indices, dout, sm_scale, d_v, dlse):
    with torch.enable_grad():
        qq = q.detach().requires_grad_(True)
        kk = kv.detach().requires_grad_(True)
        o, l = ref.sparse_mla(qq, kk, indices, sm_scale, d_v)
        outs, grads = [o], [dout]
        if dlse is not None:
            outs.append(l)
            grads.append(dlse)
        dq, dkv = torch.autograd.grad(outs, (qq, kk), grads)
    return dq, dkv


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
