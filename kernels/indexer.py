"""Lightning indexer: I[s,t] = sum_j w[s,j] * relu(q[s,j] . k[t]), bf16 or FP8 e4m3, fused with top-k selection.

`indexer_topk` never holds the [S, T] score matrix: it walks the query rows in chunks, the score kernel writes one
chunk's rows (only the causal / per-document tiles, fp32) into a fixed-size workspace, and the radix-select kernel
of `topk.py` reduces each row to its top_k indices before the next chunk reuses the workspace. Memory is
O(chunk_rows * T), bounded by `workspace_bytes`, whatever the sequence length.

FP8 path (DeepSeek's `fp8_index`): q e4m3 with its per-(token, head) scale folded into the head weights,
k e4m3 with one fp32 scale per token, I[s,t] = k_scale[t] * sum_j w_folded[s,j] * relu(q8[s,j] . k8[t]).
`reference.indexer_fp8_inputs` quantizes bf16 inputs that way.

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernels in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import (FLOAT_DTYPES, check, check_same_device, check_tensor, empty,
                                        next_pow2, record, use_triton)
from dsaforge.kernels.topk import launch_topk

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

FP8 = torch.float8_e4m3fn
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for bf16 and fp8 inputs.
SCORE_CONFIG = {"bf16": (128, 128, 8, 3), "fp8": (128, 128, 8, 3)}
WORKSPACE_BYTES = 1 << 31


if triton is not None:

    @triton.jit
    def _indexer_scores_kernel(
            Q, KK, W, KS, OUT, START, END,
            sqs, sqh, skt, sws, so_r, row0, n_rows, T,
            HI: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_KSCALE: tl.constexpr, MASK_OUT: tl.constexpr):
        pid_n = tl.program_id(0)                   # key blocks vary fastest: neighbours share the query block in L2
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = offs_m < n_rows
        rows = row0 + offs_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        lo = tl.load(START + rows, mask=rmask, other=2147483647)
        hi = tl.load(END + rows, mask=rmask, other=0)
        # Tiles no row of the block can see are skipped: top-k reads only [start, end) of each row.
        live = (pid_n * BLOCK_N < tl.max(hi, 0)) & ((pid_n + 1) * BLOCK_N > tl.min(lo, 0))
        if live | MASK_OUT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if live:
                kt = tl.load(KK + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], mask=(offs_n < T)[:, None],
                             other=0.0)                                                             # [BN, D]
                q_rows = Q + rows[:, None].to(tl.int64) * sqs + offs_d[None, :]
                w_rows = W + rows.to(tl.int64) * sws
                for j in range(HI):
                    qj = tl.load(q_rows + j * sqh, mask=rmask[:, None], other=0.0)                  # [BM, D]
                    wj = tl.load(w_rows + j, mask=rmask, other=0.0).to(tl.float32)
                    logits = tl.dot(qj, tl.trans(kt))
                    acc += tl.maximum(logits, 0.0) * wj[:, None]
                if HAS_KSCALE:
                    acc = acc * tl.load(KS + offs_n, mask=offs_n < T, other=0.0)[None, :]
            if MASK_OUT:
                seen = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
                acc = tl.where(seen, acc, float("-inf"))
            out = OUT + offs_m[:, None].to(tl.int64) * so_r + offs_n[None, :]
            tl.store(out, acc, mask=rmask[:, None] & (offs_n < T)[None, :])


def _check_indexer(q, k, w, k_scale):
    check_tensor("q", q, 4, (*FLOAT_DTYPES, FP8))
    check_tensor("k", k, 3, (*FLOAT_DTYPES, FP8))
    check_tensor("w", w, 3, FLOAT_DTYPES)
    check_same_device(q=q, k=k, w=w, k_scale=k_scale)
    b, s, hi, d = q.shape
    check(k.shape[0] == b and k.shape[2] == d,
          f"k must be [B={b}, T, D={d}] (one key for all heads), got {tuple(k.shape)}")
    check(tuple(w.shape) == (b, s, hi), f"w must be [B={b}, S={s}, Hi={hi}], got {tuple(w.shape)}")
    check(s <= k.shape[1], f"queries are the last S of T positions: S={s} > T={k.shape[1]}")
    fp8 = q.dtype == FP8
    check((k.dtype == FP8) == fp8, f"q and k must both be fp8 or both not, got {q.dtype} and {k.dtype}")
    if fp8:
        check(k_scale is not None, "the fp8 path needs k_scale [B, T] (one fp32 scale per key token)")
    if k_scale is not None:
        check(tuple(k_scale.shape) == (b, k.shape[1]),
              f"k_scale must be [B={b}, T={k.shape[1]}], got {tuple(k_scale.shape)}")
    else:
        check(q.dtype == k.dtype, f"q and k must share a dtype, got {q.dtype} and {k.dtype}")


def _kernel_ok(q, k) -> tuple[bool, str]:
    d = q.shape[-1]
    if d != next_pow2(d) or d < 16:
        return False, f"head_dim {d} is not a power of two >= 16"
    if q.is_cuda and q.dtype == torch.float32:
        return False, "float32 on GPU (the kernels take bf16/fp16/fp8)"
    return True, ""


def _launch_scores(q, k, w, k_scale, out, start, end, row0, n_rows, mask_out):
    """Scores of rows [row0, row0+n_rows) of one sequence (q [S,Hi,D], k [T,D], w [S,Hi]) into out [n_rows, T]."""
    t = k.shape[0]
    bm, bn, warps, stages = SCORE_CONFIG["fp8" if q.dtype == FP8 else "bf16"]
    if not q.is_cuda:
        bm, bn = min(bm, max(16, next_pow2(n_rows))), min(bn, max(16, next_pow2(t)))
    grid = (triton.cdiv(t, bn), triton.cdiv(n_rows, bm))
    ks = k_scale if k_scale is not None else w
    _indexer_scores_kernel[grid](
        q, k, w, ks, out, start, end, q.stride(0), q.stride(1), k.stride(0), w.stride(0), out.stride(0),
        row0, n_rows, t, HI=q.shape[1], D=q.shape[2], BLOCK_M=bm, BLOCK_N=bn,
        HAS_KSCALE=k_scale is not None, MASK_OUT=mask_out, num_warps=warps, num_stages=stages)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, causal: bool = True,
                   k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense [B, S, T] fp32 index scores (the `reference.indexer_scores` contract; -inf at future keys when causal).

    This materialises S x T: use it for short sequences and tests; `indexer_topk` is the long-context path.
    With fp8 q/k give k_scale [B, T] and the q-scale-folded weights as w.
    """
    _check_indexer(q, k, w, k_scale)
    ok, why = use_triton(q, k, w)
    if ok:
        ok, why2 = _kernel_ok(q, k)
        why = why2 or why
    if not ok:
        record("indexer_scores", "reference", why)
        if k_scale is not None:
            return ref.indexer_scores_fp8(q, k, k_scale, w, causal=causal)
        return ref.indexer_scores(q, k, w, causal=causal)
    record("indexer_scores", "triton", why)
    b, s, _, _ = q.shape
    t = k.shape[1]
    start, end = ref.key_bounds(s, t, None, q.device)
    if not causal:
        start, end = torch.zeros_like(start), torch.full_like(end, t)
    out = empty(b, s, t, device=q.device, dtype=torch.float32)
    for bi in range(b):
        _launch_scores(q[bi], k[bi], w[bi], None if k_scale is None else k_scale[bi], out[bi], start, end, 0, s, True)
    return out


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int,
                 k_scale: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> torch.Tensor:
    """Causal top-k of the lightning-indexer scores, without an S x T tensor: [B, S, top_k] int32 key indices.

    q [B,S,Hi,D], k [B,T,D], w [B,S,Hi] (bf16/fp16, or fp8 q/k with k_scale [B,T] and folded w). Queries are the
    last S of T positions; with cu_seqlens (int [N+1], B == 1, S == T) the rows are packed documents and each row
    only sees its own document. Row indices come ascending, -1 pads rows with fewer than top_k visible keys.
    """
    _check_indexer(q, k, w, k_scale)
    check(top_k > 0, f"top_k must be positive, got {top_k}")
    b, s, _, _ = q.shape
    t = k.shape[1]
    if cu_seqlens is not None:
        check(b == 1, f"packed sequences (cu_seqlens) need B == 1, got B={b}")
        check(s == t, f"packed sequences need S == T, got S={s}, T={t}")
    ok, why = use_triton(q, k, w)
    if ok:
        ok, why2 = _kernel_ok(q, k)
        why = why2 or why
    start, end = ref.key_bounds(s, t, cu_seqlens, q.device)
    if not ok:
        record("indexer_topk", "reference", why)
        return _reference_indexer_topk(q, k, w, top_k, k_scale, start, end)
    record("indexer_topk", "triton", why)
    out = empty(b, s, top_k, device=q.device, dtype=torch.int32)
    rows = max(1, min(s, workspace_bytes // (4 * t)))
    if rows < s:
        rows = max(128, rows // 128 * 128)
    ws = empty(rows, t, device=q.device, dtype=torch.float32)
    for bi in range(b):
        ks = None if k_scale is None else k_scale[bi]
        for r0 in range(0, s, rows):
            n = min(rows, s - r0)
            _launch_scores(q[bi], k[bi], w[bi], ks, ws, start, end, r0, n, False)
            launch_topk(ws[:n], start[r0:], end[r0:], out[bi, r0:], top_k, True)
    return out


def _reference_indexer_topk(q, k, w, top_k, k_scale, start, end):
    if k_scale is not None:
        scores = ref.indexer_scores_fp8(q, k, k_scale, w, causal=False)
    else:
        scores = ref.indexer_scores(q, k, w, causal=False)
    mask = ref.bounds_mask(start, end, k.shape[1])
    idx = ref.topk_indices(scores.masked_fill(~mask, float("-inf")), top_k)
    big = torch.iinfo(torch.int32).max
    idx = torch.sort(idx.masked_fill(idx < 0, big), dim=-1)[0]
    idx = idx.masked_fill(idx == big, -1)
    if idx.shape[-1] < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_k - idx.shape[-1]), -1)], -1)
    return idx


def indexer_flops(s_q: int, s_kv: int, heads: int, head_dim: int, causal: bool = True) -> float:
    """Multiply-adds of the q.k products, x2 (the ReLU and the weighted head sum are not counted); causal counts
    the visible (query, key) pairs only, queries being the last s_q of s_kv positions."""
    pairs = s_q * s_kv - (s_q * (s_q - 1)) / 2 if causal else s_q * s_kv
    return 2.0 * pairs * heads * head_dim


__all__ = ["indexer_flops", "indexer_scores", "indexer_topk"]
