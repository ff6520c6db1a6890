"""Indexer KL loss, forward and backward, blockwise (paper §2.1): L_t = KL(p_t || softmax(I_t)).

The target p_t is the main attention's probability mass summed over heads and L1-normalised over the row,
recomputed on the fly from the attention's q, shared latent kv and LSE (MQA/absorbed form, as sparse_mla takes
them: the absorbed logits equal the MHA ones). Two modes, one kernel:
- sparse stage: I and p restricted to each row's selected set (indices [B,S,K]);
- dense warm-up: the whole causal row (or the row's document with cu_seqlens), walked in key blocks.
Neither mode holds an S x T tensor: one program owns one query row and streams its keys, in the forward once
(pass 1: the softmax statistics and the loss) and in the backward once (pass 2: g = softmax(I) - p and the indexer
gradients, dk by atomics). The forward keeps each row's statistics (the indexer scores' LSE and the target's mass,
[B,S,2] fp32) for pass 2, so the backward does not stream the keys (and, in the warm-up, recompute the target) for
them again.

The gradient reaches the indexer's q, k and head weights only; the target is detached, as in the paper.

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernel in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import (FLOAT_DTYPES, check, check_indices, check_tensor, empty, next_pow2, record,
                                        use_triton)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from dsaforge.kernels.sparse_mla import FWD_CONFIG
from dsaforge.kernels.sparse_mla_blocks import LOG2E, block_config

# Keys per block, warps and pipeline stages of `_indexer_kl_kernel` (one program per query row), chosen by `bench
# --sweep` (`sweep_kl`) on an H200 at s_kv 64K, 4096 rows, k 2048, forward + backward: 64 keys, 4 warps, 2 stages took
# 13.9 ms at V3.2's shape and 4.1 ms at the small preset's, against 19.6 and 6.1 ms for the previous 32 / 8 / 1.
KL_CONFIG = {"block_n": 64, "warps": 4, "stages": 2}


if triton is not None:
    from dsaforge.kernels.sparse_mla_blocks import latent_rows, qk_logits, query_heads, selected_rows

    @triton.jit
    def _target_mass(aq_row, lse_row, kv_base, idx64, valid, saqh, skvt, scale_log2, H,
                     D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr, H_P: tl.constexpr,
                     BLOCK_HA: tl.constexpr, BLOCK_N: tl.constexpr):
        """sum_h exp(scale * q_h . kv_t - lse_h) for a block of keys [BLOCK_N], heads taken BLOCK_HA at a time."""
        kn, kp = latent_rows(kv_base, idx64, valid, skvt, D_V, D_PE, D_PE_P)                     # [BN, D_V]
        p = tl.zeros([BLOCK_N], tl.float32)
        for h0 in tl.static_range(0, H_P, BLOCK_HA):
            offs_h = h0 + tl.arange(0, BLOCK_HA)
            mask_h = offs_h < H
            aq_n, aq_p = query_heads(aq_row + offs_h[:, None] * saqh, mask_h, D_V, D_PE, D_PE_P)  # [BHA, D_V]
            lse = tl.load(lse_row + offs_h, mask=mask_h, other=float("-inf"))
            h_ok = mask_h & (lse > float("-inf"))
            lse2 = tl.where(h_ok, lse * 1.4426950408889634, 0.0)
            att = qk_logits(aq_n, aq_p, kn, kp)                                                  # [BHA, BN]
            pa = tl.exp2(att * scale_log2 - lse2[:, None])
            p += tl.sum(tl.where(h_ok[:, None] & valid[None, :], pa, 0.0), 0)
        return p

    @triton.jit
    def _sparse_target_kernel(
            Q, KV, IDX, LSE, PT, scale_log2, sqb, sqs, sqh, skb, skt, sib, sis, slb, sls, slh, spb, sps, H, T, K,
            D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NUM_HB: tl.constexpr):
        """PT[b,s,slot] (+)= sum over a block of heads of exp(scale * q_h . kv[idx] - lse_h): the unnormalised
        sparse-stage target, laid out like the sparse MLA forward (one program per token and head block)."""
        pid = tl.program_id(0)
        s = pid // NUM_HB
        hb = pid % NUM_HB
        b = tl.program_id(1)
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        q_nope, q_pe = query_heads(Q + b64 * sqb + s64 * sqs + offs_h[:, None] * sqh, mask_h, D_V, D_PE, D_PE_P)
        lse = tl.load(LSE + b64 * slb + s64 * sls + offs_h * slh, mask=mask_h, other=float("-inf"))
        h_ok = mask_h & (lse > float("-inf"))
        lse2 = tl.where(h_ok, lse * 1.4426950408889634, 0.0)
        kv_base = KV + b64 * skb
        idx_base = IDX + b64 * sib + s64 * sis
        pt_row = PT + b64 * spb + s64 * sps
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            _, valid, kn, kp = selected_rows(kv_base, idx_base, offs_k, K, T, skt, D_V, D_PE, D_PE_P)
            pa = tl.exp2(qk_logits(q_nope, q_pe, kn, kp) * scale_log2 - lse2[:, None])
            mass = tl.sum(tl.where(h_ok[:, None] & valid[None, :], pa, 0.0), 0)                   # [BK]
            if NUM_HB == 1:
                tl.store(pt_row + offs_k, mass, mask=offs_k < K)
            else:
                tl.atomic_add(pt_row + offs_k, mass, mask=offs_k < K, sem="relaxed")

    @triton.jit
    def _indexer_kl_kernel(
            IQ, IK, W, AQ, KV, LSE, IDX, START, END, PT, GO, LOSS, DIQ, DIK, DW, STATS, scale_log2,
            siqb, siqs, siqh, sikb, sikt, swb, sws, saqb, saqs, saqh, skvb, skvt, slb, sls, sib, sis,
            S, T, K, HI, H,
            DI: tl.constexpr, D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr,
            HI_P: tl.constexpr, H_P: tl.constexpr, BLOCK_HA: tl.constexpr, BLOCK_N: tl.constexpr,
            SPARSE: tl.constexpr, GRAD: tl.constexpr, HAS_PT: tl.constexpr, STATS_IN: tl.constexpr):
        s = tl.program_id(0)
        b = tl.program_id(1)
        b64 = b.to(tl.int64)
        s64 = s.to(tl.int64)
        offs_j = tl.arange(0, HI_P)
        mask_j = offs_j < HI
        offs_di = tl.arange(0, DI)
        offs_n = tl.arange(0, BLOCK_N)

        iq = tl.load(IQ + b64 * siqb + s64 * siqs + offs_j[:, None] * siqh + offs_di[None, :],
                     mask=mask_j[:, None], other=0.0)                                          # [HI_P, DI]
        w = tl.load(W + b64 * swb + s64 * sws + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        aq_row = AQ + b64 * saqb + s64 * saqs
        lse_row = LSE + b64 * slb + s64 * sls
        if SPARSE:
            lo = 0
            n_keys = K
        else:
            lo = tl.load(START + s)
            n_keys = tl.load(END + s) - lo
        ik_base = IK + b64 * sikb
        kv_base = KV + b64 * skvb
        idx_row = IDX + b64 * sib + s64 * sis
        pt_row = PT + (b64 * S + s64) * K

        stats_row = STATS + (b64 * S + s64) * 2
        if STATS_IN:   # the forward's statistics of this row: the backward skips pass 1
            lse_i = tl.load(stats_row)
            z_safe = tl.load(stats_row + 1)
        else:
            # Pass 1: running max/sum of I (natural log domain), target mass Z, sum p*I and sum p*log p.
            m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_N], tl.float32)
            z_v = tl.zeros([BLOCK_N], tl.float32)
            a_v = tl.zeros([BLOCK_N], tl.float32)
            e_v = tl.zeros([BLOCK_N], tl.float32)
            for n0 in range(0, n_keys, BLOCK_N):
                pos = n0 + offs_n
                if SPARSE:
                    idx = tl.load(idx_row + pos, mask=pos < n_keys, other=-1)
                    valid = (idx >= 0) & (idx < T)
                else:
                    idx = lo + pos
                    valid = pos < n_keys
                idx64 = tl.where(valid, idx, 0).to(tl.int64)
                ki = tl.load(ik_base + idx64[:, None] * sikt + offs_di[None, :], mask=valid[:, None], other=0.0)
                logits = tl.dot(iq, tl.trans(ki))                                                   # [HI_P, BN]
                score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], 0)                              # [BN]
                if HAS_PT:
                    p = tl.load(pt_row + pos, mask=valid, other=0.0)
                else:
                    p = _target_mass(aq_row, lse_row, kv_base, idx64, valid, saqh, skvt, scale_log2, H,
                                     D_V, D_PE, D_PE_P, H_P, BLOCK_HA, BLOCK_N)                      # [BN]
                # Elementwise online logsumexp (per lane), merged once after the loop.
                score_m = tl.where(valid, score, float("-inf"))
                m_new = tl.maximum(m_i, score_m)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_use) + tl.where(valid, tl.exp(score_m - m_use), 0.0)
                m_i = m_new
                z_v += p
                a_v += tl.where(valid, p * score, 0.0)
                e_v += tl.where(p > 0.0, p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0)
            m_all = tl.max(m_i, 0)
            m_all_use = tl.where(m_all == float("-inf"), 0.0, m_all)
            l_all = tl.sum(l_i * tl.exp(m_i - m_all_use), 0)
            lse_i = tl.where(l_all > 0.0, m_all_use + tl.log(tl.where(l_all > 0.0, l_all, 1.0)), 0.0)
            z = tl.sum(z_v, 0)
            z_safe = tl.where(z > 0.0, z, 1.0)
            loss = tl.sum(e_v, 0) / z_safe - tl.log(z_safe) - tl.sum(a_v, 0) / z_safe + lse_i
            loss = tl.where((z > 0.0) & (l_all > 0.0), loss, 0.0)

            tl.store(stats_row, lse_i)
            tl.store(stats_row + 1, z_safe)

        if GRAD:
            go = tl.load(GO + b64 * S + s64)
            diq = tl.zeros([HI_P, DI], tl.float32)
            dw = tl.zeros([HI_P], tl.float32)
            for n0 in range(0, n_keys, BLOCK_N):
                pos = n0 + offs_n
                if SPARSE:
                    idx = tl.load(idx_row + pos, mask=pos < n_keys, other=-1)
                    valid = (idx >= 0) & (idx < T)
                else:
                    idx = lo + pos
                    valid = pos < n_keys
                idx64 = tl.where(valid, idx, 0).to(tl.int64)
                ki = tl.load(ik_base + idx64[:, None] * sikt + offs_di[None, :], mask=valid[:, None], other=0.0)
                logits = tl.dot(iq, tl.trans(ki))
                relu = tl.maximum(logits, 0.0)
                score = tl.sum(relu * w[:, None], 0)
                if HAS_PT:
                    p = tl.load(pt_row + pos, mask=valid, other=0.0)
                else:
                    p = _target_mass(aq_row, lse_row, kv_base, idx64, valid, saqh, skvt, scale_log2, H,
                                     D_V, D_PE, D_PE_P, H_P, BLOCK_HA, BLOCK_N)
                g = tl.where(valid, (tl.exp(score - lse_i) - p / z_safe) * go, 0.0)                # dL/dI [BN]
                dw += tl.sum(relu * g[None, :], 1)
                m = tl.where(logits > 0.0, w[:, None] * g[None, :], 0.0)                          # dL/dlogits
                diq = tl.dot(m.to(ki.dtype), ki, diq)
                dki = tl.dot(tl.trans(m.to(iq.dtype)), iq)                                        # [BN, DI]
                tl.atomic_add(DIK + b64 * T * DI + idx64[:, None] * DI + offs_di[None, :], dki,
                              mask=valid[:, None], sem="relaxed")
            tl.store(DIQ + ((b64 * S + s64) * HI + offs_j[:, None]) * DI + offs_di[None, :], diq, mask=mask_j[:, None])
            tl.store(DW + (b64 * S + s64) * HI + offs_j, dw, mask=mask_j)
        else:
            tl.store(LOSS + b64 * S + s64, loss)


def _check(iq, ik, w, q, kv, lse, indices):
    check_tensor("index_q", iq, 4, FLOAT_DTYPES)
    check_tensor("index_k", ik, 3, FLOAT_DTYPES)
    check_tensor("index_w", w, 3, FLOAT_DTYPES)
    check_tensor("q", q, 4, FLOAT_DTYPES)
    check_tensor("kv", kv, 3, FLOAT_DTYPES)
    check_tensor("lse", lse, 3, (torch.float32,))
    b, s, hi, di = iq.shape
    t = ik.shape[1]
    check(tuple(ik.shape) == (b, t, di), f"index_k must be [B={b}, T, D={di}], got {tuple(ik.shape)}")
    check(tuple(w.shape) == (b, s, hi), f"index_w must be [B={b}, S={s}, Hi={hi}], got {tuple(w.shape)}")
    check(tuple(q.shape[:2]) == (b, s), f"q must be [B={b}, S={s}, H, Dqk], got {tuple(q.shape)}")
    check(tuple(kv.shape) == (b, t, q.shape[3]), f"kv must be [B={b}, T={t}, Dqk={q.shape[3]}], got {tuple(kv.shape)}")
    check(tuple(lse.shape) == tuple(q.shape[:3]), f"lse must be {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if indices is not None:
        check_tensor("indices", indices, 3, (torch.int32,))
        check(tuple(indices.shape[:2]) == (b, s), f"indices must be [B={b}, S={s}, K], got {tuple(indices.shape)}")
        check_indices("indices", indices, t)


def _kernel_ok(iq, q, d_v) -> tuple[bool, str]:
    di, d = iq.shape[-1], q.shape[-1]
    if di != next_pow2(di) or di < 16:
        return False, f"indexer head_dim {di} is not a power of two >= 16"
    if d_v != next_pow2(d_v) or d_v < 16 or d - d_v > 128:
        return False, f"attention dims d_v={d_v}, d_pe={d - d_v} not covered"
    if iq.is_cuda and (iq.dtype == torch.float32 or q.dtype == torch.float32):
        return False, "float32 on GPU (the kernels take bf16/fp16)"
    return True, ""


def sparse_target_mass(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       d_v: int) -> torch.Tensor:
    """[B,S,K] fp32: sum over heads of the main attention's probabilities at each selected slot (0 at -1 slots);
    dividing by its row sum gives the sparse-stage KL target. Triton on GPU inputs, torch otherwise."""
    b, s, h, d = q.shape
    if not use_triton(q, kv, lse, indices)[0]:
        return ref.selected_mass(q, kv, lse, indices, sm_scale)
    bh, bk, warps, stages = block_config(FWD_CONFIG, d_v, h, None)
    nhb = triton.cdiv(h, bh)
    k = indices.shape[2]
    pt = (torch.zeros if nhb > 1 else empty)(b, s, k, device=q.device, dtype=torch.float32)
    _sparse_target_kernel[(s * nhb, b)](
        q, kv, indices, lse, pt, sm_scale * LOG2E, q.stride(0), q.stride(1), q.stride(2), kv.stride(0),
        kv.stride(1), indices.stride(0), indices.stride(1), lse.stride(0), lse.stride(1), lse.stride(2),
        pt.stride(0), pt.stride(1), h, kv.shape[1], k, D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)),
        BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb, num_warps=warps, num_stages=stages)
    return pt


def _launch(iq, ik, w, q, kv, lse, sm_scale, d_v, indices, start, end, go, grad, pt=None, stats=None):
    """One pass of `_indexer_kl_kernel` -> (loss, d index_q, d index_k, d index_w, row statistics [B,S,2]). With
    `stats` from an earlier forward on the same inputs, its first pass over the keys is skipped."""
    b, s, hi, di = iq.shape
    t = ik.shape[1]
    h = q.shape[2]
    dev = iq.device
    loss = empty(b, s, device=dev, dtype=torch.float32)
    diq = empty(b, s, hi, di, device=dev, dtype=torch.float32) if grad else loss
    dik = torch.zeros(b, t, di, device=dev, dtype=torch.float32) if grad else loss
    dw = empty(b, s, hi, device=dev, dtype=torch.float32) if grad else loss
    stats_in = stats is not None
    if not stats_in:
        stats = empty(b, s, 2, device=dev, dtype=torch.float32)
    idx = indices if indices is not None else start
    si = (indices.stride(0), indices.stride(1)) if indices is not None else (0, 0)
    k = indices.shape[2] if indices is not None else 0
    _indexer_kl_kernel[(s, b)](
        iq, ik, w, q, kv, lse, idx, start, end, pt if pt is not None else loss, go if go is not None else loss,
        loss, diq, dik, dw, stats,
        sm_scale * LOG2E,
        iq.stride(0), iq.stride(1), iq.stride(2), ik.stride(0), ik.stride(1), w.stride(0), w.stride(1),
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), lse.stride(0), lse.stride(1),
        si[0], si[1], s, t, k, hi, h,
        DI=di, D_V=d_v, D_PE=q.shape[3] - d_v, D_PE_P=max(16, next_pow2(q.shape[3] - d_v)),
        HI_P=max(16, next_pow2(hi)), H_P=max(16, next_pow2(h)), BLOCK_HA=min(64, max(16, next_pow2(h))),
        BLOCK_N=KL_CONFIG["block_n"], SPARSE=indices is not None, GRAD=grad, HAS_PT=pt is not None,
        STATS_IN=stats_in, num_warps=KL_CONFIG["warps"], num_stages=KL_CONFIG["stages"])
    return loss, diq, dik, dw, stats


class IndexerKLFunction(torch.autograd.Function):
    """Sparse stage: the target mass is computed once (`sparse_target_mass`) and reused by the backward; dense
    warm-up: the forward recomputes it from q, kv and lse, so no S x T tensor is ever stored. Both: the forward's
    row statistics let the backward skip its first pass."""

    @staticmethod
    def forward(ctx, iq, ik, w, q, kv, lse, sm_scale, d_v, indices, start, end, memo, target=None):
        if memo is not None and "loss" in memo:          # a recomputation of the same call: nothing to compute
            loss, pt, stats = memo["loss"], memo["pt"], memo["stats"]
        else:
            pt = target
            if pt is None and indices is not None:
                pt = sparse_target_mass(q, kv, lse, indices, sm_scale, d_v)
            loss, _, _, _, stats = _launch(iq, ik, w, q, kv, lse, sm_scale, d_v, indices, start, end, None, False,
                                           pt)
            if memo is not None:
                memo.update(loss=loss, pt=pt, stats=stats)
        ctx.save_for_backward(iq, ik, w, q, kv, lse, indices, start, end, pt, stats)
        ctx.sm_scale, ctx.d_v, ctx.sparse = sm_scale, d_v, indices is not None
        return loss.clone() if memo is not None else loss   # each call's output is its own tensor

    @staticmethod
    def backward(ctx, grad_loss):
        iq, ik, w, q, kv, lse, indices, start, end, pt, stats = ctx.saved_tensors
        go = grad_loss.float().contiguous()
        _, diq, dik, dw, _ = _launch(iq, ik, w, q, kv, lse, ctx.sm_scale, ctx.d_v,
                                     indices if ctx.sparse else None, start, end, go, True,
                                     pt if ctx.sparse else None, stats)
        return (diq.to(iq.dtype), dik.to(ik.dtype), dw.to(w.dtype)) + (None,) * 10


def indexer_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, q: torch.Tensor,
               kv: torch.Tensor, lse: torch.Tensor, sm_scale: float, d_v: int,
               indices: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
               memo: dict | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row indexer KL [B, S] fp32, differentiable in index_q, index_k and index_w.

    index_q [B,S,Hi,Di], index_k [B,T,Di], index_w [B,S,Hi]: the indexer (inputs detached from the backbone by the
    caller). q [B,S,H,Dqk], kv [B,T,Dqk], lse [B,S,H]: the main attention in absorbed form and its LSE (natural log),
    e.g. from `sparse_mla` in the sparse stage or the dense attention in the warm-up. indices [B,S,K] selects the
    sparse-stage set; without it the dense warm-up loss runs over each causal row (documents with cu_seqlens).
    Sum or average the rows as the trainer's loss needs.

    memo: a dict shared by a call and its recomputation under activation checkpointing (same inputs): the first
    call leaves its loss and sparse-stage target there, and a second call reuses them instead of launching the
    target and loss kernels again; the backward is unchanged. The target is held until then ([B,S,K] fp32).

    target: the sparse stage's unnormalised target mass [B,S,K] fp32 when the caller already has it, as
    `sparse_mla(..., target=True)` returns it from the attention's forward; then no target kernel runs.
    """
    _check(index_q, index_k, index_w, q, kv, lse, indices)
    b, s = index_q.shape[:2]
    t = index_k.shape[1]
    start, end = ref.key_bounds(s, t, cu_seqlens, index_q.device)
    ok, why = use_triton(index_q, index_k, index_w, q, kv, lse)
    if ok:
        ok, why2 = _kernel_ok(index_q, q, d_v)
        why = why2 or why
    if target is not None:
        check(indices is not None, "a precomputed target is the sparse stage's ([B,S,K] over the selected set)")
        check_tensor("target", target, 3, (torch.float32,))
        check(tuple(target.shape) == tuple(indices.shape),
              f"target must be {tuple(indices.shape)}, got {tuple(target.shape)}")
        target = target.detach().contiguous()
    if not ok:
        record("indexer_kl", "reference", why)
        if target is not None:
            target = (target.double() / target.double().sum(-1, keepdim=True).clamp_min(1e-30)).float()
        else:
            target = ref.attention_target(q.detach(), kv.detach(), lse.detach(), sm_scale, indices, cu_seqlens)
        return ref.indexer_kl(index_q, index_k, index_w, target, indices, cu_seqlens)
    record("indexer_kl", "triton", why)
    return IndexerKLFunction.apply(index_q, index_k, index_w, q.detach(), kv.detach(), lse.detach(), sm_scale, d_v,
                                   indices, start, end, memo, target)


__all__ = ["IndexerKLFunction", "indexer_kl", "sparse_target_mass"]
