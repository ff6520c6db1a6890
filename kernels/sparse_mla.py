"""Sparse MLA in MQA (absorbed) form: forward, backward, split-K decode and the autograd Function.

Each query token attends to its own K selected latent entries; all H query heads share one latent KV head of
d_qk = d_v + d_pe dims (V3.2: 512 + 64), and the value is the first d_v dims of the same entry. Layouts and the
-1 = empty slot convention are those of `reference.sparse_mla`.

Run: CPU falls back to the reference (or, with TRITON_INTERPRET=1, runs the kernels in Triton's interpreter on
float32 inputs); one GPU runs the Triton kernels on bf16/fp16 inputs.
"""
from __future__ import annotations

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import (FLOAT_DTYPES, check, check_same_device, check_tensor, empty,
                                        next_pow2, record, use_triton)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# (BLOCK_H, BLOCK_K, num_warps, num_stages) by d_v; overridable per call for the benchmark's sweeps.
FWD_CONFIG = {512: (64, 64, 8, 2), 256: (64, 64, 8, 2)}
BWD_CONFIG = {512: (64, 32, 8, 1), 256: (64, 32, 8, 2)}


if triton is not None:

    @triton.jit
    def _sparse_mla_fwd_kernel(
            Q, KV, IDX, O, LSE, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sob, sos, soh, sosp, slb, sls, slh, slsp,
            H, T, K, k_per_split,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr, PARTIAL: tl.constexpr):
        pid = tl.program_id(0)
        s = pid // NUM_HB                      # head blocks of one token are adjacent: they share the gathered KV in L2
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

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = (O + b.to(tl.int64) * sob + s.to(tl.int64) * sos + split.to(tl.int64) * sosp
                  + offs_h[:, None] * soh + offs_v[None, :])
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_h[:, None])
        l_ptrs = LSE + b.to(tl.int64) * slb + s.to(tl.int64) * sls + split * slsp + offs_h * slh
        tl.store(l_ptrs, lse, mask=mask_h)

    @triton.jit
    def _sparse_mla_bwd_kernel(
            Q, KV, IDX, DO, LSE, DELTA, DQ, DKV, PART, scale, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sdb, sds, sdh, slb, sls, slh, sqgb, sqgs, sqgh, sgb, sgt,
            spr, sph, spk, s_offset, H, T, K,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr, DETERMINISTIC: tl.constexpr):
        pid = tl.program_id(0)
        s = s_offset + pid // NUM_HB
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
        do = tl.load(DO + b64 * sdb + s64 * sds + offs_h[:, None] * sdh + offs_v[None, :],
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
            if DETERMINISTIC:
                part = PART + (s - s_offset).to(tl.int64) * spr + hb * sph + offs_k[:, None].to(tl.int64) * spk
                kmask = (offs_k < K)[:, None]
                tl.store(part + offs_v[None, :], dkn, mask=kmask)
                tl.store(part + D_V + offs_p[None, :], dkp, mask=kmask & mask_p[None, :])
            else:
                g_rows = dkv_base + idx.to(tl.int64)[:, None] * sgt
                tl.atomic_add(g_rows + offs_v[None, :], dkn, mask=valid[:, None], sem="relaxed")
                tl.atomic_add(g_rows + D_V + offs_p[None, :], dkp, mask=valid[:, None] & mask_p[None, :],
                              sem="relaxed")

        dq_rows = DQ + b64 * sqgb + s64 * sqgs + offs_h[:, None] * sqgh
        tl.store(dq_rows + offs_v[None, :], dq_n.to(DQ.dtype.element_ty), mask=mask_h[:, None])
        tl.store(dq_rows + D_V + offs_p[None, :], dq_p.to(DQ.dtype.element_ty),
                 mask=mask_h[:, None] & mask_p[None, :])

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
                   num_splits: int = 1, config: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. Returns (out [B,S,H,d_v] in q's dtype, lse [B,S,H] fp32, natural log; -inf for empty rows).

    num_splits > 1 splits each row's K selected entries over that many programs (flash-decoding) and merges the
    partial results; it pays off only when B*S*ceil(H/64) is too small to fill the GPU (decode).
    """
    _check_inputs(q, kv, indices, d_v)
    ok, why = use_triton(q, kv, indices)
    if ok:
        ok, why2 = _kernel_shape_ok(q, kv, indices, d_v)
        why = why2 or why
    if not ok:
        record("sparse_mla_fwd", "reference", why)
        return ref.sparse_mla(q, kv, indices, sm_scale, d_v)
    record("sparse_mla_fwd", "triton", why)
    b, s, h, d = q.shape
    t, k = kv.shape[1], indices.shape[2]
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
        q, kv, indices, out, lse, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        so[0], so[1], so[2], so[3], sl[0], sl[1], sl[2], sl[3],
        h, t, k, k_per_split,
        D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)), BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb,
        PARTIAL=num_splits > 1, num_warps=warps, num_stages=stages)
    if num_splits == 1:
        return out, lse
    lse_all = torch.logsumexp(lse, dim=2)                                               # [B,S,H]
    wts = torch.exp(lse - lse_all[:, :, None]).nan_to_num(0.0)                         # [B,S,NS,H]
    merged = (out * wts[..., None]).sum(2)
    return merged.to(q.dtype), lse_all


def sparse_mla_decode(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
                      num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode: one or a few queries per sequence (q [B,S_q,H,Dqk], S_q small) against the top-k entries of a
    long latent cache kv [B,T,Dqk]. Splits the top-k over programs so that a small batch still fills the GPU."""
    if num_splits is None:
        b, s, h = q.shape[:3]
        programs = b * s * max(1, -(-h // 64))
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = max(1, min(32, -(-2 * sms // programs)))
    return sparse_mla_fwd(q, kv, indices, sm_scale, d_v, num_splits=num_splits)


def sparse_mla_bwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   dout: torch.Tensor, sm_scale: float, d_v: int, dlse: torch.Tensor | None = None,
                   deterministic: bool = False, config: tuple | None = None,
                   chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (dq like q, dkv like kv). dkv is accumulated in fp32 at the selected rows of the shared latent,
    with atomics by default; `deterministic=True` writes each (token, head block, slot) contribution and sums them in
    a fixed order instead (slower, bitwise reproducible)."""
    _check_inputs(q, kv, indices, d_v)
    check(tuple(out.shape) == (*q.shape[:3], d_v), f"out must be {(*q.shape[:3], d_v)}, got {tuple(out.shape)}")
    check(tuple(dout.shape) == tuple(out.shape), f"dout must be {tuple(out.shape)}, got {tuple(dout.shape)}")
    check(tuple(lse.shape) == tuple(q.shape[:3]), f"lse must be {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
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
    dout = dout.contiguous()
    lse = lse.float().contiguous()
    delta = (out.float() * dout.float()).sum(-1)                                        # [B,S,H]
    if dlse is not None:
        delta = delta - dlse.float()          # d lse / d logits = p, so it folds into Delta
    delta = delta.contiguous()
    bh, bk, warps, stages = _cfg(BWD_CONFIG, d_v, h, config)
    nhb = triton.cdiv(h, bh)
    dq = empty(*q.shape, device=q.device, dtype=q.dtype)
    dkv = torch.zeros(b, t, d, device=q.device, dtype=torch.float32)
    meta = dict(D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)), BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb,
                num_warps=warps, num_stages=stages)

    def launch(rows: int, s_offset: int, bsel: slice, part: torch.Tensor | None, det: bool) -> None:
        qq, kk, ii, dd, ll, de, gq, gk = (x[bsel] for x in (q, kv, indices, dout, lse, delta, dq, dkv))
        pp = part if part is not None else gk
        sp = (pp.stride(0), pp.stride(1), pp.stride(2)) if part is not None else (0, 0, 0)
        _sparse_mla_bwd_kernel[(rows * nhb, qq.shape[0])](
            qq, kk, ii, dd, ll, de, gq, gk, pp, sm_scale, sm_scale * LOG2E,
            qq.stride(0), qq.stride(1), qq.stride(2), kk.stride(0), kk.stride(1), ii.stride(0), ii.stride(1),
            dd.stride(0), dd.stride(1), dd.stride(2), ll.stride(0), ll.stride(1), ll.stride(2),
            gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1),
            sp[0], sp[1], sp[2], s_offset, h, t, k, DETERMINISTIC=det, **meta)

    if not deterministic:
        launch(s, 0, slice(None), None, False)
    else:
        # Contributions of a chunk of rows: [rows, head blocks, K, D] fp32, summed per key in index order.
        per_row = nhb * k * d * 4
        rows = chunk_rows or max(1, min(s, (1 << 30) // per_row))
        for bi in range(b):
            for s0 in range(0, s, rows):
                n = min(rows, s - s0)
                part = empty(n, nhb, k, d, device=q.device, dtype=torch.float32)
                launch(n, s0, slice(bi, bi + 1), part, True)
                keys = indices[bi, s0:s0 + n].long()[:, None, :].expand(n, nhb, k).reshape(-1)   # entry -> key
                valid = (keys >= 0) & (keys < t)
                entry = torch.arange(keys.numel(), device=q.device)[valid]
                keys = keys[valid]
                keys_sorted, perm = torch.sort(keys, stable=True)
                order = entry[perm].contiguous()
                offs = torch.zeros(t + 1, device=q.device, dtype=torch.int64)
                offs[1:] = torch.cumsum(torch.bincount(keys_sorted, minlength=t), 0)
                block_d = min(256, next_pow2(d))
                _segment_sum_kernel[(t, triton.cdiv(d, block_d))](part, order, offs, dkv[bi], d,
                                                                          BLOCK_D=block_d)
    return dq, dkv.to(kv.dtype)


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
    """Sparse MLA with the fused forward and backward; indices carry no gradient."""

    @staticmethod
    def forward(ctx, q, kv, indices, sm_scale, d_v, deterministic=False):
        out, lse = sparse_mla_fwd(q, kv, indices, sm_scale, d_v)
        ctx.save_for_backward(q, kv, indices, out, lse)
        ctx.sm_scale, ctx.d_v, ctx.deterministic = sm_scale, d_v, deterministic
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, indices, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_bwd(q, kv, indices, out, lse, dout, ctx.sm_scale, ctx.d_v, dlse=dlse,
                                 deterministic=ctx.deterministic)
        return dq, dkv, None, None, None, None


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int,
               deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `reference.sparse_mla` that runs the fused kernels and is differentiable in q and kv.

    Returns (out [B,S,H,d_v], lse [B,S,H] fp32). Falls back to the reference (differentiable through torch) where
    the kernels do not apply; `last_path("sparse_mla_fwd")` says which ran.
    """
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return SparseMLAFunction.apply(q, kv, indices, sm_scale, d_v, deterministic)
    return sparse_mla_fwd(q, kv, indices, sm_scale, d_v)


def sparse_mla_flops(s_q: int, top_k: int, h: int, d_qk: int, d_v: int, backward: bool = False) -> float:
    """FLOPs as FlashMLA counts the forward, 2*s_q*k*h*(d_qk+d_v); the backward recomputes QK^T and adds dP, dV, dQ,
    dK: 2*s_q*k*h*(3*d_qk + 2*d_v)."""
    return 2.0 * s_q * top_k * h * ((3 * d_qk + 2 * d_v) if backward else (d_qk + d_v))


__all__ = ["SparseMLAFunction", "sparse_mla", "sparse_mla_bwd", "sparse_mla_decode", "sparse_mla_fwd",
           "sparse_mla_flops"]
