"""The warp-specialized schedules of the Hopper sparse MLA forward: "pingpong" (the default) and "ws3".

"pingpong" (FlashMLA's Hopper layout): two math warpgroups take alternate blocks whole and a third gathers rows with
cp.async; "ws3": one softmax warpgroup (S, P) and two workers (gathers, O). `sparse_mla_sm90` holds the contract,
the single-stream schedules and the launcher, which picks these kernels by schedule name.
"""
from __future__ import annotations

from dsaforge.kernels.sparse_mla_sm90_blocks import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                 warpgroup_mma_init, warpgroup_mma_wait)

    from dsaforge.kernels.sparse_mla_sm90_blocks import (_issue_block, _load_idx, _program, _softmax_step,
                                                        _valid)

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
        cp.async_copy_global_to_shared(q_p.index(0),
                                       Q + q_off + offs_hp[:, None].to(gl.int64) * sqh + D_V + offs_cp[None, :])
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
        q_p = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_PE],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_PE], dtype))
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
            (_pp_math, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, IDX, O, LSE,
                        scale_log2, idx_off, o_off, soh, l_off, slh, hb, T, K, 0, D_V, BLOCK_H, BLOCK_K)),
            (_pp_math, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, IDX, O, LSE,
                        scale_log2, idx_off, o_off, soh, l_off, slh, hb, T, K, 1, D_V, BLOCK_H, BLOCK_K)),
            (_pp_gather, (q_l, q_r, q_p, kl_smem, kr_smem, kp_smem, p1_smem, m_smem, l_smem, bars, Q, KV, IDX,
                          b64 * sqb + s64 * sqs, sqh, b64 * skb, idx_off, skt, hb, T, K, D_V, D_PE, BLOCK_H, BLOCK_K)),
        ], [4, 4], [MATH_REGS, GATHER_REGS])
