"""Sparse MLA forward for Hopper (sm_90) in Gluon: explicit warpgroup MMAs, layouts and cp.async pipelining.

Why a second forward: in Triton's `tl.dot` lowering, a dot whose result feeds another dot gets all warps along M
(the flash-attention heuristic). With 64 heads and 8 warps that puts both warpgroups on the same 64 rows, so each
computes the whole S = Q K^T of the block: the 576-deep product (53% of the FLOPs) runs twice and Q is read from
shared memory twice per k-step. Gluon lets S use the [4, 2] warp layout instead: each warpgroup computes S for
half of the block's keys, P goes through shared memory, and each warpgroup accumulates half of O's 512 columns.

The default schedule, "pingpong", goes further (the layout of FlashMLA's Hopper kernel): warp-specialized, two math
warpgroups take alternate blocks whole (S as m64n64 wgmma, their softmaxes interleaved with each other's MMAs) and a
third gathers rows with cp.async. On an H200 at V3.2's shape it runs 494-519 TFLOP/s against 322-329 for
"prefetch", the best single-instruction-stream schedule; docs/kernels.md has the measurements.

Contract and numerics are those of `sparse_mla._sparse_mla_fwd_kernel` (base-2 online softmax, LSE in natural
log, -inf for a row with no valid index). Slots with index -1 (or >= T) gather row 0 instead of masking the copy,
so shared memory never holds stale bits, and their scores are set to -inf, so they add nothing.

Supported: bf16/fp16, d_v 512 with a rope part of 64 (V3.2's 576), heads a multiple of 64, top-k a multiple of
BLOCK_K ("pingpong": of 2 * BLOCK_K, other top-k take SM90_FWD_FALLBACK). `sparse_mla.sparse_mla_fwd` dispatches
here on sm_90 and falls back to the Triton kernel otherwise.
Gluon has no interpreter: `python -m dsaforge.kernels.sparse_mla_sm90 '["sm90", 64, 2, "pingpong"]'` compiles a
configuration for sm_90a without a GPU and prints its shared memory, registers, spills and wgmma instructions.
"""
from __future__ import annotations

from dsaforge.kernels._dispatch import check

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                 warpgroup_mma_init, warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older Triton: the Triton kernel serves every GPU
    gluon = None

# ("sm90", BLOCK_K, STAGES, schedule): 64 selected entries a block, double-buffered. Schedules: "pingpong" (below),
# "serial" loads a block's indices when its copy is issued, "prefetch" one block earlier, "ws3" is warp-specialized
# with Q in registers. Shared memory: Q 72 KB + 2 x 72 KB of gathered rows + 8 KB of P = 224 KB of the 227 KB a
# block may use. On an H200 at V3.2's shape (4096 queries, 64K keys, top-k 2048): pingpong 494-519 TFLOP/s,
# prefetch 320-329, serial 305-306, ws3 299-303 (ptxas spills 268 bytes and serializes its wgmma for lack of
# registers at 12 warps).
SM90_FWD_CONFIG = ("sm90", 64, 2, "pingpong")
SM90_FWD_FALLBACK = ("sm90", 64, 2, "prefetch")
SCHEDULES = ("serial", "prefetch", "ws3", "pingpong")
BLOCK_H = 64
NUM_WARPS = 8
# "ws3": 4 warps (S, softmax) + 8 warps (gathers, O); 12 warps fit 168 registers a thread (maxnreg), of which
# the workers take 152 and the default partition the rest, 200.
WS3_MAXNREG = 168
WS3_WORKER_REGS = 152 if gluon is None else gl.constexpr(152)
# "pingpong": 12 warps, registers a thread for (math warpgroup 1, the gathering warpgroup); warpgroup 0, the default
# partition, gets what is left of 512, here 200. (216, 80) measured the same (491-501 against 494-499 TFLOP/s),
# (216, 72) worse before the index prefetch (362-395 against 403).
PP_REGS = (208, 96)

