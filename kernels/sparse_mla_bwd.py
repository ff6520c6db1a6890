"""Sparse MLA backward (Triton): dQ and dKV of `sparse_mla`, two algorithms and a deterministic option.

"split" (from SPLIT_MIN_HEADS heads up): kernel 1 computes dQ and stores dS and P (q's dtype, a chunk of rows at a
time, BWD_SCRATCH_BYTES); kernel 2 forms dKV = dS^T Q + P^T dO over all heads at once, so each selected row receives
one fp32 atomic add per query instead of one per head block. "fused" (fewer heads): one kernel, dKV added per head
block. `deterministic=True` writes each (query, slot) contribution and sums them per key in a fixed order. On sm_90
the split algorithm's kernel 1 can be the Hopper one (`sparse_mla_bwd_sm90`, opt-in).

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on float32 inputs);
one GPU runs the Triton kernels on bf16/fp16 inputs.
"""
from __future__ import annotations

import os

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import sparse_mla_bwd_sm90 as bwd90
from dsaforge.kernels._dispatch import check, empty, next_pow2, record
from dsaforge.kernels.sparse_mla_blocks import LOG2E, block_config, check_inputs, triton_path

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

# (BLOCK_H, BLOCK_K, num_warps, num_stages) by d_v; overridable per call for the benchmark's sweeps.
# Chosen by `bench --sweep` on an H200 at s_kv 64K (v32: h 128; small: h 16); BLOCK_H is capped at the head count.
BWD_CONFIG = {512: (32, 32, 8, 1), 256: (16, 32, 4, 2)}          # fused backward
DQ_CONFIG = {512: (64, 64, 8, 1), 256: (16, 128, 4, 2)}          # split backward, kernel 1 (as the forward's)
DKV_CONFIG = {512: (64, 128, 8, 3), 256: (128, 128, 8, 2)}       # kernel 2: (BLOCK_K, columns, warps, stages)
SPLIT_MIN_HEADS = 64     # below this the fused backward was faster on the H200 (h 16: 4.6 ms against 7.3 ms)
# The split backward's dS and P ([B, rows, H, K] each, q's dtype) are formed this many bytes at a time, whatever the
# batch: sized per sequence, 16 sequences of 4K at 128 heads held 32 GiB of them (measured 121.6 GiB peak against
# 84.8 for one sequence of 64K, the same tokens).
BWD_SCRATCH_BYTES = 2 << 30


