"""Lightning indexer: I[s,t] = sum_j w[s,j] * relu(q[s,j] . k[t]), bf16 or FP8 e4m3, fused with top-k selection.

`indexer_topk` never holds the [S, T] score matrix: it walks the query rows in chunks, the score kernel writes one
chunk's rows (only the causal / per-document tiles, fp32) into a fixed-size workspace, and the radix-select kernel
of `topk.py` reduces each row to its top_k indices before the next chunk reuses the workspace. Memory is
O(chunk_rows * T), bounded by `workspace_bytes`, whatever the sequence length.

FP8 path (DeepSeek's `fp8_index`): q e4m3 with its per-(token, head) scale folded into the head weights,
k e4m3 with one fp32 scale per token, I[s,t] = k_scale[t] * sum_j w_folded[s,j] * relu(q8[s,j] . k8[t]).
`reference.indexer_fp8_inputs` quantizes bf16 inputs that way. e4m3 keeps 3 mantissa bits, so on its own the fp8
top-k finds about 96% of the exact top-k (k 2048 of 64K keys, Gaussian inputs). With `fp8=True` the wrapper takes the
bf16 q, k, w, quantizes them chunk by chunk, lets the fp8 scores pre-select top_k + margin candidates per row, and
re-scores those exactly from the bf16 inputs (`_indexer_rerank_kernel`) before the final top-k: recall 0.999 for a
margin of top_k / 4, for 2 (top_k + margin) / L of the score pass's products over a causal sequence of L, in bf16
(docs/kernels.md).

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernels in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import os

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
# Which score kernel `_launch_scores` runs by input dtype: "v1" (`_indexer_scores_kernel`) or "v2"
# (`_indexer_scores_kernel_v2`: Q resident, keys streamed). On an H200 at V3.2's shape (Hi 64, D 128, 4096 rows, fp8)
# v2 took 4.66 / 9.71 ms against v1's 5.35 / 10.74 ms at 64K / 128K keys (914 / 891 against 796 / 806 TFLOP/s);
# bf16 is not timed yet and keeps v1. DSAFORGE_INDEXER_SCORE=v1|v2 forces one for both at import.
_FORCED = os.environ.get("DSAFORGE_INDEXER_SCORE")
SCORE_KERNEL = {"fp8": _FORCED or "v2", "bf16": _FORCED or "v1"}
# (BLOCK_R query rows at Hi 64, BLOCK_N keys, KEYS_PER_PROG, num_warps, num_stages) of v2; the GEMM's N = BLOCK_R * 64
# (query, head) columns is kept for other head counts (`_v2_rows`). From ptxas's sm_90a resource usage at Hi 64, D 128
# (not timed yet): fp8 243 registers, 57 KB shared, bf16 238 registers, 97 KB, no spills, so two CTAs share an SM and
# one's head-sum epilogue overlaps the other's wgmma (8 warps with BLOCK_N 128 fit only one CTA).
SCORE_CONFIG_V2 = {"bf16": (4, 64, 8192, 4, 2), "fp8": (4, 64, 8192, 4, 3)}
WORKSPACE_BYTES = 1 << 31
# (BLOCK_C candidates, BLOCK_H heads, num_warps, num_stages) of the re-score kernel. Timed on an H200 at V3.2's shape
# (4096 rows x 2560 candidates of 128K keys): 0.99 ms against 1.17 for (64, 64, 8, 3), 1.35 for (64, 64, 8, 1),
# 1.27 for (32, 64, 4, 2) and 1.16 for (256, 64, 8, 2). Selecting inside this kernel (the row's scores back into
# registers, radix select) was measured too and dropped: it needs 245-255 registers, and the whole fp8 + re-score
# top-k took 14.8-15.8 ms against 14.2 ms with the separate select and gather.
RERANK_CONFIG = (128, 64, 8, 3)
MARGIN_ALIGN = 64


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

    @triton.jit
    def _indexer_scores_kernel_v2(
            Q, KK, W, KS, OUT, START, END,
            sqs, sqh, skt, sws, so_r, row0, n_rows, T,
            HI: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
            KEYS_PER_PROG: tl.constexpr, HAS_KSCALE: tl.constexpr, MASK_OUT: tl.constexpr):
        """`_indexer_scores_kernel` with the (query row, head) pairs as the N dimension of one GEMM: the Q of BLOCK_R
        rows ([BLOCK_R * HP, D], column r * HP + j = row r, head j; HP = Hi padded to a power of two) is loaded once
        and stays resident while the program streams the key tiles of its KEYS_PER_PROG range, instead of every key
        tile reloading Q of all heads. The head sum is a reduction over each row's HP columns of the accumulator,
        which the wgmma layout keeps inside a thread and its quad (no shared-memory round trip)."""
        pid_r = tl.program_id(0)                   # row blocks vary fastest: neighbours share the key range in L2
        pid_k = tl.program_id(1)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < n_rows
        lo = tl.load(START + row0 + offs_r, mask=rmask, other=2147483647)
        hi = tl.load(END + row0 + offs_r, mask=rmask, other=0)
        offs_c = tl.arange(0, BLOCK_R * HP)
        c_row = pid_r * BLOCK_R + offs_c // HP
        c_head = offs_c % HP
        cmask = (c_row < n_rows) & (c_head < HI)
        offs_d = tl.arange(0, D)
        c_ptr = (row0 + c_row).to(tl.int64)
        q_blk = tl.load(Q + c_ptr[:, None] * sqs + c_head[:, None] * sqh + offs_d[None, :], mask=cmask[:, None],
                        other=0.0)                                                                  # [R*HP, D]
        w_blk = tl.load(W + c_ptr * sws + c_head, mask=cmask, other=0.0).to(tl.float32)             # [R*HP]
        # Key tiles [t_lo, t_hi) of this program's range that some row of the block sees (top-k reads only
        # [start, end) of each row); the others are not computed, and written as -inf only with MASK_OUT.
        range_lo = pid_k * KEYS_PER_PROG
        range_hi = tl.minimum(range_lo + KEYS_PER_PROG, T)
        t_lo = tl.minimum(tl.maximum(range_lo, tl.min(lo, 0) // BLOCK_N * BLOCK_N), range_hi)
        t_hi = tl.maximum(t_lo, tl.minimum(range_hi, tl.cdiv(tl.max(hi, 0), BLOCK_N) * BLOCK_N))
        arange_n = tl.arange(0, BLOCK_N)
        out_rows = OUT + offs_r[None, :].to(tl.int64) * so_r                                        # [1, R]
        for n0 in range(t_lo, t_hi, BLOCK_N):
            offs_n = n0 + arange_n
            nmask = offs_n < T
            kt = tl.load(KK + offs_n[:, None].to(tl.int64) * skt + offs_d[None, :], mask=nmask[:, None],
                         other=0.0)                                                                 # [BN, D]
            logits = tl.dot(kt, tl.trans(q_blk))                                                    # [BN, R*HP]
            acc = tl.sum(tl.reshape(tl.maximum(logits, 0.0) * w_blk[None, :], (BLOCK_N, BLOCK_R, HP)), 2)
            if HAS_KSCALE:
                acc = acc * tl.load(KS + offs_n, mask=nmask, other=0.0)[:, None]
            if MASK_OUT:
                seen = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] < hi[None, :])
                acc = tl.where(seen, acc, float("-inf"))
            tl.store(out_rows + offs_n[:, None], acc, mask=nmask[:, None] & rmask[None, :])
        if MASK_OUT:
            ninf = tl.full([BLOCK_N, BLOCK_R], float("-inf"), tl.float32)
            for n0 in range(range_lo, t_lo, BLOCK_N):
                offs_n = n0 + arange_n
                tl.store(out_rows + offs_n[:, None], ninf, mask=(offs_n < T)[:, None] & rmask[None, :])
            for n0 in range(t_hi, range_hi, BLOCK_N):
                offs_n = n0 + arange_n
                tl.store(out_rows + offs_n[:, None], ninf, mask=(offs_n < T)[:, None] & rmask[None, :])

    @triton.jit
    def _act_quant_kernel(X, XQ, SCALE, n_groups, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """e4m3 with one power-of-two fp32 scale per BLOCK contiguous elements (`reference.act_quant_fp8`, bit for
        bit): scale = 2^ceil(log2(max(amax, 1e-4) / 448)), computed on the float's bits so no log2 rounds."""
        g = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = tl.arange(0, BLOCK)
        gmask = g < n_groups
        x = tl.load(X + g[:, None] * BLOCK + offs[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-4)
        bits = (amax / 448.0).to(tl.int32, bitcast=True)
        expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (expo << 23).to(tl.float32, bitcast=True)
        v = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
        # Round to the e4m3 grid here (to nearest, ties to even, like torch's cast) so that the cast below is exact
        # whatever rounding the backend's conversion uses: the grid step is 2^(max(e, -6) - 3) for |v| in [2^e,
        # 2^(e+1)), and adding then subtracting 1.5 * 2^23 steps rounds an fp32 to a multiple of the step.
        # The rounding runs on |v| and the sign goes back on afterwards, so what rounds to zero keeps its sign (-0).
        bits = v.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        big = step * 12582912.0
        r = (tl.abs(v) + big) - big
        v = (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
        tl.store(XQ + g[:, None] * BLOCK + offs[None, :], v.to(XQ.dtype.element_ty), mask=gmask[:, None])
        tl.store(SCALE + g, scale, mask=gmask)

    @triton.jit
    def _take_slots_kernel(CAND, SLOTS, OUT, K, C, BLOCK: tl.constexpr):
        """OUT[r, i] = CAND[r, SLOTS[r, i]], -1 where the slot is -1."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < K
        sl = tl.load(SLOTS + r * K + offs, mask=m, other=-1)
        v = tl.load(CAND + r * C + sl, mask=m & (sl >= 0), other=-1)
        tl.store(OUT + r * K + offs, v, mask=m)

    @triton.jit
    def _indexer_rerank_kernel(
            Q, KK, W, CAND, OUT, sqs, sqh, skt, sws, scr, so_r, C,
            HI: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        """Exact scores of one query row at its candidate keys: OUT[r, c] = sum_j w[r,j] relu(q[r,j] . k[CAND[r,c]]),
        -inf where CAND is -1. The keys are gathered by index (k is small enough to live in L2)."""
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, BLOCK_H)
        q_row = Q + row * sqs
        w_row = W + row * sws
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            idx = tl.load(CAND + row * scr + offs_c, mask=cmask, other=-1)
            valid = idx >= 0
            kt = tl.load(KK + idx[:, None].to(tl.int64) * skt + offs_d[None, :], mask=valid[:, None],
                         other=0.0)                                                                 # [BC, D]
            acc = tl.zeros([BLOCK_C], tl.float32)
            for h0 in tl.static_range(0, HI, BLOCK_H):
                hmask = (h0 + offs_h) < HI
                qh = tl.load(q_row + (h0 + offs_h)[:, None] * sqh + offs_d[None, :], mask=hmask[:, None],
                             other=0.0)                                                             # [BH, D]
                wh = tl.load(w_row + h0 + offs_h, mask=hmask, other=0.0).to(tl.float32)
                logits = tl.dot(qh, tl.trans(kt))                                                   # [BH, BC]
                acc += tl.sum(tl.maximum(logits, 0.0) * wh[:, None], 0)
            acc = tl.where(valid, acc, float("-inf"))
            tl.store(OUT + row * so_r + offs_c, acc, mask=cmask)


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
    if SCORE_KERNEL["fp8" if q.dtype == FP8 else "bf16"] == "v2" and next_pow2(q.shape[1]) <= 256:
        return _launch_scores_v2(q, k, w, k_scale, out, start, end, row0, n_rows, mask_out)
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


def _v2_rows(hi: int, block_r: int) -> int:
    """Query rows per v2 program: the configured GEMM width block_r * 64 (query, head) columns, whatever Hi is (Hi 16
    -> 4x the rows), at least one row. `_launch_scores` keeps v1 for Hi > 256, where one row alone is too wide."""
    return max(1, block_r * 64 // next_pow2(hi))


def _launch_scores_v2(q, k, w, k_scale, out, start, end, row0, n_rows, mask_out, config=None):
    """`_launch_scores` through `_indexer_scores_kernel_v2`; config overrides SCORE_CONFIG_V2 (the sweep's knob)."""
    t, hi = k.shape[0], q.shape[1]
    br, bn, kpp, warps, stages = config or SCORE_CONFIG_V2["fp8" if q.dtype == FP8 else "bf16"]
    hp = next_pow2(hi)
    br = _v2_rows(hi, br)
    if not q.is_cuda:   # the interpreter: no wider than the problem (a dot needs >= 16 columns)
        br = max(min(br, next_pow2(n_rows)), -(-16 // hp))
        bn = min(bn, max(16, next_pow2(t)))
    kpp = max(bn, kpp // bn * bn)
    grid = (triton.cdiv(n_rows, br), triton.cdiv(t, kpp))
    ks = k_scale if k_scale is not None else w
    _indexer_scores_kernel_v2[grid](
        q, k, w, ks, out, start, end, q.stride(0), q.stride(1), k.stride(0), w.stride(0), out.stride(0),
        row0, n_rows, t, HI=hi, HP=hp, D=q.shape[2], BLOCK_R=br, BLOCK_N=bn, KEYS_PER_PROG=kpp,
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


def rerank_margin(top_k: int, rerank: int | None = None) -> int:
    """Candidates the fp8 pass keeps beyond top_k for the exact re-score: top_k / 4 by default (recall 0.999 at
    k 2048 of 64K Gaussian keys, where top_k / 8 gives 0.993), rounded up to a multiple of 64; 0 = no re-score."""
    m = -(-top_k // 4) if rerank is None else int(rerank)
    check(m >= 0, f"rerank (the candidate margin) must be >= 0, got {rerank}")
    return -(-m // MARGIN_ALIGN) * MARGIN_ALIGN


def _check_rerank(q, k, w, candidates):
    check_tensor("q", q, 4, FLOAT_DTYPES)
    check_tensor("k", k, 3, FLOAT_DTYPES)
    check_tensor("w", w, 3, FLOAT_DTYPES)
    check_tensor("candidates", candidates, 3, (torch.int32,))
    check_same_device(q=q, k=k, w=w, candidates=candidates)
    b, s, hi, d = q.shape
    check(k.shape[0] == b and k.shape[2] == d, f"k must be [B={b}, T, D={d}], got {tuple(k.shape)}")
    check(q.dtype == k.dtype, f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    check(tuple(w.shape) == (b, s, hi), f"w must be [B={b}, S={s}, Hi={hi}], got {tuple(w.shape)}")
    check(candidates.shape[:2] == (b, s), f"candidates must be [B={b}, S={s}, C], got {tuple(candidates.shape)}")


def act_quant_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.act_quant_fp8` (DeepSeek's act_quant with power-of-two scales) in one pass: (x e4m3, scale
    [..., D/block] fp32), bit-identical to the reference; the reference itself on CPU."""
    d = x.shape[-1]
    check(d % block == 0, f"last dim {d} is not a multiple of the quantization block {block}")
    ok, _ = use_triton(x)
    if not ok or block != next_pow2(block) or not x.is_contiguous():
        return ref.act_quant_fp8(x, block=block)
    xq = empty(*x.shape, device=x.device, dtype=FP8)
    scale = empty(*x.shape[:-1], d // block, device=x.device, dtype=torch.float32)
    n = x.numel() // block
    rows = max(1, 4096 // block)
    _act_quant_kernel[(triton.cdiv(n, rows),)](x, xq, scale, n, BLOCK=block, ROWS=rows, num_warps=4)
    return xq, scale


def _take_slots(cand: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[r, i] = cand[r, slots[r, i]] (-1 for slot -1); out may be a row-slice of a larger tensor."""
    n, k = slots.shape
    _take_slots_kernel[(n, triton.cdiv(k, 1024))](cand, slots, out, k, cand.shape[1], BLOCK=1024, num_warps=4)


def _launch_rerank(q, k, w, cand, out, config=None):
    """Exact scores of rows q [n,Hi,D] / w [n,Hi] at their candidate keys cand [n,C] of k [T,D] into out [n,C]."""
    bc, bh, warps, stages = config or RERANK_CONFIG
    hi = q.shape[1]
    bh = min(bh, max(16, next_pow2(hi)))
    _indexer_rerank_kernel[(cand.shape[0],)](
        q, k, w, cand, out, q.stride(0), q.stride(1), k.stride(0), w.stride(0), cand.stride(0), out.stride(0),
        cand.shape[1], HI=hi, D=q.shape[2], BLOCK_C=bc, BLOCK_H=bh, num_warps=warps, num_stages=stages)


def indexer_rerank(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Exact index scores at given keys: [B, S, C] fp32, out[b,s,c] = sum_j w[b,s,j] relu(q[b,s,j] . k[b,cand]),
    -inf where candidates[b,s,c] == -1. q [B,S,Hi,D], k [B,T,D] bf16/fp16/fp32, w [B,S,Hi], candidates int32.

    The second stage of `indexer_topk(..., fp8=True)`; memory and work are O(S * C), whatever T is.
    """
    _check_rerank(q, k, w, candidates)
    ok, why = use_triton(q, k, w, candidates)
    if ok:
        ok, why2 = _kernel_ok(q, k)
        why = why2 or why
    if not ok:
        record("indexer_rerank", "reference", why)
        return _reference_rerank(q, k, w, candidates)
    record("indexer_rerank", "triton", why)
    b, s, _, _ = q.shape
    out = empty(b, s, candidates.shape[2], device=q.device, dtype=torch.float32)
    for bi in range(b):
        _launch_rerank(q[bi], k[bi], w[bi], candidates[bi], out[bi])
    return out


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, top_k: int,
                 k_scale: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES, fp8: bool = False,
                 rerank: int | None = None) -> torch.Tensor:
    """Causal top-k of the lightning-indexer scores, without an S x T tensor: [B, S, top_k] int32 key indices.

    q [B,S,Hi,D], k [B,T,D], w [B,S,Hi] (bf16/fp16, or fp8 q/k with k_scale [B,T] and folded w). Queries are the
    last S of T positions; with cu_seqlens (int [N+1], B == 1, S == T) the rows are packed documents and each row
    only sees its own document. Row indices come ascending, -1 pads rows with fewer than top_k visible keys.

    fp8=True takes bf16 q, k, w (no k_scale), scores in fp8 e4m3 as DeepSeek's `fp8_index` (quantized here, chunk
    by chunk), keeps top_k + margin candidates per row and re-scores them exactly from the bf16 inputs before the
    final top-k. `rerank` is the margin (`rerank_margin`: None = top_k / 4, rounded up to 64; 0 = plain fp8 top-k).
    Pre-quantized fp8 inputs (k_scale given) have nothing to re-score from: they give the plain fp8 top-k.
    """
    _check_indexer(q, k, w, k_scale)
    check(top_k > 0, f"top_k must be positive, got {top_k}")
    if fp8:
        check(q.dtype != FP8 and k_scale is None,
              "fp8=True quantizes q and k itself: pass the un-quantized (bf16) q, k, w and no k_scale")
    else:
        check(rerank in (None, 0), "rerank re-scores fp8 candidates from the un-quantized inputs: it needs fp8=True "
              "with bf16 q, k, w" + (" (pre-quantized fp8 q/k cannot be re-scored)" if q.dtype == FP8 else ""))
    b, s, _, d = q.shape
    t = k.shape[1]
    n_cand = min(top_k + rerank_margin(top_k, rerank), t) if fp8 else 0
    if n_cand <= top_k:
        n_cand = 0                     # no margin, or every key fits in top_k: the fp8 top-k is the answer
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
        if not fp8:
            return _reference_indexer_topk(q, k, w, top_k, k_scale, start, end)
        q8, k8, ks, wf = ref.indexer_fp8_inputs(q, k, w)
        if not n_cand:
            return _reference_indexer_topk(q8, k8, wf, top_k, ks, start, end)
        cand = _reference_indexer_topk(q8, k8, wf, n_cand, ks, start, end)
        return _reference_select(_reference_rerank(q, k, w, cand), cand, top_k)
    record("indexer_topk", "triton", why)
    out = empty(b, s, top_k, device=q.device, dtype=torch.int32)
    rows = max(1, min(s, workspace_bytes // (4 * t)))
    if rows < s:
        rows = max(128, rows // 128 * 128)
    ws = empty(rows, t, device=q.device, dtype=torch.float32)
    if n_cand:
        # Second stage, O(rows * n_cand): candidates (ascending key order), their exact scores, the chosen slots.
        cand = empty(rows, n_cand, device=q.device, dtype=torch.int32)
        cand_scores = empty(rows, n_cand, device=q.device, dtype=torch.float32)
        slots = empty(rows, top_k, device=q.device, dtype=torch.int32)
        zeros = torch.zeros(rows, device=q.device, dtype=torch.int32)
        n_valid = (end - start).clamp(max=n_cand).to(torch.int32)           # the fp8 pass fills this many slots
    for bi in range(b):
        if fp8:
            k8, ks = act_quant_fp8(k[bi].contiguous(), block=d)
            ks = ks[:, 0].contiguous()
        else:
            ks = None if k_scale is None else k_scale[bi]
        for r0 in range(0, s, rows):
            n = min(rows, s - r0)
            if fp8:
                q8, qs = act_quant_fp8(q[bi, r0:r0 + n].contiguous(), block=d)    # [n,Hi,D], [n,Hi,1]
                wf = (w[bi, r0:r0 + n].float() * qs[..., 0]).contiguous()
                _launch_scores(q8, k8, wf, ks, ws, start[r0:], end[r0:], 0, n, False)
            else:
                _launch_scores(q[bi], k[bi], w[bi], ks, ws, start, end, r0, n, False)
            if not n_cand:
                launch_topk(ws[:n], start[r0:], end[r0:], out[bi, r0:], top_k, True)
                continue
            cd, cs, sl = cand[:n], cand_scores[:n], slots[:n]
            launch_topk(ws[:n], start[r0:], end[r0:], cd, n_cand, True)
            _launch_rerank(q[bi, r0:], k[bi], w[bi, r0:], cd, cs)
            # Slots are ascending positions in an ascending candidate list, so ties still go to the lower key index.
            launch_topk(cs, zeros, n_valid[r0:], sl, top_k, True)
            _take_slots(cd, sl, out[bi, r0:r0 + n])
    return out


def _ascending(idx: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of each row in ascending order, -1 slots last, padded with -1 to top_k."""
    big = torch.iinfo(torch.int32).max
    idx = torch.sort(idx.masked_fill(idx < 0, big), dim=-1)[0]
    idx = idx.masked_fill(idx == big, -1)
    if idx.shape[-1] < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_k - idx.shape[-1]), -1)], -1)
    return idx


def _reference_indexer_topk(q, k, w, top_k, k_scale, start, end):
    if k_scale is not None:
        scores = ref.indexer_scores_fp8(q, k, k_scale, w, causal=False)
    else:
        scores = ref.indexer_scores(q, k, w, causal=False)
    mask = ref.bounds_mask(start, end, k.shape[1])
    return _ascending(ref.topk_indices(scores.masked_fill(~mask, float("-inf")), top_k), top_k)


@ref.fp32_math
def _reference_rerank(q, k, w, cand):
    """Exact scores at the candidate keys (fp32, or float64 for float64 inputs); -inf where cand == -1."""
    dt = torch.promote_types(q.dtype, torch.float32)
    b = cand.shape[0]
    kg = k.to(dt)[torch.arange(b, device=k.device)[:, None, None], cand.clamp_min(0).long()]   # [B, S, C, D]
    scores = torch.einsum("bshd,bscd->bshc", q.to(dt), kg).relu_()                            # [B, S, Hi, C]
    scores = torch.einsum("bshc,bsh->bsc", scores, w.to(dt))                                  # [B, S, C]
    return scores.masked_fill(cand < 0, float("-inf"))


def _reference_select(scores, cand, top_k):
    """Top-k of the re-scored candidates (ties: lower slot = lower key index), mapped back to key indices."""
    slots = ref.topk_indices(scores, top_k).long()
    idx = torch.where(slots >= 0, cand.gather(-1, slots.clamp_min(0)), -1)
    return _ascending(idx.to(torch.int32), top_k)


def indexer_flops(s_q: int, s_kv: int, heads: int, head_dim: int, causal: bool = True) -> float:
    """Multiply-adds of the q.k products, x2 (the ReLU and the weighted head sum are not counted); causal counts
    the visible (query, key) pairs only, queries being the last s_q of s_kv positions."""
    pairs = s_q * s_kv - (s_q * (s_q - 1)) / 2 if causal else s_q * s_kv
    return 2.0 * pairs * heads * head_dim


__all__ = ["act_quant_fp8", "indexer_flops", "indexer_rerank", "indexer_scores", "indexer_topk", "rerank_margin"]
