"""What every Triton sparse-MLA kernel shares: a token's query heads, a block of its selected latent rows, their
logits, and the wrappers' input checks and block sizes.

The forward (`sparse_mla`), the backward (`sparse_mla_bwd`) and the indexer KL's target (`kl`) all read one query
token's heads as [BLOCK_H, d_v] + [BLOCK_H, d_pe] (the rope part zero-padded to a power of two), gather the latent
rows its indices select (an index of -1, or >= T, is an empty slot and reads as zeros), and form
S = q_nope . kn^T + q_pe . kp^T. The @triton.jit helpers below are inlined into each kernel, so a kernel's code is
what it was when each wrote these lines itself.
"""
from __future__ import annotations

import torch

from dsaforge.kernels._dispatch import (FLOAT_DTYPES, check, check_indices, check_same_device, check_tensor, next_pow2,
                                        use_triton)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def query_heads(q_rows, mask_h, D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr):
        """q_rows [BH, 1] pointers to a token's heads -> (q_nope [BH, D_V], q_pe [BH, D_PE_P]); masked heads are 0."""
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        q_nope = tl.load(q_rows + offs_v[None, :], mask=mask_h[:, None], other=0.0)
        q_pe = tl.load(q_rows + D_V + offs_p[None, :], mask=mask_h[:, None] & (offs_p < D_PE)[None, :], other=0.0)
        return q_nope, q_pe

    @triton.jit
    def latent_rows(kv_base, idx64, valid, skt, D_V: tl.constexpr, D_PE: tl.constexpr, D_PE_P: tl.constexpr):
        """The latent rows idx64 [N] of one sequence -> (kn [N, D_V], kp [N, D_PE_P]); rows not valid read as 0."""
        offs_v = tl.arange(0, D_V)
        offs_p = tl.arange(0, D_PE_P)
        rows = kv_base + idx64[:, None] * skt
        kn = tl.load(rows + offs_v[None, :], mask=valid[:, None], other=0.0)
        kp = tl.load(rows + D_V + offs_p[None, :], mask=valid[:, None] & (offs_p < D_PE)[None, :], other=0.0)
        return kn, kp

    @triton.jit
    def selected_rows(kv_base, idx_base, offs_k, K, T, skt, D_V: tl.constexpr, D_PE: tl.constexpr,
                      D_PE_P: tl.constexpr):
        """Slots offs_k of a token's K selected indices -> (idx, valid, kn, kp): empty slots (-1, >= T, past K)
        are not valid and their rows are 0."""
        idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < T)
        kn, kp = latent_rows(kv_base, idx.to(tl.int64), valid, skt, D_V, D_PE, D_PE_P)
        return idx, valid, kn, kp

    @triton.jit
    def qk_logits(q_nope, q_pe, kn, kp):
        """S = q . k^T over the latent and rope parts, fp32 [BH, N]."""
        s = tl.dot(q_nope, tl.trans(kn))
        return tl.dot(q_pe, tl.trans(kp), s)


def check_inputs(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> None:
    """Shapes, dtypes, device and index range of a sparse MLA call, with an error naming what is wrong."""
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


def triton_path(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, d_v: int) -> tuple[bool, str]:
    """Whether the Triton kernels run these (checked) inputs, on a GPU or in the interpreter; the reason either way."""
    ok, why = use_triton(q, kv, indices)
    if not ok:
        return ok, why
    d = q.shape[-1]
    if d_v != next_pow2(d_v) or d_v < 16:
        return False, f"d_v={d_v} is not a power of two >= 16"
    if d - d_v > 128:
        return False, f"rope part d_qk - d_v = {d - d_v} > 128"
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        return False, "indices are not contiguous int32"
    if q.is_cuda and q.dtype == torch.float32:
        return False, "float32 on GPU (the kernels take bf16/fp16)"
    return True, why


def block_config(table: dict, d_v: int, h: int, override: tuple | None) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_K, warps, stages) from a kernel's table by d_v (or `override`), BLOCK_H capped at the heads."""
    bh, bk, warps, stages = override or table.get(d_v, (64, 64 if d_v <= 256 else 32, 8, 2))
    return min(bh, max(16, next_pow2(h))), bk, warps, stages