if gluon is not None:

    @gluon.jit
    def _program(NUM_HB: gl.constexpr):
        """This program's (head block, batch, query); the last two int64. The head blocks of one query are adjacent
        in the grid, so they read its gathered rows from L2 one after the other."""
        pid = gl.program_id(0)
        return pid % NUM_HB, gl.program_id(1).to(gl.int64), (pid // NUM_HB).to(gl.int64)

    @gluon.jit
    def _load_idx(idx_base, j, K, T, offs, BLOCK_K: gl.constexpr):
        """Block j's selected indices in offs' layout; empty (-1) or out-of-range slots read row 0 instead."""
        o = j * BLOCK_K + offs
        idx = gl.load(idx_base + o, mask=o < K, other=-1)
        return gl.where((idx >= 0) & (idx < T), idx, 0)

    @gluon.jit
    def _copy_block(kn_smem, kp_smem, kv_base, skt, buf, idx, idx_p, offs_c, offs_cp):
        """cp.async the latent rows idx (nope part) / idx_p (rope part) into buffer buf; one commit group."""
        cp.async_copy_global_to_shared(kn_smem.index(buf), kv_base + idx.to(gl.int64)[:, None] * skt + offs_c[None, :])
        cp.async_copy_global_to_shared(kp_smem.index(buf),
                                       kv_base + idx_p.to(gl.int64)[:, None] * skt + offs_cp[None, :])
        cp.commit_group()

    @gluon.jit
    def _issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j, K, T,
                     offs_r, offs_c, offs_rp, offs_cp, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """cp.async the latent rows of block j (nope and rope parts) into buffer j % STAGES; one commit group."""
        _copy_block(kn_smem, kp_smem, kv_base, skt, j % STAGES, _load_idx(idx_base, j, K, T, offs_r, BLOCK_K),
                    _load_idx(idx_base, j, K, T, offs_rp, BLOCK_K), offs_c, offs_cp)

    @gluon.jit
    def _softmax_step(sc, valid, m_i, scale_log2):
        """Online-softmax step for one block's scores: (p, new running max, alpha), base 2; invalid slots -inf. The
        caller rescales its denominator by alpha and adds p's row sums."""
        qk = gl.where(valid[None, :], sc * scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no valid key yet stays at 0
        alpha = gl.exp2(m_i - m_use)
        return gl.exp2(qk - m_use[:, None]), m_new, alpha

    @gluon.jit
    def _valid(idx_base, j, K, T, offs_ks, BLOCK_K: gl.constexpr):
        offs = j * BLOCK_K + offs_ks
        idx = gl.load(idx_base + offs, mask=offs < K, other=-1)
        return (idx >= 0) & (idx < T)

    @gluon.jit
    def _sparse_mla_fwd_sm90_kernel(
            Q, KV, IDX, O, LSE, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sob, sos, soh, slb, sls, slh,
            T, K, P, M, spb, sps, sph, smb, sms, smh, s_offset,
            D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
            NUM_HB: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, STORE_P: gl.constexpr,
            num_warps: gl.constexpr):
        """STORE_P: rows s_offset.. of the grid, and each block's P (relative to the running max) and that max go
        to P [B, rows, H, K] and M [B, rows, H, K / BLOCK_K], as in `sparse_mla._sparse_mla_fwd_kernel`."""
        dtype: gl.constexpr = Q.dtype.element_ty
        hb, b64, s_loc64 = _program(NUM_HB)
        s64 = s_loc64 + s_offset

        # S [BLOCK_H, BLOCK_K]: warpgroup g computes keys [g*BLOCK_K/2, (g+1)*BLOCK_K/2) of every head.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                          instr_shape=[16, BLOCK_K // 2, 16])
        # O [BLOCK_H, D_V]: warpgroup g accumulates columns [g*D_V/2, (g+1)*D_V/2).
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                          instr_shape=[16, D_V // 2, 16])
        # Gathers: 16 bytes a thread, a warp covers 256 contiguous columns of one row.
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_PE // 8), D_PE // 8], [num_warps, 1], [1, 0])
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_V], dtype)
        qp_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_PE], dtype)
        k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_V], dtype)
        kp_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_PE], dtype)
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_K], dtype)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, D_V], q_sl)
        qp_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, D_PE], qp_sl)
        kn_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_V], k_sl)
        kp_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_PE], kp_sl)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_K], p_sl)

        offs_c = gl.arange(0, D_V, layout=gl.SliceLayout(0, ld))
        offs_cp = gl.arange(0, D_PE, layout=gl.SliceLayout(0, ld_pe))
        offs_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld))
        offs_rp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_pe))
        offs_hq = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        offs_hqp = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_pe))
        q_base = Q + b64 * sqb + s64 * sqs
        cp.async_copy_global_to_shared(q_smem, q_base + offs_hq[:, None].to(gl.int64) * sqh + offs_c[None, :])
        cp.async_copy_global_to_shared(qp_smem, q_base + offs_hqp[:, None].to(gl.int64) * sqh + D_V + offs_cp[None, :])
        kv_base = KV + b64 * skb
        idx_base = IDX + b64 * sib + s64 * sis
        for j in gl.static_range(STAGES - 1):      # Q rides in the first group
            _issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j, K, T, offs_r, offs_c, offs_rp,
                         offs_cp + D_V, BLOCK_K, STAGES)

        offs_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        s_zero = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        o = gl.zeros([BLOCK_H, D_V], gl.float32, layout=o_layout)
        n_blocks = gl.cdiv(K, BLOCK_K)
        acc = warpgroup_mma_init(o)
        if PREFETCH:      # indices are loaded a block ahead, while Q.K^T runs, so a copy never waits on a load
            idx_n = _load_idx(idx_base, STAGES - 1, K, T, offs_r, BLOCK_K)
            idx_np = _load_idx(idx_base, STAGES - 1, K, T, offs_rp, BLOCK_K)
        for j in range(n_blocks):
            # The buffer the next copy fills held block j-1: its P.V products must be done (they also read P), the
            # other warpgroup's too, hence the barrier: without it one warpgroup's copies could overwrite rows the
            # other's P.V is still reading.
            o = warpgroup_mma_wait(0, deps=[acc])
            gl.thread_barrier()
            if PREFETCH:
                _copy_block(kn_smem, kp_smem, kv_base, skt, (j + STAGES - 1) % STAGES, idx_n, idx_np, offs_c,
                            offs_cp + D_V)
            else:
                _issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j + STAGES - 1, K, T, offs_r, offs_c,
                             offs_rp, offs_cp + D_V, BLOCK_K, STAGES)
            cp.wait_group(STAGES - 1)
            fence_async_shared()                   # cp.async wrote through the generic proxy; wgmma reads async
            gl.thread_barrier()                    # every thread's part of block j has landed
            buf = j % STAGES
            kn = kn_smem.index(buf)
            sc = warpgroup_mma(q_smem, kn.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sc = warpgroup_mma(qp_smem, kp_smem.index(buf).permute((1, 0)), sc, is_async=True)
            valid = _valid(idx_base, j, K, T, offs_ks, BLOCK_K)
            if PREFETCH:
                idx_n = _load_idx(idx_base, j + STAGES, K, T, offs_r, BLOCK_K)
                idx_np = _load_idx(idx_base, j + STAGES, K, T, offs_rp, BLOCK_K)
            sc = warpgroup_mma_wait(0, deps=[sc])
            p, m_i, alpha = _softmax_step(sc, valid, m_i, scale_log2)
            if STORE_P:   # the KL target's inputs; the stores overlap the next block's copies
                offs_hs = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
                gl.store(P + b64 * spb + s_loc64 * sps + offs_hs[:, None].to(gl.int64) * sph
                         + (j * BLOCK_K + offs_ks)[None, :], p.to(dtype))
                gl.store(M + b64 * smb + s_loc64 * sms + offs_hs.to(gl.int64) * smh + j,
                         gl.where(m_i == float("-inf"), 0.0, m_i))
            # The denominator is kept per (row, slot) and summed once after the loop: each row's slots are split
            # over the two warpgroups, so a per-block row sum would cost a shared-memory exchange and a barrier.
            l_i = l_i * alpha[:, None] + p
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            acc = warpgroup_mma(p_smem, kn, o, is_async=True)
        o = warpgroup_mma_wait(0, deps=[acc])
        cp.wait_group(0)

        l_i = gl.sum(l_i, 1)
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        out = o / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        offs_ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        offs_vo = gl.arange(0, D_V, layout=gl.SliceLayout(0, o_layout))
        gl.store(O + b64 * sob + s64 * sos + offs_ho[:, None].to(gl.int64) * soh + offs_vo[None, :], out.to(dtype))
        offs_hl = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + b64 * slb + s64 * sls + offs_hl * slh, lse)


    @gluon.jit
    def _ws3_softmax(q_stage, qp_stage, kn_smem, kp_smem, p_smem, a_smem, l_smem, bars, Q, IDX, LSE, scale_log2,
                     q_off, sqh, idx_off, l_off, slh, hb, T, K,
                     D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
                     STAGES: gl.constexpr):
        """Default partition of the "ws3" schedule: Q lives in registers (wgmma's A operand), so shared memory holds
        three stages of gathered rows; this warpgroup computes S and the softmax and hands P to the workers."""
        kv_ready, kv_empty, p_ready, p_empty, q_done, done = bars
        dtype: gl.constexpr = kn_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BLOCK_K, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_PE // 8), D_PE // 8], [4, 1], [1, 0])
        # Q is staged through the first stage's buffers (the workers start gathering once it is in registers).
        offs_c = gl.arange(0, D_V, layout=gl.SliceLayout(0, ld))
        offs_cp = gl.arange(0, D_PE, layout=gl.SliceLayout(0, ld_pe))
        offs_hq = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        offs_hqp = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_pe))
        q_base = Q + q_off
        cp.async_copy_global_to_shared(q_stage, q_base + offs_hq[:, None].to(gl.int64) * sqh + offs_c[None, :])
        cp.async_copy_global_to_shared(qp_stage, q_base + offs_hqp[:, None].to(gl.int64) * sqh + D_V + offs_cp[None, :])
        cp.commit_group()
        cp.wait_group(0)
        gl.thread_barrier()
        q_nope = q_stage.load(a_layout)
        q_pe = qp_stage.load(a_layout)
        mbarrier.arrive(q_done)

        offs_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        s_zero = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        idx_base = IDX + idx_off
        for j in range(gl.cdiv(K, BLOCK_K)):
            buf = j % STAGES
            mbarrier.wait(kv_ready.index(buf), (j // STAGES) & 1)
            fence_async_shared()                                    # the workers' cp.async wrote generic-proxy
            sc = warpgroup_mma(q_nope, kn_smem.index(buf).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sc = warpgroup_mma(q_pe, kp_smem.index(buf).permute((1, 0)), sc, is_async=True)
            valid = _valid(idx_base, j, K, T, offs_ks, BLOCK_K)
            sc = warpgroup_mma_wait(0, deps=[sc])
            mbarrier.arrive(kv_empty.index(buf))                    # S is done with this block's rows
            p, m_i, alpha = _softmax_step(sc, valid, m_i, scale_log2)
            l_i = l_i * alpha + gl.sum(p, 1)                        # rows live inside a warp: no exchange
            mbarrier.wait(p_empty, (j & 1) ^ 1)                    # the workers' P.V of block j-1 read P
            p_smem.store(p.to(dtype))
            a_smem.store(alpha)
            fence_async_shared()
            mbarrier.arrive(p_ready)
        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        l_smem.store(l_safe)
        mbarrier.arrive(done)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        offs_hl = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + l_off + offs_hl * slh, lse)

    @gluon.jit
    def _ws3_gather_pv(q_stage, qp_stage, kn_smem, kp_smem, p_smem, a_smem, l_smem, bars, KV, IDX, O,
                       kv_off, idx_off, o_off, skt, soh, hb, T, K,
                       D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr):
        """Worker partition of "ws3" (8 warps): gathers with cp.async, STAGES-1 blocks ahead, and accumulates all of
        O, each warpgroup 256 of its columns, from the P the default partition leaves in shared memory."""
        kv_ready, kv_empty, p_ready, p_empty, q_done, done = bars
        dtype: gl.constexpr = kn_smem.dtype
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                          instr_shape=[16, D_V // 2, 16])
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
        ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_PE // 8), D_PE // 8], [8, 1], [1, 0])
        offs_c = gl.arange(0, D_V, layout=gl.SliceLayout(0, ld))
        offs_cp = D_V + gl.arange(0, D_PE, layout=gl.SliceLayout(0, ld_pe))
        offs_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld))
        offs_rp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_pe))
        kv_base = KV + kv_off
        idx_base = IDX + idx_off
        n_blocks = gl.cdiv(K, BLOCK_K)
        mbarrier.wait(q_done, 0)                                    # Q has left the first stage's buffers
        for j in gl.static_range(STAGES):
            _issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j, K, T, offs_r, offs_c, offs_rp, offs_cp,
                         BLOCK_K, STAGES)
            cp.mbarrier_arrive(kv_ready.index(j), increment_count=False)   # each thread, once its copies land
        acc = warpgroup_mma_init(gl.zeros([BLOCK_H, D_V], gl.float32, layout=o_layout))
        for j in range(n_blocks):
            buf = j % STAGES
            mbarrier.wait(p_ready, j & 1)
            alpha = a_smem.load(gl.SliceLayout(1, o_layout))
            o = warpgroup_mma_wait(0, deps=[acc])
            o = o * alpha[:, None]
            acc = warpgroup_mma(p_smem, kn_smem.index(buf), o, is_async=True)
            o = warpgroup_mma_wait(0, deps=[acc])
            acc = warpgroup_mma_init(o)
            mbarrier.arrive(p_empty)
            mbarrier.arrive(kv_empty.index(buf))
            if j + STAGES < n_blocks:                               # refill once S and P.V are both done with it
                mbarrier.wait(kv_empty.index(buf), (j // STAGES) & 1)
                _issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j + STAGES, K, T, offs_r, offs_c, offs_rp,
                             offs_cp, BLOCK_K, STAGES)
                cp.mbarrier_arrive(kv_ready.index(buf), increment_count=False)
        o = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.wait(done, 0)
        l_safe = l_smem.load(gl.SliceLayout(1, o_layout))
        out = o / l_safe[:, None]
        offs_ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        offs_vo = gl.arange(0, D_V, layout=gl.SliceLayout(0, o_layout))
        gl.store(O + o_off + offs_ho[:, None].to(gl.int64) * soh + offs_vo[None, :], out.to(dtype))

    @gluon.jit
    def _sparse_mla_fwd_ws3_kernel(
            Q, KV, IDX, O, LSE, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sob, sos, soh, slb, sls, slh,
            T, K,
            D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
            NUM_HB: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Warp-specialized forward with Q in registers: 4 warps for S and the softmax, 8 for the gathers and O."""
        dtype: gl.constexpr = Q.dtype.element_ty
        hb, b64, s64 = _program(NUM_HB)
        kn_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_V],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_V], dtype))
        kp_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_PE],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_PE], dtype))
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_K],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_K], dtype))
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        a_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_sl)
        l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_sl)
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        p_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=256)         # one cp.async arrive per worker thread
            mbarrier.init(kv_empty.index(i), count=2)          # S, then P.V, release a buffer
        mbarrier.init(p_ready, count=1)
        mbarrier.init(p_empty, count=1)
        mbarrier.init(q_done, count=1)
        mbarrier.init(done, count=1)
        bars = (kv_ready, kv_empty, p_ready, p_empty, q_done, done)
        idx_off = b64 * sib + s64 * sis
        gl.warp_specialize([
            (_ws3_softmax, (kn_smem.index(0), kp_smem.index(0), kn_smem, kp_smem, p_smem, a_smem, l_smem, bars, Q,
                            IDX, LSE, scale_log2, b64 * sqb + s64 * sqs, sqh, idx_off, b64 * slb + s64 * sls, slh,
                            hb, T, K, D_V, D_PE, BLOCK_H, BLOCK_K, STAGES)),
            (_ws3_gather_pv, (kn_smem.index(0), kp_smem.index(0), kn_smem, kp_smem, p_smem, a_smem, l_smem, bars,
                              KV, IDX, O, b64 * skb, idx_off, b64 * sob + s64 * sos, skt, soh, hb, T, K,
                              D_V, D_PE, BLOCK_H, BLOCK_K, STAGES)),
        ], [8], [WS3_WORKER_REGS])

    # ---------------------------------------------------------------------------------------------------------------
    # "pingpong": FlashMLA's Hopper layout. Warpgroup 0 computes S for the even blocks, warpgroup 1 for the odd ones,
    # each over all 576 columns (m64n64 wgmma instead of m64n32); O is split by columns, each warpgroup adding both
    # blocks' P.V to its 256 columns (its own P from registers, the other's through shared memory). A third warpgroup
    # gathers. The gathered rows are kept in two halves with their own barriers: columns [0, 256) ("l", warpgroup 0's
    # V) and [256, 576) ("r", warpgroup 1's V and the rope part), so each half is refilled as soon as its readers are
    # done. Warpgroup 0's P goes into block 0's rope part, which only its own S reads.

    @gluon.jit
    def _pp_math(q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, IDX, O, LSE, scale_log2,
                 idx_off, o_off, soh, l_off, slh, hb, T, K,
                 WG: gl.constexpr, D_V: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        """One math warpgroup of "pingpong": S and the softmax of its own blocks (2i + WG), and O's columns
        [WG * D_V/2, (WG+1) * D_V/2) for both blocks of each pair."""
        q_ready, kl_ready, kr_ready, kl_free, kr_free, m_ready, s_ready, l_ready = bars
        dtype: gl.constexpr = kl_smem.dtype
        OTHER: gl.constexpr = 1 - WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, D_V // 2, 16])
        pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        # This warpgroup's V: columns [0, 256) of each block for warpgroup 0, [256, 512) for warpgroup 1.
        v_smem = kl_smem if WG == 0 else kr_smem
        # A runtime zero added to every buffer index: with constant indices LLVM hoists the 50-odd wgmma descriptors
        # out of the loop and they spill; with it they are rebuilt where used.
        nz = (T < 0).to(gl.int32)
        offs_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))
        idx_base = IDX + idx_off
        s_zero = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        o = gl.zeros([BLOCK_H, D_V // 2], gl.float32, layout=o_layout)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=row_s)
        mbarrier.wait(q_ready, 0)
        fence_async_shared()
        n_pairs = K // (2 * BLOCK_K)
        for i in range(n_pairs):
            ph = i & 1
            d = ph * nz
            b0 = d
            b1 = 1 + d
            ql = q_l.index(d)
            qr = q_r.index(d)
            qp = q_p.index(d)
            p_other = p1_smem.index(d) if WG == 0 else kp_smem.index(b0)   # the other warpgroup's P
            p_mine = kp_smem.index(b0) if WG == 0 else p1_smem.index(d)    # where this one leaves its P
            # S of block 2i + WG. Warpgroup 0 starts with the "l" half (refilled first), warpgroup 1 with "r".
            if WG == 0:
                mbarrier.wait(kl_ready.index(0), ph)
                fence_async_shared()
                sc = warpgroup_mma(ql, kl_smem.index(b0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                mbarrier.wait(kr_ready.index(0), ph)
                fence_async_shared()
                sc = warpgroup_mma(qr, kr_smem.index(b0).permute((1, 0)), sc, is_async=True)
                sc = warpgroup_mma(qp, kp_smem.index(b0).permute((1, 0)), sc, is_async=True)
            else:
                mbarrier.wait(kr_ready.index(1), ph)
                fence_async_shared()
                sc = warpgroup_mma(qr, kr_smem.index(b1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                sc = warpgroup_mma(qp, kp_smem.index(b1).permute((1, 0)), sc, is_async=True)
                mbarrier.wait(kl_ready.index(1), ph)
                fence_async_shared()
                sc = warpgroup_mma(ql, kl_smem.index(b1).permute((1, 0)), sc, is_async=True)
            valid = _valid(idx_base, 2 * i + WG, K, T, offs_ks, BLOCK_K)
            sc = warpgroup_mma_wait(0, deps=[sc])
            qk = gl.where(valid[None, :], sc * scale_log2, float("-inf"))
            m_blk = gl.max(qk, 1)
            if WG == 0:
                m_new = gl.maximum(m_i, m_blk)
            else:                                   # warpgroup 0's max already covers every earlier block
                mbarrier.wait(m_ready.index(0), ph)
                m_new = gl.maximum(m_smem.slice(0 * BLOCK_H, BLOCK_H).load(row_s), m_blk)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            o = o * gl.convert_layout(alpha, row_o)[:, None]
            m_smem.slice(WG * BLOCK_H, BLOCK_H).store(m_new)
            mbarrier.arrive(m_ready.index(WG))
            # Own P from registers into this warpgroup's columns.
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), pa_layout), v_smem.index(WG + d), o, is_async=True)
            if WG == 0:
                # Warpgroup 1's max covers both blocks: rescale this block's P to it before handing it over.
                mbarrier.wait(m_ready.index(1), ph)
                m_fin = m_smem.slice(1 * BLOCK_H, BLOCK_H).load(row_s)
                beta = gl.exp2(m_use - gl.where(m_fin == float("-inf"), 0.0, m_fin))
                p_out = (p * beta[:, None]).to(dtype)
                # P0 goes to block 0's rope part, which P0.V0l does not read: hand it over while that runs (measured
                # the same as after it, 494-499 against 495-498 TFLOP/s).
                p_mine.store(p_out)
                fence_async_shared()
                mbarrier.arrive(s_ready.index(0))
                o = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(kl_free.index(0))                 # P0.V0l done
                l_i = l_i * beta
                o = o * gl.convert_layout(beta, row_o)[:, None]
                m_i = m_fin
                mbarrier.wait(s_ready.index(1), ph)
                mbarrier.wait(kl_ready.index(1), ph)              # (complete) makes block 1's rows visible here
                fence_async_shared()
                # Waited here, not behind the next pair's S: an accumulator in flight across the loop's back edge
                # makes ptxas serialize every wgmma, and at these register budgets the FlashMLA order spills
                # (371-373 against 384 TFLOP/s, measured before the gatherers prefetched their indices).
                o = warpgroup_mma(p_other, v_smem.index(b1), o, is_async=True)
                o = warpgroup_mma_wait(0, deps=[o])
                mbarrier.arrive(kl_free.index(1))
            else:
                p_mine.store(p.to(dtype))
                fence_async_shared()
                mbarrier.arrive(s_ready.index(1))
                m_i = m_new
                mbarrier.wait(s_ready.index(0), ph)
                mbarrier.wait(kr_ready.index(0), ph)
                fence_async_shared()
                acc = warpgroup_mma(p_other, v_smem.index(b0), acc, is_async=True)
                warpgroup_mma_wait(1, deps=[acc])
                mbarrier.arrive(kr_free.index(1))                 # S1 and P1.V1r done with block 1's "r" half
                o = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(kr_free.index(0))                 # P0 (in its rope part) and P0.V0r done
        o = warpgroup_mma_wait(0, deps=[o])
        # The two warpgroups' denominators are relative to the same final max: add them.
        l_smem.slice(WG * BLOCK_H, BLOCK_H).store(l_i)
        mbarrier.arrive(l_ready.index(WG))
        mbarrier.wait(l_ready.index(OTHER), 0)
        l_tot = l_i + l_smem.slice(OTHER * BLOCK_H, BLOCK_H).load(row_s)
        l_safe = gl.where(l_tot == 0.0, 1.0, l_tot)
        # Both warpgroups are past their last S, so Q's buffers are free: O goes out through them, which needs a
        # pointer per 16 bytes instead of one per accumulator pair (those spill at this register budget).
        o_smem = q_l.index(0) if WG == 0 else q_r.index(0)
        o_smem.store((o / gl.convert_layout(l_safe, row_o)[:, None]).to(dtype))
        gl.thread_barrier()
        st: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        offs_ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, st))
        offs_vo = WG * (D_V // 2) + gl.arange(0, D_V // 2, layout=gl.SliceLayout(0, st))
        gl.store(O + o_off + offs_ho[:, None].to(gl.int64) * soh + offs_vo[None, :], o_smem.load(st))
        if WG == 1:
            lse = gl.where(l_tot == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
            gl.store(LSE + l_off + (hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)) * slh, lse)

    @gluon.jit
    def _pp_copy_half(dst, kv_base, skt, idx, col0, ld: gl.constexpr, WIDTH: gl.constexpr):
        """cp.async columns [col0, col0 + WIDTH) of the rows idx (in ld's row layout) into dst."""
        offs_c = col0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, ld))
        cp.async_copy_global_to_shared(dst, kv_base + idx.to(gl.int64)[:, None] * skt + offs_c[None, :])

    @gluon.jit
    def _pp_gather(q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, Q, KV, IDX,
                   q_off, sqh, kv_off, idx_off, skt, hb, T, K,
                   D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        """Producer warpgroup of "pingpong": Q once, then each pair's halves in the order they are freed."""
        q_ready, kl_ready, kr_ready, kl_free, kr_free, m_ready, s_ready, l_ready = bars
        HALF: gl.constexpr = D_V // 2
        # 8 lanes cover 64 columns (128 bytes) of a row and a thread 4 rows of a half, so it keeps 4 row indices
        # (16 with a row a warp: those spill at this budget, and it measured 384 against 403 TFLOP/s).
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_PE // 8), D_PE // 8], [4, 1], [1, 0])
        offs_h = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        offs_hp = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_pe))
        offs_c = gl.arange(0, HALF, layout=gl.SliceLayout(0, ld))
        offs_cp = gl.arange(0, D_PE, layout=gl.SliceLayout(0, ld_pe))
        q_rows = Q + q_off + offs_h[:, None].to(gl.int64) * sqh
        cp.async_copy_global_to_shared(q_l.index(0), q_rows + offs_c[None, :])
        cp.async_copy_global_to_shared(q_r.index(0), q_rows + HALF + offs_c[None, :])
        cp.async_copy_global_to_shared(q_p.index(0), Q + q_off + offs_hp[:, None].to(gl.int64) * sqh + D_V + offs_cp[None, :])
        cp.mbarrier_arrive(q_ready, increment_count=False)
        kv_base = KV + kv_off
        idx_base = IDX + idx_off
        offs_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld))
        offs_rp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_pe))
        # A pair's row indices are loaded while the previous pair's copies are in flight: loaded after the buffer's
        # release instead, each copy waited a global load first and the math warpgroups waited on the copies
        # (403 against 496 TFLOP/s).
        i0, i0p = _load_idx(idx_base, 0, K, T, offs_r, BLOCK_K), _load_idx(idx_base, 0, K, T, offs_rp, BLOCK_K)
        i1, i1p = _load_idx(idx_base, 1, K, T, offs_r, BLOCK_K), _load_idx(idx_base, 1, K, T, offs_rp, BLOCK_K)
        for i in range(K // (2 * BLOCK_K)):
            ph = (i & 1) ^ 1                      # a fresh barrier's "previous phase" reads as complete
            j0 = 2 * i
            mbarrier.wait(kl_free.index(0), ph)
            _pp_copy_half(kl_smem.index(0), kv_base, skt, i0, 0, ld, HALF)
            cp.mbarrier_arrive(kl_ready.index(0), increment_count=False)
            mbarrier.wait(kr_free.index(1), ph)
            _pp_copy_half(kr_smem.index(1), kv_base, skt, i1, HALF, ld, HALF)
            _pp_copy_half(kp_smem.index(1), kv_base, skt, i1p, D_V, ld_pe, D_PE)
            cp.mbarrier_arrive(kr_ready.index(1), increment_count=False)
            mbarrier.wait(kr_free.index(0), ph)
            _pp_copy_half(kr_smem.index(0), kv_base, skt, i0, HALF, ld, HALF)
            _pp_copy_half(kp_smem.index(0), kv_base, skt, i0p, D_V, ld_pe, D_PE)
            cp.mbarrier_arrive(kr_ready.index(0), increment_count=False)
            i0, i0p = _load_idx(idx_base, j0 + 2, K, T, offs_r, BLOCK_K), _load_idx(idx_base, j0 + 2, K, T, offs_rp,
                                                                                    BLOCK_K)
            mbarrier.wait(kl_free.index(1), ph)
            _pp_copy_half(kl_smem.index(1), kv_base, skt, i1, 0, ld, HALF)
            cp.mbarrier_arrive(kl_ready.index(1), increment_count=False)
            i1, i1p = _load_idx(idx_base, j0 + 3, K, T, offs_r, BLOCK_K), _load_idx(idx_base, j0 + 3, K, T, offs_rp,
                                                                                    BLOCK_K)
        cp.wait_group(0)

    @gluon.jit
    def _sparse_mla_fwd_pp_kernel(
            Q, KV, IDX, O, LSE, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sob, sos, soh, slb, sls, slh,
            T, K,
            D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
            NUM_HB: gl.constexpr, STAGES: gl.constexpr, MATH_REGS: gl.constexpr, GATHER_REGS: gl.constexpr,
            num_warps: gl.constexpr):
        """Warp-specialized ping-pong forward: two math warpgroups and a gathering one (see `_pp_math`)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        hb, b64, s64 = _program(NUM_HB)
        HALF: gl.constexpr = D_V // 2
        half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, HALF], dtype)
        pe_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_PE], dtype)
        q_half_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, HALF], dtype)
        q_l = gl.allocate_shared_memory(dtype, [1, BLOCK_H, HALF], q_half_sl)    # [1, ...]: see `nz` in _pp_math
        q_r = gl.allocate_shared_memory(dtype, [1, BLOCK_H, HALF], q_half_sl)
        q_p = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_PE], gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_PE], dtype))
        kl_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_K, HALF], half_sl)
        kr_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_K, HALF], half_sl)
        kp_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D_PE], pe_sl)
        p1_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, BLOCK_K], pe_sl)
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        m_smem = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_H], vec_sl)     # per warpgroup: running max
        l_smem = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_H], vec_sl)     # per warpgroup: denominator
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kl_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kr_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kl_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kr_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        m_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        s_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        l_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=128)               # one cp.async arrive per gathering thread
        for i in gl.static_range(2):
            mbarrier.init(kl_ready.index(i), count=128)
            mbarrier.init(kr_ready.index(i), count=128)
            mbarrier.init(kl_free.index(i), count=1)     # each half has one last reader
            mbarrier.init(kr_free.index(i), count=1)
            mbarrier.init(m_ready.index(i), count=1)
            mbarrier.init(s_ready.index(i), count=1)
            mbarrier.init(l_ready.index(i), count=1)
        bars = (q_ready, kl_ready, kr_ready, kl_free, kr_free, m_ready, s_ready, l_ready)
        idx_off = b64 * sib + s64 * sis
        o_off = b64 * sob + s64 * sos
        l_off = b64 * slb + s64 * sls
        gl.warp_specialize([
            (_pp_math, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, IDX, O, LSE, scale_log2, idx_off, o_off, soh, l_off, slh, hb, T, K,
                        0, D_V, BLOCK_H, BLOCK_K)),
            (_pp_math, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, IDX, O, LSE, scale_log2, idx_off, o_off, soh, l_off, slh, hb, T, K,
                        1, D_V, BLOCK_H, BLOCK_K)),
            (_pp_gather, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, Q, KV, IDX, b64 * sqb + s64 * sqs, sqh, b64 * skb, idx_off, skt, hb, T, K,
                          D_V, D_PE, BLOCK_H, BLOCK_K)),
        ], [4, 4], [MATH_REGS, GATHER_REGS])

def supported(q, kv, indices, d_v: int) -> tuple[bool, str]:
    """Whether the sm_90 kernel takes these (already validated) inputs; the reason when not."""
    if gluon is None:
        return False, "this Triton has no Gluon"
    if not q.is_cuda:
        return False, "not a CUDA tensor"
    import torch
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False, "not an sm_90 GPU"
    return shape_ok(q, kv, indices, d_v)


def shape_ok(q, kv, indices, d_v: int) -> tuple[bool, str]:
    """The shape, dtype and layout half of `supported` (no device needed)."""
    import torch
    h, d, k = q.shape[2], q.shape[3], indices.shape[2]
    block_k = SM90_FWD_CONFIG[1]
    if d_v != 512 or d - d_v != 64:
        return False, f"shape d_qk {d} / d_v {d_v} (the sm_90 kernel takes 576 / 512)"
    if h % BLOCK_H or k % block_k:
        return False, f"heads {h} / top-k {k} not multiples of {BLOCK_H} / {block_k}"
    if q.dtype not in (torch.bfloat16, torch.float16) or kv.dtype != q.dtype:
        return False, f"dtype {q.dtype}"
    if q.stride(3) != 1 or kv.stride(2) != 1 or indices.stride(2) != 1:
        return False, "last dims must be contiguous"
    return True, ""


def resolve_config(k: int, config: tuple | None = None) -> tuple:
    """The configuration to run for top-k k: `config` when given, else SM90_FWD_CONFIG, except that the default
    "pingpong" (which takes blocks in pairs) hands a k that is not a multiple of 2 * BLOCK_K to SM90_FWD_FALLBACK."""
    if config is not None:
        return tuple(config)
    if SM90_FWD_CONFIG[3] == "pingpong" and k % (2 * SM90_FWD_CONFIG[1]):
        return SM90_FWD_FALLBACK
    return SM90_FWD_CONFIG


def launch(q, kv, indices, out, lse, sm_scale_log2: float, d_v: int, config: tuple | None = None,
           store_p: tuple | None = None) -> None:
    """Run the sm_90 forward into out [B,S,H,d_v] and lse [B,S,H] (caller checked `supported`).

    store_p=(P, M, s0, n): rows [s0, s0 + n) only, leaving each block's probabilities and running max in P and M
    (`sparse_mla_target.forward_with_target`); "serial" and "prefetch" schedules only."""
    b, s, h, d = q.shape
    _, block_k, stages, schedule = resolve_config(indices.shape[2], config)
    check(schedule in SCHEDULES, f"unknown sm_90 forward schedule {schedule!r}; choose one of {SCHEDULES}")
    check(schedule != "pingpong" or indices.shape[2] % (2 * block_k) == 0,
          f"the pingpong schedule takes top-k in pairs of {block_k}-entry blocks; got {indices.shape[2]}")
    check(store_p is None or schedule in ("serial", "prefetch"),
          f"the {schedule!r} schedule does not store P; take 'prefetch' or 'serial'")
    nhb = h // BLOCK_H
    args = (q, kv, indices, out, lse, sm_scale_log2,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            kv.shape[1], indices.shape[2])
    shape = dict(D_V=d_v, D_PE=d - d_v, BLOCK_H=BLOCK_H, BLOCK_K=block_k, NUM_HB=nhb, STAGES=stages)
    if schedule == "pingpong":
        _sparse_mla_fwd_pp_kernel[(s * nhb, b)](*args, **shape, MATH_REGS=PP_REGS[0], GATHER_REGS=PP_REGS[1],
                                                num_warps=4)
    elif schedule == "ws3":
        _sparse_mla_fwd_ws3_kernel[(s * nhb, b)](*args, **shape, num_warps=4, maxnreg=WS3_MAXNREG)
    else:
        pb, mb, s0, n = store_p if store_p is not None else (lse, lse, 0, s)
        sp = (*pb.stride()[:3], *mb.stride()[:3]) if store_p is not None else (0,) * 6
        _sparse_mla_fwd_sm90_kernel[(n * nhb, b)](*args, pb, mb, *sp, s0, **shape, PREFETCH=schedule == "prefetch",
                                                  STORE_P=store_p is not None, num_warps=NUM_WARPS)


def resource_usage(config: tuple | None = None, d_v: int = 512, d_pe: int = 64, store_p: bool = False) -> dict:
    """Compile the kernel for sm_90a without a GPU (Triton's bundled ptxas) and report what it needs: shared memory,
    registers and spills, the wgmma instructions and their waits (`compile_sm90`). Needs TRITON_INTERPRET
    unset (the interpreter replaces the language functions Gluon compiles)."""
    import re

    _, block_k, stages, schedule = config or SM90_FWD_CONFIG
    sig = {"Q": "*bf16", "KV": "*bf16", "IDX": "*i32", "O": "*bf16", "LSE": "*fp32", "scale_log2": "fp32"}
    sig.update({n: "i32" for n in "sqb sqs sqh skb skt sib sis sob sos soh slb sls slh T K".split()})
    ws = schedule in ("ws3", "pingpong")
    ce = dict(D_V=d_v, D_PE=d_pe, BLOCK_H=BLOCK_H, BLOCK_K=block_k, NUM_HB=2, STAGES=stages,
              num_warps=4 if ws else NUM_WARPS)
    if not ws:
        ce["PREFETCH"] = schedule == "prefetch"
        ce["STORE_P"] = store_p
        sig.update({"P": "*bf16", "M": "*fp32", **{n: "i32" for n in "spb sps sph smb sms smh s_offset".split()}})
    if schedule == "pingpong":
        ce.update(MATH_REGS=PP_REGS[0], GATHER_REGS=PP_REGS[1])
    sig.update({k: "constexpr" for k in ce})
    aligned = {(i,): [["tt.divisibility", 16]] for i in [0, 1, 2, 3, 4, *range(6, 18)]}   # as Triton specializes
    fn = {"ws3": _sparse_mla_fwd_ws3_kernel, "pingpong": _sparse_mla_fwd_pp_kernel}.get(schedule,
                                                                                      _sparse_mla_fwd_sm90_kernel)
    options = {"num_warps": ce["num_warps"], **({"maxnreg": WS3_MAXNREG} if schedule == "ws3" else {})}
    res = dict(config=list(config or SM90_FWD_CONFIG), **({"store_p": True} if store_p else {}))
    res.update(compile_sm90(fn, sig, ce, aligned, options))
    # Warp-specialized kernels: the per-partition register counts (REG below is the count at entry).
    nreg = sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", res.pop("ptx"))})
    if nreg:
        res["setmaxnreg"] = nreg
    return res


def compile_sm90(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile a Gluon kernel for sm_90a without a GPU and read what it needs: shared memory, the wgmma
    instructions in its PTX, registers, stack and local memory (`cuobjdump -res-usage`, where Triton bundles it),
    the SASS's wgmma waits (one per HGMMA where ptxas serialized them: its C7515 warning, which Triton does not pass
    on) and the PTX itself (key "ptx", for the caller's own checks)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    wgmma = {}
    for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", k.asm["ptx"]):
        wgmma[m.group(1)] = wgmma.get(m.group(1), 0) + 1
    res = dict(shared_bytes=k.metadata.shared, wgmma=wgmma, ptx=k.asm["ptx"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        for key in ("REG", "STACK", "LOCAL"):
            m = re.search(rf"\b{key}:(\d+)", usage)
            if m:
                res[key.lower()] = int(m.group(1))
        res["wgmma_waits"] = sass.count("WARPGROUP.DEPBAR")
    return res


if __name__ == "__main__":
    import json
    import sys
    # e.g. '["sm90", 64, 2, "serial"]'; a fifth element "store_p" compiles the variant that leaves P for the KL target
    cfgs = [tuple(json.loads(a)) for a in sys.argv[1:]] or [SM90_FWD_CONFIG]
    for c in cfgs:
        print(json.dumps(resource_usage(c[:4], store_p=c[4:] == ("store_p",))))
