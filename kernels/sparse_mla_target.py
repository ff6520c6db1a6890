"""The sparse-stage KL target from the sparse MLA forward itself: `sparse_mla(..., target=True)`.

The target is sum_h exp(s_hk - lse_h) at each selected slot k (the main attention's probability, summed over heads),
and the single-pass forward knows lse_h only after its last block. The forward already computes each block's P
relative to the running max for P.V; with STORE_P it also stores it (q's dtype) with that max, a chunk of rows at a
time, and `_selected_mass_kernel` brings every block to the final LSE and sums over heads. The K selected latent
rows are gathered once, by the forward, instead of again by a target kernel that recomputed Q.K^T for every head.

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernels in the interpreter); one GPU runs Triton,
and on sm_90 the Hopper forward's `prefetch` schedule with STORE_P.
"""
from __future__ import annotations

import os

import torch

from dsaforge.kernels import sparse_mla_sm90 as sm90
from dsaforge.kernels._dispatch import empty, next_pow2, record
from dsaforge.kernels.sparse_mla import FWD_CONFIG, _sparse_mla_fwd_kernel
from dsaforge.kernels.sparse_mla_blocks import LOG2E, block_config

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# The forward's block probabilities ([B, rows, H, K] in q's dtype, 512 KiB a row at V3.2's shape) and block maxima
# are stored this many bytes at a time, over the whole batch.
TARGET_SCRATCH_BYTES = 1 << 30


if triton is not None:

    @triton.jit
    def _selected_mass_kernel(
            P, M, LSE, PT, spb, sps, sph, smb, sms, smh, slb, sls, slh, sptb, spts, s_offset, H, K,
            H_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """PT[b, s, slot] = sum_h P[h, slot] * exp2(m[h, block] - lse_h): the forward's stored block probabilities,
        each brought from its block's running max to the row's final LSE, summed over heads (the sparse-stage KL
        target's unnormalised mass). Reads P once; the selected latent rows are not gathered again."""
        s_loc = tl.program_id(0)
        b64 = tl.program_id(1).to(tl.int64)
        s64 = (s_offset + s_loc).to(tl.int64)
        offs_h = tl.arange(0, H_P)
        lse = tl.load(LSE + b64 * slb + s64 * sls + offs_h * slh, mask=offs_h < H, other=float("-inf"))
        h_ok = (offs_h < H) & (lse > float("-inf"))
        lse2 = tl.where(h_ok, lse * 1.4426950408889634, 0.0)
        p_row = P + b64 * spb + s_loc.to(tl.int64) * sps + offs_h[:, None] * sph
        m_row = M + b64 * smb + s_loc.to(tl.int64) * sms + offs_h * smh
        pt_row = PT + b64 * sptb + s64 * spts
        for j in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            f = tl.exp2(tl.load(m_row + j, mask=h_ok, other=0.0) - lse2)                         # [H_P]
            p = tl.load(p_row + offs_k[None, :], mask=h_ok[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            # p > 0 only where a valid key was seen, and there m <= the final max, so f <= 1/l: no inf * 0.
            mass = tl.sum(tl.where(p > 0.0, p * f[:, None], 0.0), 0)
            tl.store(pt_row + offs_k, mass, mask=kmask)


def forward_with_target(q, kv, indices, sm_scale, d_v, chunk_rows: int | None = None):
    """(out, lse, mass [B,S,K] fp32). The target needs each probability against the row's final LSE, which the
    single-pass forward knows only after its last block; so the forward stores every block's P relative to its
    running max (it computes exactly that P for P.V anyway) and that max, a chunk of rows at a time, and
    `_selected_mass_kernel` rescales and sums them over heads. This replaces a second kernel that gathered the K
    selected latent rows again and recomputed Q.K^T for every head."""
    b, s, h, d = q.shape
    t, k = kv.shape[1], indices.shape[2]
    out = empty(b, s, h, d_v, device=q.device, dtype=q.dtype)
    lse = empty(b, s, h, device=q.device, dtype=torch.float32)
    mass = empty(b, s, k, device=q.device, dtype=torch.float32)
    hopper = os.environ.get("DSAFORGE_SM90_FWD", "1") != "0" and sm90.supported(q, kv, indices, d_v)[0]
    if hopper:
        record("sparse_mla_fwd", "triton", "sm90 gluon kernel (prefetch, with the KL target)")
        bh, bk = sm90.BLOCK_H, sm90.SM90_FWD_FALLBACK[1]
    else:
        record("sparse_mla_fwd", "triton", "triton kernel with the KL target")
        bh, bk, warps, stages = block_config(FWD_CONFIG, d_v, h, None)
    nhb, nb = triton.cdiv(h, bh), triton.cdiv(k, bk)
    rows = chunk_rows or max(1, min(s, TARGET_SCRATCH_BYTES // (b * h * (k * q.element_size() + nb * 4))))
    pb = torch.empty(b, rows, h, k, device=q.device, dtype=q.dtype)
    mb = torch.empty(b, rows, h, nb, device=q.device, dtype=torch.float32)
    for s0 in range(0, s, rows):
        n = min(rows, s - s0)
        if hopper:
            sm90.launch(q, kv, indices, out, lse, sm_scale * LOG2E, d_v, sm90.SM90_FWD_FALLBACK,
                        store_p=(pb, mb, s0, n))
        else:
            _sparse_mla_fwd_kernel[(n * nhb, b, 1)](
                q, kv, indices, out, lse, pb, mb, sm_scale * LOG2E,
                q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0),
                indices.stride(1), out.stride(0), out.stride(1), out.stride(2), 0, lse.stride(0), lse.stride(1),
                lse.stride(2), 0, pb.stride(0), pb.stride(1), pb.stride(2), mb.stride(0), mb.stride(1), mb.stride(2),
                s0, h, t, k, k,
                D_V=d_v, D_PE=d - d_v, D_PE_P=max(16, next_pow2(d - d_v)), BLOCK_H=bh, BLOCK_K=bk, NUM_HB=nhb,
                PARTIAL=False, STORE_P=True, num_warps=warps, num_stages=stages)
        _selected_mass_kernel[(n, b)](
            pb, mb, lse, mass, pb.stride(0), pb.stride(1), pb.stride(2), mb.stride(0), mb.stride(1), mb.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), mass.stride(0), mass.stride(1), s0, h, k,
            H_P=max(16, next_pow2(h)), BLOCK_K=bk, num_warps=8 if h >= 64 else 4)
    return out, lse, mass


__all__ = ["TARGET_SCRATCH_BYTES", "forward_with_target"]