if triton is not None:
    from dsaforge.kernels.sparse_mla_blocks import qk_logits, query_heads, selected_rows

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
    def _row_state(DO, LSE, DELTA, b64, s64, offs_h, mask_h, sdb, sds, sdh, slb, sls, slh, D_V: tl.constexpr):
        """A token's dO heads [BH, D_V], Delta [BH] and, from its LSE, which heads saw a key (row_ok) and the LSE in
        base 2 (0 where none did, so that their P is 0, not nan)."""
        offs_v = tl.arange(0, D_V)
        do = tl.load(DO + b64 * sdb + s64 * sds + offs_h[:, None].to(tl.int64) * sdh + offs_v[None, :],
                     mask=mask_h[:, None], other=0.0)
        lse = tl.load(LSE + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=float("-inf"))
        delta = tl.load(DELTA + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=0.0)
        row_ok = mask_h & (lse > float("-inf"))
        lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
        return do, delta, row_ok, lse2

    @triton.jit
    def _p_ds(q_nope, q_pe, do, kn, kp, valid, row_ok, lse2, delta, scale, scale_log2):
        """P [BH, BK] recomputed from the LSE (0 at empty slots and heads without a key) and
        dS = P (dP - Delta) scale in the rows' dtype, with dP = dO . V^T (V is the latent part of the same rows)."""
        p = tl.exp2(qk_logits(q_nope, q_pe, kn, kp) * scale_log2 - lse2[:, None])
        p = tl.where(row_ok[:, None] & valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(kn))
        return p, (p * (dp - delta[:, None]) * scale).to(kn.dtype)

    @triton.jit
    def _store_dq(DQ, b64, s64, offs_h, mask_h, sqgb, sqgs, sqgh, dq_n, dq_p, D_V: tl.constexpr, D_PE: tl.constexpr,
                  D_PE_P: tl.constexpr):
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        dq_rows = DQ + b64 * sqgb + s64 * sqgs + offs_h[:, None] * sqgh
        tl.store(dq_rows + offs_v[None, :], dq_n.to(DQ.dtype.element_ty), mask=mask_h[:, None])
        tl.store(dq_rows + D_V + offs_p[None, :], dq_p.to(DQ.dtype.element_ty),
                 mask=mask_h[:, None] & (offs_p < D_PE)[None, :])

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
        q_nope, q_pe = query_heads(Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh, mask_h, D_V, D_PE, D_PE_P)
        do, delta, row_ok, lse2 = _row_state(DO, LSE, DELTA, b64, s64, offs_h, mask_h, sdb, sds, sdh, slb, sls, slh,
                                             D_V)
        dq_n = tl.zeros([BLOCK_H, D_V], tl.float32)
        dq_p = tl.zeros([BLOCK_H, D_PE_P], tl.float32)
        kv_base = KV + b64 * skb
        dkv_base = DKV + b64 * sgb
        idx_base = IDX + b64 * sib + s64 * sis
        for k0 in range(0, K, BLOCK_K):
            idx, valid, kn, kp = selected_rows(kv_base, idx_base, k0 + tl.arange(0, BLOCK_K), K, T, skt,
                                               D_V, D_PE, D_PE_P)
            p, ds_lo = _p_ds(q_nope, q_pe, do, kn, kp, valid, row_ok, lse2, delta, scale, scale_log2)   # [BH, BK]
            dq_n = tl.dot(ds_lo, kn, dq_n)
            dq_p = tl.dot(ds_lo, kp, dq_p)
            dkn = tl.dot(tl.trans(ds_lo), q_nope)
            dkn = tl.dot(tl.trans(p.to(kn.dtype)), do, dkn)                                      # [BK, D_V]
            dkp = tl.dot(tl.trans(ds_lo), q_pe)                                                  # [BK, D_PE_P]
            g_rows = dkv_base + idx.to(tl.int64)[:, None] * sgt
            tl.atomic_add(g_rows + offs_v[None, :], dkn, mask=valid[:, None], sem="relaxed")
            tl.atomic_add(g_rows + D_V + offs_p[None, :], dkp, mask=valid[:, None] & mask_p[None, :], sem="relaxed")
        _store_dq(DQ, b64, s64, offs_h, mask_h, sqgb, sqgs, sqgh, dq_n, dq_p, D_V, D_PE, D_PE_P)

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
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)
        q_nope, q_pe = query_heads(Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh, mask_h, D_V, D_PE, D_PE_P)
        do, delta, row_ok, lse2 = _row_state(DO, LSE, DELTA, b64, s64, offs_h, mask_h, sdb, sds, sdh, slb, sls, slh,
                                             D_V)
        dq_n = tl.zeros([BLOCK_H, D_V], tl.float32)
        dq_p = tl.zeros([BLOCK_H, D_PE_P], tl.float32)
        kv_base = KV + b64 * skb
        idx_base = IDX + b64 * sib + s64 * sis
        sp_rows = b64 * spb + s_loc.to(tl.int64) * sps + offs_h[:, None] * sph
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            _, valid, kn, kp = selected_rows(kv_base, idx_base, offs_k, K, T, skt, D_V, D_PE, D_PE_P)
            p, ds_lo = _p_ds(q_nope, q_pe, do, kn, kp, valid, row_ok, lse2, delta, scale, scale_log2)
            dq_n = tl.dot(ds_lo, kn, dq_n)
            dq_p = tl.dot(ds_lo, kp, dq_p)
            smask = mask_h[:, None] & (offs_k < K)[None, :]
            tl.store(DS + sp_rows + offs_k[None, :], ds_lo, mask=smask)
            tl.store(P + sp_rows + offs_k[None, :], p.to(kn.dtype), mask=smask)
        _store_dq(DQ, b64, s64, offs_h, mask_h, sqgb, sqgs, sqgh, dq_n, dq_p, D_V, D_PE, D_PE_P)

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
    On sm_90 GPUs the split algorithm's kernel 1 can be the Hopper (Gluon) one, or that kernel can form dKV itself
    (no scratch, no second kernel), where `sparse_mla_bwd_sm90.supported` takes the shape and deterministic=False:
    opt-in until checked and timed on a GPU (`_sm90_choice`: DSAFORGE_SM90_BWD=1 or =fused, or `config`
    ("sm90", BLOCK_K, stages) or ("sm90-fused", 64, columns)); else `config` is (BLOCK_H, BLOCK_K, warps, stages)
    for the Triton kernel.
    """
    check_inputs(q, kv, indices, d_v)
    check(tuple(out.shape) == (*q.shape[:3], d_v), f"out must be {(*q.shape[:3], d_v)}, got {tuple(out.shape)}")
    check(tuple(dout.shape) == tuple(out.shape), f"dout must be {tuple(out.shape)}, got {tuple(dout.shape)}")
    check(tuple(lse.shape) == tuple(q.shape[:3]), f"lse must be {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    check(algorithm in ("auto", "split", "fused"), f"algorithm must be 'auto', 'split' or 'fused', got {algorithm!r}")
    check(not (deterministic and algorithm == "fused"), "deterministic=True needs algorithm='split'")
    if algorithm == "auto":
        algorithm = "split" if deterministic or q.shape[2] >= SPLIT_MIN_HEADS else "fused"
    ok, why = triton_path(q, kv, indices, d_v)
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

    cfg90, _ = _sm90_choice(q, kv, indices, dout, d_v, config, deterministic)
    if cfg90 is not None and bwd90.is_fused(cfg90):
        record("sparse_mla_bwd", "triton", "sm90 gluon kernel, dKV fused")
        bwd90.launch(q, kv, indices, dout, lse, delta, dq, None, None, 0, s, sm_scale, d_v, cfg90, dkv=dkv)
        return dq, dkv.to(kv.dtype)
    if algorithm == "fused":
        bh, bk, warps, stages = block_config(BWD_CONFIG, d_v, h, None if cfg90 else config)
        nhb = triton.cdiv(h, bh)
        _sparse_mla_bwd_kernel[(s * nhb, b)](
            q, kv, indices, dout, lse, delta, dq, dkv, sm_scale, sm_scale * LOG2E, *common,
            dkv.stride(0), dkv.stride(1), h, t, k, D_V=d_v, D_PE=d_pe, D_PE_P=d_pe_p, BLOCK_H=bh,
            BLOCK_K=bk, NUM_HB=nhb, num_warps=warps, num_stages=stages)
        return dq, dkv.to(kv.dtype)

    use90 = cfg90 is not None
    if use90:
        record("sparse_mla_bwd", "triton", "sm90 gluon dq kernel")
    bh, bk, warps, stages = block_config(DQ_CONFIG, d_v, h, None if cfg90 else config)
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


def _sm90_choice(q, kv, indices, dout, d_v: int, config: tuple | None, deterministic: bool) -> tuple:
    """(the Hopper backward's config to run, or None; why). Opt-in until measured on a GPU: a `config`
    ("sm90", BLOCK_K, stages) or ("sm90-fused", 64, columns), or DSAFORGE_SM90_BWD=1 (the dq kernel inside the
    split algorithm) or =fused (dQ and dKV in one Hopper kernel, whatever the algorithm). An explicit config that
    does not apply is an error; the environment's choice falls back to the Triton kernels."""
    cfg90 = config if config is not None and config[0] in ("sm90", "sm90-fused") else None
    env = os.environ.get("DSAFORGE_SM90_BWD", "0")
    if cfg90 is None and config is None and env != "0":
        check(env in ("1", "fused"), f"DSAFORGE_SM90_BWD must be 0, 1 or fused, got {env!r}")
        cfg90 = bwd90.SM90_FUSED_CONFIG if env == "fused" else bwd90.SM90_BWD_CONFIG
    if cfg90 is None:
        return None, "off (DSAFORGE_SM90_BWD=1 or =fused turns it on)"
    ok, why = (False, "deterministic=True") if deterministic else bwd90.supported(q, kv, indices, dout, d_v, cfg90)
    check(config is None or ok, f"the sm_90 backward config {config} does not apply: {why}")
    return (cfg90 if ok else None), why


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

