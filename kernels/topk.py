"""Exact top-k selection by radix select, one program per row, deterministic on ties.

Each fp32 score maps to an order-preserving uint32 key. Four 8-bit histogram rounds fix the k-th largest key
exactly (tau) and how many keys equal to tau still fit; the selection then takes every key > tau and the
lowest-indexed keys == tau, so ties always resolve to the lower key index, as `reference.topk_indices` does.
To read the row about once instead of five times, a strided sample first gives a threshold just below the k-th
largest key, one pass keeps the keys above it (about 1.4 k of them, in index order) and the radix rounds run on
those candidates in registers; a row whose candidates do not number between k and 2k (skewed sample, heavy ties)
takes the full-row radix passes instead, so the result is exact either way.

Unlike the reference (descending score order), the kernel returns each row's indices in ascending key order:
attention only needs the set, and ascending order makes the KV gather walk memory forwards. Slots past the
number of visible keys hold -1. Rows may restrict themselves to a key range [start, end) (causal / packed).

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernel in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import check, check_tensor, empty, next_pow2, record, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

TOPK_CONFIG = {"block": 8192, "warps": 16}      # chosen by `bench --sweep` on an H200 (4096 x 128K, k 2048)
SAMPLE_BLOCK = 4096          # at most this many sampled keys per row (strided)


if triton is not None:

    @triton.jit
    def _ukey(x):
        """fp32 -> uint32 in the same order (negative floats get their magnitude bits flipped)."""
        bits = x.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)

    @triton.jit
    def _digit_step(hist, remaining, prefix, pmask, shift):
        """One radix round: the digit d* with count(> d*) < remaining <= count(>= d*) joins the prefix."""
        bins = tl.arange(0, 256)
        ge = tl.sum(hist) - tl.cumsum(hist, 0) + hist
        gt = ge - hist
        hit = (gt < remaining) & (ge >= remaining)
        d_star = tl.sum(tl.where(hit, bins, 0))
        remaining -= tl.sum(tl.where(hit, gt, 0))
        prefix |= d_star.to(tl.uint32) << shift
        pmask |= tl.full([1], 0xFF, tl.uint32) << shift
        return remaining, prefix, pmask

    @triton.jit
    def _select_in_block(key, valid, kk):
        """Exact kk-th largest of the valid keys of one in-register block: (tau, how many keys == tau fit)."""
        prefix = tl.zeros([1], tl.uint32)
        pmask = tl.zeros([1], tl.uint32)
        remaining = tl.zeros([1], tl.int32) + kk
        for r in tl.static_range(4):
            shift = 24 - 8 * r
            match = valid & ((key & pmask) == prefix)
            hist = tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
            remaining, prefix, pmask = _digit_step(hist, remaining, prefix, pmask, shift)
        return prefix, remaining

    @triton.jit
    def _radix_topk_kernel(X, START, END, OUT, CAND_IDX, CAND_KEY, sxr, sor, scr, K, stride_s, m_target,
                           HAS_BOUNDS: tl.constexpr, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, CAP: tl.constexpr):
        row = tl.program_id(0)
        x_row = X + row.to(tl.int64) * sxr
        out_row = OUT + row.to(tl.int64) * sor
        if HAS_BOUNDS:
            lo = tl.load(START + row)
            hi = tl.load(END + row)
        else:
            lo = 0
            hi = tl.load(END)
        n = hi - lo
        offs = tl.arange(0, BLOCK)
        if n <= K:
            # Every visible key is selected: no search needed.
            for k0 in range(0, K, BLOCK):
                o = k0 + offs
                x = tl.load(x_row + lo + o, mask=o < n, other=float("-inf"))
                tl.store(out_row + o, tl.where(x == float("-inf"), -1, lo + o), mask=o < K)
        else:
            # Fast path. A strided sample of the row gives a threshold t a little below the k-th largest key; one pass
            # keeps the keys >= t (in index order) as candidates, and the exact selection runs on those alone.
            so = tl.arange(0, S_BLOCK)
            spos = lo + so * stride_s
            smask = spos < hi
            skey = _ukey(tl.load(x_row + spos, mask=smask, other=0.0))
            n_s = tl.sum(smask.to(tl.int32))
            t, _ = _select_in_block(skey, smask, tl.minimum(m_target, n_s))
            cand_i = CAND_IDX + row.to(tl.int64) * scr
            cand_k = CAND_KEY + row.to(tl.int64) * scr
            cnt = tl.zeros([1], tl.int32)
            for s0 in range(lo, hi, BLOCK):
                o = s0 + offs
                inb = o < hi
                key = _ukey(tl.load(x_row + o, mask=inb, other=0.0))
                keep = inb & (key >= t)
                keep_i = keep.to(tl.int32)
                pos = cnt + tl.cumsum(keep_i, 0) - keep_i
                ok = keep & (pos < CAP)
                tl.store(cand_i + pos, o, mask=ok)
                tl.store(cand_k + pos, key.to(tl.int32, bitcast=True), mask=ok)
                cnt += tl.sum(keep_i)
            c = tl.sum(cnt)
            if (c >= K) & (c <= CAP):
                co = tl.arange(0, CAP)
                cm = co < c
                ckey = tl.load(cand_k + co, mask=cm, other=0).to(tl.uint32, bitcast=True)
                cidx = tl.load(cand_i + co, mask=cm, other=0)
                tau, rem = _select_in_block(ckey, cm, K)
                gt = cm & (ckey > tau)
                eq = cm & (ckey == tau)
                eq_i = eq.to(tl.int32)
                take = gt | (eq & ((tl.cumsum(eq_i, 0) - eq_i) < rem))
                take_i = take.to(tl.int32)
                pos = tl.cumsum(take_i, 0) - take_i
                neg_inf = ckey == 0x007FFFFF          # _ukey(-inf)
                tl.store(out_row + pos, tl.where(neg_inf, -1, cidx), mask=take)
            else:
                # Exact radix select over the whole row: four 8-bit histogram passes, then one selection pass.
                prefix = tl.zeros([1], tl.uint32)
                pmask = tl.zeros([1], tl.uint32)
                remaining = tl.zeros([1], tl.int32) + K
                for r in tl.static_range(4):
                    shift = 24 - 8 * r
                    hist = tl.zeros([256], tl.int32)
                    for s0 in range(lo, hi, BLOCK):
                        o = s0 + offs
                        inb = o < hi
                        key = _ukey(tl.load(x_row + o, mask=inb, other=0.0))
                        match = inb & ((key & pmask) == prefix)
                        hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
                    remaining, prefix, pmask = _digit_step(hist, remaining, prefix, pmask, shift)
                # prefix is now the k-th largest key (tau); `remaining` keys equal to tau still fit.
                written = tl.zeros([1], tl.int32)
                eq_seen = tl.zeros([1], tl.int32)
                for s0 in range(lo, hi, BLOCK):
                    o = s0 + offs
                    inb = o < hi
                    x = tl.load(x_row + o, mask=inb, other=0.0)
                    key = _ukey(x)
                    gt_tau = inb & (key > prefix)
                    eq_tau = inb & (key == prefix)
                    eq_i = eq_tau.to(tl.int32)
                    eq_rank = eq_seen + tl.cumsum(eq_i, 0) - eq_i
                    take = gt_tau | (eq_tau & (eq_rank < remaining))
                    take_i = take.to(tl.int32)
                    pos = written + tl.cumsum(take_i, 0) - take_i
                    tl.store(out_row + pos, tl.where(x == float("-inf"), -1, o), mask=take)
                    written += tl.sum(take_i)
                    eq_seen += tl.sum(eq_i)


def launch_topk(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, out: torch.Tensor, top_k: int,
                has_bounds: bool) -> None:
    """Run the radix top-k kernel over the rows of x [rows, T] (row stride free, last dim contiguous) into out."""
    rows, t = x.shape
    cap = 2 * next_pow2(top_k)
    stride_s = max(1, -(-t // SAMPLE_BLOCK))
    m_target = (7 * top_k) // (5 * stride_s) + 8        # expect ~1.4 k candidates: >= k and <= cap almost always
    cand = torch.empty(2, rows, cap, device=x.device, dtype=torch.int32)
    _radix_topk_kernel[(rows,)](x, start, end, out, cand[0], cand[1], x.stride(0), out.stride(0), cand.stride(1),
                                top_k, stride_s, m_target, HAS_BOUNDS=has_bounds, BLOCK=TOPK_CONFIG["block"],
                                S_BLOCK=SAMPLE_BLOCK, CAP=cap, num_warps=TOPK_CONFIG["warps"])


def topk_indices(scores: torch.Tensor, top_k: int, start: torch.Tensor | None = None,
                 end: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] int32 indices of the top_k largest scores of each row of `scores` [..., T] (fp32).

    Without bounds every row covers all T keys; with start/end ([rows] int32 each) row r covers
    [start[r], end[r]) (cheaper: keys outside are never read). A selected -inf score and a slot beyond the visible
    count both read -1, as in `reference.topk_indices`. Ties resolve to the lower index; the valid indices of a row
    come in ascending order.
    """
    check_tensor("scores", scores, scores.dim(), (torch.float32,))
    check(scores.dim() >= 1 and scores.shape[-1] > 0, f"scores must be [..., T] with T > 0, got {tuple(scores.shape)}")
    check(top_k > 0, f"top_k must be positive, got {top_k}")
    t = scores.shape[-1]
    lead = scores.shape[:-1]
    rows = scores.reshape(-1, t)
    check(rows.stride(-1) == 1, "scores must be contiguous in the last dim")
    if (start is None) != (end is None):
        raise ValueError("give both start and end, or neither")
    if start is not None:
        check(start.numel() == rows.shape[0] and end.numel() == rows.shape[0],
              f"start/end need one entry per row ({rows.shape[0]}), got {start.numel()} and {end.numel()}")
    if start is None:
        top_k = min(top_k, t)          # as the reference: never more slots than keys
    ok, why = use_triton(scores)
    if not ok:
        record("topk", "reference", why)
        return _reference_topk(rows, top_k, start, end).reshape(*lead, top_k)
    record("topk", "triton", why)
    out = empty(rows.shape[0], top_k, device=scores.device, dtype=torch.int32)
    if start is None:
        s_t = e_t = torch.full((1,), t, device=scores.device, dtype=torch.int32)
    else:
        s_t = start.to(device=scores.device, dtype=torch.int32).contiguous()
        e_t = end.to(device=scores.device, dtype=torch.int32).contiguous()
    launch_topk(rows, s_t, e_t, out, top_k, start is not None)
    return out.reshape(*lead, top_k)


def _reference_topk(rows: torch.Tensor, top_k: int, start, end) -> torch.Tensor:
    if start is not None:
        mask = ref.bounds_mask(start.to(rows.device), end.to(rows.device), rows.shape[-1])
        rows = rows.masked_fill(~mask, float("-inf"))
        idx = ref.topk_indices(rows[None], top_k)[0]
    else:
        idx = ref.topk_indices(rows[None], top_k)[0]
    idx = torch.sort(idx.masked_fill(idx < 0, torch.iinfo(torch.int32).max), dim=-1)[0]
    idx = idx.masked_fill(idx == torch.iinfo(torch.int32).max, -1)
    if idx.shape[-1] < top_k:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], top_k - idx.shape[-1]), -1)], -1)
    return idx


__all__ = ["topk_indices"]
