"""Exact top-k selection of fp32 scores, deterministic on ties, several programs per row.

Each fp32 score maps to an order-preserving uint32 key; radix rounds of 8-bit histograms fix the k-th largest key
exactly (tau) and how many keys equal to tau still fit, and the selection takes every key > tau and the
lowest-indexed keys == tau, so ties resolve to the lower key index, as `reference.topk_indices` does.

A long row is read about once, by four kernels:
1. sample: one program per row reads 1024 aligned groups of 8 keys spread over the row and picks, by radix select
   on the sample, a threshold t a little below the k-th largest key (about 1.45 k keys >= t expected);
2. filter: each row is split into segments of `TOPK_CONFIG["segment"]` keys, one program each with few registers;
   it streams its segment in pipelined blocks (unmasked vector loads inside the bounds) and appends the keys >= t,
   packed with their indices, to the row's candidate buffer: one atomic add per block reserves a contiguous chunk,
   so there is no scan across blocks;
3. select: one program per row moves the chunks back into index order (the per-block counts say where each chunk
   belongs) and runs the exact radix select on the candidates in registers;
4. fallback: a row whose candidates do not number between k and the buffer's capacity (skewed sample, heavy ties)
   gets four full-row histogram passes instead, so the result is exact either way; other rows return at once.
Rows short enough for the select kernel's registers skip 1, 2 and 4 and select on the row itself.

Unlike the reference (descending score order), a row's valid indices come in ascending key order, followed by -1
for each selected -inf score or slot past the number of visible keys: attention only needs the set, and ascending
order makes the KV gather walk memory forwards. Rows may restrict themselves to a key range [start, end).

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernels in the interpreter); one GPU runs Triton.
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

# Filter kernel: keys per loop step (block), warps, load pipelining depth (stages) and keys of a row per program
# (segment); groups of 8 keys in a row's sample; rows of up to `direct` keys select in registers without a filter.
# Chosen from ptxas register counts for sm_90 (89 registers: 5 programs and 10 blocks in flight per SM), not timed.
TOPK_CONFIG = {"block": 1024, "warps": 4, "stages": 3, "segment": 16384, "sample_groups": 1024, "direct": 8192}
CAND_MIN = 1024              # candidate buffer capacity floor (small k: the sample's relative error is larger)


if triton is not None:
    NEG_INF_KEY = tl.constexpr(0x007FFFFF)        # _ukey(-inf)

    @triton.jit
    def _ukey(x):
        """fp32 -> uint32 in the same order (negative floats get their magnitude bits flipped)."""
        bits = x.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)

    @triton.jit
    def _row_bounds(START, END, row, HAS_BOUNDS: tl.constexpr):
        """[lo, hi) of a row's keys: per-row bounds, or the whole row with END[0] its length."""
        if HAS_BOUNDS:
            return tl.load(START + row), tl.load(END + row)
        return 0, tl.load(END)

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
    def _take_and_store(out_row, ckey, cidx, cm, kk, K, CAP: tl.constexpr):
        """Select the kk largest of the valid candidates (index order) and write them ascending, then -1 up to K."""
        tau, rem = _select_in_block(ckey, cm, kk)
        eq = cm & (ckey == tau)
        eq_i = eq.to(tl.int32)
        take = (cm & (ckey > tau)) | (eq & ((tl.cumsum(eq_i, 0) - eq_i) < rem))
        keep = take & (ckey != NEG_INF_KEY)
        keep_i = keep.to(tl.int32)
        tl.store(out_row + tl.cumsum(keep_i, 0) - keep_i, cidx, mask=keep)
        co = tl.arange(0, CAP)
        tl.store(out_row + co, -1, mask=(co >= tl.sum(keep_i)) & (co < K))

    @triton.jit
    def _sample_kernel(X, START, END, THR, COUNT, sxr, K, HAS_BOUNDS: tl.constexpr, CAP: tl.constexpr,
                       G: tl.constexpr):
        row = tl.program_id(0)
        lo, hi = _row_bounds(START, END, row, HAS_BOUNDS)
        n = hi - lo
        tl.store(COUNT + row, 0)
        if n > CAP:
            # G groups of 8 consecutive keys (one 32-byte sector each), evenly spaced from an 8-aligned start.
            a0 = ((lo + 7) >> 3) << 3
            gs = tl.maximum(((hi - a0 - 8) // G >> 3) << 3, 8)
            g0 = a0 + tl.arange(0, G)[:, None] * gs                          # [G, 1]
            gm = g0 + 8 <= hi
            x = tl.load(X + row.to(tl.int64) * sxr + g0 + tl.arange(0, 8)[None, :], mask=gm, other=0.0)
            key = tl.reshape(_ukey(x), [G * 8])
            valid = tl.reshape(gm & (tl.arange(0, 8)[None, :] >= 0), [G * 8])
            n_s = tl.sum(gm.to(tl.int32)) * 8
            # Expect e = k * n_s / n sampled keys above the k-th key; taking the (e + 4.5 sqrt(e) + 8)-th sampled key
            # leaves fewer than k keys >= t with probability ~1e-5 and about 1.45 k on average.
            e = K * n_s.to(tl.float32) / n.to(tl.float32)
            m = tl.minimum((e + 4.5 * tl.sqrt(e) + 8.0).to(tl.int32), n_s)
            t, _ = _select_in_block(key, valid, m)
            tl.store(THR + row + tl.arange(0, 1), t.to(tl.int32, bitcast=True))

    @triton.jit
    def _filter_block(x_row, b, t, lo, hi, cand, cnt_row, base_row, count, CAP: tl.constexpr,
                      BLOCK: tl.constexpr, MASKED: tl.constexpr):
        """Append the keys >= t of block b (index order) to the row's candidates; record the block's count/offset."""
        o = b * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            inb = (o >= lo) & (o < hi)
            key = _ukey(tl.load(x_row + o, mask=inb, other=0.0))
            keep = inb & (key >= t)
        else:
            key = _ukey(tl.load(x_row + o))                  # a block inside the bounds: unmasked vector loads
            keep = key >= t
        keep_i = keep.to(tl.int32)
        c = tl.sum(keep_i)
        tl.store(cnt_row + b, c)
        if c > 0:
            # One atomic per block reserves a contiguous chunk of the buffer (no scan across blocks).
            base = tl.atomic_add(count, c, sem="relaxed")
            pos = base + tl.cumsum(keep_i, 0) - keep_i
            # A candidate is one int64: index in the high word, key in the low word (one scatter, not two).
            packed = (o.to(tl.int64) << 32) | (key.to(tl.int64) & 0xFFFFFFFF)
            tl.store(cand + pos, packed, mask=keep & (pos < CAP))
            tl.store(base_row + b, base)

    @triton.jit
    def _filter_kernel(X, START, END, THR, CAND, CNT, BASE, COUNT, sxr, scr, sbr,
                       HAS_BOUNDS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
                       STAGES: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // SPLIT
        part = SPLIT - 1 - pid % SPLIT     # last segment first: sequential runs (the interpreter) also reorder chunks
        lo, hi = _row_bounds(START, END, row, HAS_BOUNDS)
        if hi - lo > CAP:
            x_row = X + row.to(tl.int64) * sxr
            cand = CAND + row.to(tl.int64) * scr
            cnt_row = CNT + row * sbr
            base_row = BASE + row * sbr
            t = tl.load(THR + row).to(tl.uint32, bitcast=True)
            b_lo = lo // BLOCK
            b_hi = (hi + BLOCK - 1) // BLOCK
            per = (b_hi - b_lo + SPLIT - 1) // SPLIT
            b0 = b_lo + part * per
            b1 = tl.minimum(b0 + per, b_hi)
            f_lo = (lo + BLOCK - 1) // BLOCK                     # blocks [f_lo, f_hi) lie inside [lo, hi)
            f_hi = hi // BLOCK
            for b in tl.range(tl.maximum(b0, f_lo), tl.minimum(b1, f_hi), num_stages=STAGES):
                _filter_block(x_row, b, t, lo, hi, cand, cnt_row, base_row, COUNT + row, CAP, BLOCK, False)
            first_partial = b_lo < f_lo
            if first_partial & (b_lo >= b0) & (b_lo < b1):
                _filter_block(x_row, b_lo, t, lo, hi, cand, cnt_row, base_row, COUNT + row, CAP, BLOCK, True)
            last = b_hi - 1
            if (last >= f_hi) & ~(first_partial & (last == b_lo)) & (last >= b0) & (last < b1):
                _filter_block(x_row, last, t, lo, hi, cand, cnt_row, base_row, COUNT + row, CAP, BLOCK, True)

    @triton.jit
    def _select_kernel(X, START, END, OUT, CAND, CNT, BASE, COUNT, sxr, sor, scr, sbr, K,
                       HAS_BOUNDS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, NBLK: tl.constexpr):
        row = tl.program_id(0)
        out_row = OUT + row.to(tl.int64) * sor
        lo, hi = _row_bounds(START, END, row, HAS_BOUNDS)
        n = hi - lo
        co = tl.arange(0, CAP)
        if n <= CAP:
            # The whole visible row fits in registers: it is its own candidate list.
            cm = co < n
            ckey = _ukey(tl.load(X + row.to(tl.int64) * sxr + lo + co, mask=cm, other=0.0))
            _take_and_store(out_row, ckey, lo + co, cm, tl.minimum(K, tl.maximum(n, 0)), K, CAP)
        else:
            c = tl.load(COUNT + row)
            if (c >= K) & (c <= CAP):                  # otherwise _fallback_kernel takes the row
                cand = CAND + row.to(tl.int64) * scr
                cm = co < c
                packed = tl.load(cand + co, mask=cm, other=0)
                # Block b's chunk starts at BASE[b] in the buffer and belongs after the candidates of blocks < b;
                # filter programs of one row interleave their chunks, so move each where it belongs.
                bo = tl.arange(0, NBLK)
                bm = (bo >= lo // BLOCK) & (bo < (hi + BLOCK - 1) // BLOCK)
                bcnt = tl.load(CNT + row * sbr + bo, mask=bm, other=0)
                bbase = tl.load(BASE + row * sbr + bo, mask=bm & (bcnt > 0), other=0)
                move = tl.where(bcnt > 0, tl.cumsum(bcnt, 0) - bcnt - bbase, 0)
                if tl.sum((move != 0).to(tl.int32)) > 0:
                    tl.store(BASE + row * sbr + bo, move, mask=bm)
                    tl.debug_barrier()
                    blk = (packed >> 32).to(tl.int32) // BLOCK
                    dst = co + tl.load(BASE + row * sbr + blk, mask=cm, other=0, cache_modifier=".cg")
                    tl.store(cand + dst, packed, mask=cm)
                    tl.debug_barrier()
                    packed = tl.load(cand + co, mask=cm, other=0, cache_modifier=".cg")
                _take_and_store(out_row, packed.to(tl.uint32), (packed >> 32).to(tl.int32), cm, K, K, CAP)

    @triton.jit
    def _fallback_kernel(X, START, END, OUT, COUNT, sxr, sor, K, HAS_BOUNDS: tl.constexpr, CAP: tl.constexpr,
                         BLOCK: tl.constexpr):
        """Rows whose candidates did not number between k and CAP: exact radix select over the whole row (four
        8-bit histogram passes, then one selection pass). Every other row returns at once."""
        row = tl.program_id(0)
        lo, hi = _row_bounds(START, END, row, HAS_BOUNDS)
        c = tl.load(COUNT + row)
        if (hi - lo > CAP) & ((c < K) | (c > CAP)):
            x_row = X + row.to(tl.int64) * sxr
            out_row = OUT + row.to(tl.int64) * sor
            offs = tl.arange(0, BLOCK)
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
                key = _ukey(tl.load(x_row + o, mask=inb, other=0.0))
                eq_tau = inb & (key == prefix)
                eq_i = eq_tau.to(tl.int32)
                take = (inb & (key > prefix)) | (eq_tau & (eq_seen + tl.cumsum(eq_i, 0) - eq_i < remaining))
                keep = take & (key != NEG_INF_KEY)
                keep_i = keep.to(tl.int32)
                tl.store(out_row + written + tl.cumsum(keep_i, 0) - keep_i, o, mask=keep)
                written += tl.sum(keep_i)
                eq_seen += tl.sum(eq_i)
            for k0 in range(0, K, BLOCK):
                o = k0 + offs
                tl.store(out_row + o, -1, mask=(o >= written) & (o < K))


def launch_topk(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, out: torch.Tensor, top_k: int,
                has_bounds: bool) -> None:
    """Top-k of the rows of x [rows, T] (row stride free, last dim contiguous) into out [rows, top_k] int32.

    start/end: int32 [rows] key bounds when has_bounds, else end[0] = T."""
    rows, t = x.shape
    cfg = TOPK_CONFIG
    cap = max(2 * next_pow2(top_k), CAND_MIN)      # candidate buffer: ~1.45 k expected, exact fallback above
    filtered = t > max(cap, cfg["direct"])
    if not filtered:
        cap = max(cap, next_pow2(t))                 # every row selects on itself in registers
    block = cfg["block"]
    nblk = next_pow2(-(-t // block))
    # 16 warps capped at 64 registers (ptxas spills ~50 bytes) let two select programs share an SM at cap 4096.
    select_opts = dict(num_warps=16, maxnreg=64 if cap <= 4096 else 128)
    if filtered:
        thr, count = torch.empty(2, rows, device=x.device, dtype=torch.int32)
        cand = torch.empty(rows, cap, device=x.device, dtype=torch.int64)
        blk = torch.empty(2, rows, nblk, device=x.device, dtype=torch.int32)
        split = max(1, -(-t // cfg["segment"]))
        _sample_kernel[(rows,)](x, start, end, thr, count, x.stride(0), top_k, HAS_BOUNDS=has_bounds, CAP=cap,
                                G=cfg["sample_groups"], num_warps=8)
        _filter_kernel[(rows * split,)](x, start, end, thr, cand, blk[0], blk[1], count, x.stride(0), cand.stride(0),
                                        blk.stride(1), HAS_BOUNDS=has_bounds, CAP=cap, BLOCK=block, SPLIT=split,
                                        STAGES=cfg["stages"], num_warps=cfg["warps"])
    else:
        count = torch.empty(1, device=x.device, dtype=torch.int32)
        cand = torch.empty(1, 1, device=x.device, dtype=torch.int64)
        blk = torch.empty(2, 1, 1, device=x.device, dtype=torch.int32)
    _select_kernel[(rows,)](x, start, end, out, cand, blk[0], blk[1], count, x.stride(0), out.stride(0),
                            cand.stride(0), blk.stride(1), top_k, HAS_BOUNDS=has_bounds, CAP=cap, BLOCK=block,
                            NBLK=nblk, **select_opts)
    if filtered:
        _fallback_kernel[(rows,)](x, start, end, out, count, x.stride(0), out.stride(0), top_k,
                                  HAS_BOUNDS=has_bounds, CAP=cap, BLOCK=4096, num_warps=16)


def topk_indices(scores: torch.Tensor, top_k: int, start: torch.Tensor | None = None,
                 end: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] int32 indices of the top_k largest scores of each row of `scores` [..., T] (fp32).

    Without bounds every row covers all T keys; with start/end ([rows] int32 each) row r covers
    [start[r], end[r]) (cheaper: keys outside are never read). A selected -inf score and a slot beyond the visible
    count both read -1, as in `reference.topk_indices`. Ties resolve to the lower index; the valid indices of a row
    come first, in ascending order, then the -1 slots.
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
