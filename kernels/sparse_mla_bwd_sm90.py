"""Sparse MLA backward for Hopper (sm_90) in Gluon: the split algorithm's first kernel (dQ, and dS and P for dKV), or
the same kernel forming dKV itself.

Why: the Triton `sparse_mla_bwd._sparse_mla_bwd_dq_kernel` has the forward's layout problem (`sparse_mla_sm90`'s
docstring): S = Q K^T and dP = dO V^T feed further dots, so `tl.dot` puts all 8 warps along the 64 heads and each
warpgroup computes both products for the whole block, 1088 of the 2752 FLOPs a (head, key) pair costs in the
backward, twice. Here warpgroup g computes S and dP for half of each block's keys ([4, 2] warp layout), P and dS
follow in registers, dS goes through shared memory, and each warpgroup accumulates its half of dQ's columns:
dQ[:, 0:256] and rope columns [512, 544) in warpgroup 0, [256, 512) and [544, 576) in warpgroup 1.

Contract: that of the Triton kernel. Rows [s_offset, s_offset + n) of the grid; dQ in q's dtype; dS = P (dP - Delta)
scale and P, both in q's dtype, to the scratch [B, n, H, K] that `_sparse_mla_bwd_dkv_kernel` reads back for dKV.
P is recomputed from the forward's LSE (natural log, -inf for a row with no valid key, whose P and dS are 0).
Slots with index -1 (or >= T) gather row 0, as in the forward, and their P and dS are 0.

With an ("sm90-fused", 64, DKV_CW) config there is no scratch and no second kernel: P is stored to shared memory
beside dS, and each warpgroup forms dKV [64 keys, DKV_CW / 2 columns] = dS^T Q + P^T dO (and dS^T Q_pe for the rope
part) from them with wgmma (dS^T and P^T as transposed shared-memory operands) and adds it to an fp32 dKV with
atomics, so the reductions overlap the next block's MMAs instead of running in a kernel of their own. The cost: one
reduction per 64-head block instead of one per query (twice the bytes at 128 heads), two columns per instruction
(the wgmma accumulator's layout) instead of four. Shared memory 224 KB (the one-stage dq kernel's 216 KB and 8 KB of
P), 255 registers, no spills. Which way that trade goes is for a GPU to say (`bench_bwd`).

Supported: bf16/fp16, d_v 512 with a rope part of 64 (V3.2's 576), heads a multiple of 64, top-k a multiple of
BLOCK_K, dO with 16-byte aligned rows. Shared memory at the default (BLOCK_K 32, 2 stages): Q 72 KB + dO 64 KB +
2 x 36 KB of gathered rows + 4 KB of dS = 212 KB of the 227 KB a block may use; 64-entry blocks fit one stage only.
`sparse_mla_bwd.sparse_mla_bwd` dispatches here on sm_90 when asked (DSAFORGE_SM90_BWD=1 or =fused, or a config;
`deterministic=True` keeps the Triton kernels). Gluon has no interpreter:
`python -m dsaforge.kernels.sparse_mla_bwd_sm90 '["sm90", 32, 2]' '["sm90-fused", 64, 128]'` compiles configurations
for sm_90a without a GPU and prints their shared memory, registers, spills, wgmma instructions and atomics.
"""
from __future__ import annotations

from dsaforge.kernels import sparse_mla_sm90 as fwd
from dsaforge.kernels import sparse_mla_sm90_blocks as blocks
from dsaforge.kernels._dispatch import check

gluon = blocks.gluon
if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

# ("sm90", BLOCK_K, STAGES). Not yet measured on a GPU: ("sm90", 64, 1) is the other configuration that fits.
SM90_BWD_CONFIG = ("sm90", 32, 2)
# ("sm90-fused", BLOCK_K, DKV_CW): the same kernel forming dKV itself, 64 keys a block (dKV's wgmma rows), dKV's
# columns 128 at a time. Not yet run on a GPU.
SM90_FUSED_CONFIG = ("sm90-fused", 64, 128)
BLOCK_H = blocks.BLOCK_H
NUM_WARPS = 8

if gluon is not None:

    @gluon.jit
    def _sparse_mla_bwd_sm90_kernel(
            Q, KV, IDX, DO, LSE, DELTA, DQ, DS, P, DKV, scale, scale_log2,
            sqb, sqs, sqh, skb, skt, sib, sis, sdb, sds, sdh, slb, sls, slh, sqgb, sqgs, sqgh,
            spb, sps, sph, sgb, sgt, s_offset, T, K,
            D_V: gl.constexpr, D_PE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr,
            NUM_HB: gl.constexpr, STAGES: gl.constexpr, DKV_CW: gl.constexpr, num_warps: gl.constexpr):
        """DKV_CW = 0: dQ, and dS and P to the scratch DS and P for the Triton dkv kernel. DKV_CW > 0 (one stage of
        64 keys): dQ, and dKV = dS^T Q + P^T dO added to DKV (fp32) with atomics, DKV_CW columns at a time, from
        dS and P in shared memory (no scratch)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        hb, b64, s_loc64 = blocks._program(NUM_HB)
        s64 = s_loc64 + s_offset

        # S and dP [BLOCK_H, BLOCK_K]: warpgroup g takes keys [g*BLOCK_K/2, (g+1)*BLOCK_K/2) of every head.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                          instr_shape=[16, BLOCK_K // 2, 16])
        # dQ: warpgroup g accumulates columns [g*D_V/2, (g+1)*D_V/2) of the nope part and half of the rope part.
        qn_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, D_V // 2, 16])
        qp_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, D_PE // 2, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        ld_pe: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_PE // 8), D_PE // 8], [num_warps, 1], [1, 0])
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_V], dtype)
        qp_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, D_PE], dtype)
        k_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_V], dtype)
        kp_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, D_PE], dtype)
        ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_K], dtype)

        # [1, ...]: indexed with a loop-varying zero (`z` below)
        q_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_V], q_sl)
        qp_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_PE], qp_sl)
        do_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_V], q_sl)
        kn_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_V], k_sl)
        kp_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, D_PE], kp_sl)
        ds_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, BLOCK_K], ds_sl)
        if DKV_CW > 0:
            p_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_H, BLOCK_K], ds_sl)
            # a chunk of dKV [BLOCK_K keys, DKV_CW columns]: warpgroup g takes columns [g, g + 1) * DKV_CW / 2 of it
            g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                              instr_shape=[16, DKV_CW // 2, 16])
            gp_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                               instr_shape=[16, D_PE // 2, 16])
            offs_kg = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, g_layout))
            offs_cg = gl.arange(0, DKV_CW, layout=gl.SliceLayout(0, g_layout))
            offs_kgp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, gp_layout))
            offs_cgp = D_V + gl.arange(0, D_PE, layout=gl.SliceLayout(0, gp_layout))
            g_zero = gl.zeros([BLOCK_K, DKV_CW], gl.float32, layout=g_layout)
            gp_zero = gl.zeros([BLOCK_K, D_PE], gl.float32, layout=gp_layout)

        offs_c = gl.arange(0, D_V, layout=gl.SliceLayout(0, ld))
        offs_cp = gl.arange(0, D_PE, layout=gl.SliceLayout(0, ld_pe))
        offs_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld))
        offs_rp = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_pe))
        offs_hq = (hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))).to(gl.int64)
        offs_hqp = (hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_pe))).to(gl.int64)
        q_base = Q + b64 * sqb + s64 * sqs
        cp.async_copy_global_to_shared(q_smem.index(0), q_base + offs_hq[:, None] * sqh + offs_c[None, :])
        cp.async_copy_global_to_shared(qp_smem.index(0), q_base + offs_hqp[:, None] * sqh + D_V + offs_cp[None, :])
        # dO's head stride is B*S*d_v when it is the output projection's gradient seen token-major: int64 offsets.
        do_base = DO + b64 * sdb + s64 * sds
        cp.async_copy_global_to_shared(do_smem.index(0), do_base + offs_hq[:, None] * sdh + offs_c[None, :])
        kv_base = KV + b64 * skb
        idx_base = IDX + b64 * sib + s64 * sis
        for j in gl.static_range(STAGES - 1):      # Q and dO ride in block 0's group
            blocks._issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j, K, T, offs_r, offs_c, offs_rp,
                                offs_cp + D_V, BLOCK_K, STAGES)

        offs_hs = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)
        lse = gl.load(LSE + b64 * slb + s64 * sls + offs_hs * slh)
        delta = gl.load(DELTA + b64 * slb + s64 * sls + offs_hs * slh)
        row_ok = lse > float("-inf")
        lse2 = gl.where(row_ok, lse * 1.4426950408889634, 0.0)
        offs_ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))
        sp_rows = b64 * spb + s_loc64 * sps + offs_hs[:, None].to(gl.int64) * sph
        s_zero = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        dq_n = gl.zeros([BLOCK_H, D_V], gl.float32, layout=qn_layout)
        dq_p = gl.zeros([BLOCK_H, D_PE], gl.float32, layout=qp_layout)
        # A runtime zero times the block number added to every buffer index: with indices LLVM can prove constant
        # in the loop it hoists the wgmma descriptors out of it, and they spill (as in the forward's "pingpong").
        nz = (T < 0).to(gl.int32)
        if STAGES == 2:    # indices are loaded a block ahead, while the MMAs run, so a copy never waits on a load
            idx_n = blocks._load_idx(idx_base, 1, K, T, offs_r, BLOCK_K)
            idx_np = blocks._load_idx(idx_base, 1, K, T, offs_rp, BLOCK_K)
        for j in range(K // BLOCK_K):
            z = j * nz
            if STAGES == 1:
                gl.thread_barrier()                # both warpgroups' MMAs are done with the rows this copy replaces
                blocks._issue_block(kn_smem, kp_smem, kv_base, idx_base, skt, j, K, T, offs_r, offs_c, offs_rp,
                                    offs_cp + D_V, BLOCK_K, STAGES)
            cp.wait_group(0)
            fence_async_shared()                   # cp.async wrote through the generic proxy; wgmma reads async
            # Every thread's part of block j has landed, and both warpgroups have waited their MMAs on block j-1
            # (a warpgroup waits only its own): only now may the next copy overwrite block j-1's buffer.
            gl.thread_barrier()
            if STAGES == 2:
                blocks._copy_block(kn_smem, kp_smem, kv_base, skt, (j + 1) % 2 + z, idx_n, idx_np, offs_c,
                                   offs_cp + D_V)
            buf = j % STAGES + z
            kn = kn_smem.index(buf)
            kp = kp_smem.index(buf)
            ds_buf = ds_smem.index(z)
            sc = warpgroup_mma(q_smem.index(z), kn.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sc = warpgroup_mma(qp_smem.index(z), kp.permute((1, 0)), sc, is_async=True)
            dp = warpgroup_mma(do_smem.index(z), kn.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            valid = blocks._valid(idx_base, j, K, T, offs_ks, BLOCK_K)
            if STAGES == 2:
                idx_n = blocks._load_idx(idx_base, j + 2, K, T, offs_r, BLOCK_K)
                idx_np = blocks._load_idx(idx_base, j + 2, K, T, offs_rp, BLOCK_K)
            sc, dp = warpgroup_mma_wait(0, deps=[sc, dp])
            p = gl.exp2(sc * scale_log2 - lse2[:, None])
            p = gl.where(row_ok[:, None] & valid[None, :], p, 0.0)
            ds = (p * (dp - delta[:, None]) * scale).to(dtype)
            ds_buf.store(ds)
            if DKV_CW > 0:
                p_smem.index(z).store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                    # both warpgroups' keys are in dS before either multiplies by it
            acc_n = warpgroup_mma(ds_buf, kn, dq_n, is_async=True)
            acc_p = warpgroup_mma(ds_buf, kp, dq_p, is_async=True)
            if DKV_CW == 0:
                # The scratch for the dKV kernel; these stores overlap dQ's MMAs.
                offs_k = (j * BLOCK_K + offs_ks)[None, :]
                gl.store(DS + sp_rows + offs_k, ds)
                gl.store(P + sp_rows + offs_k, p.to(dtype))
            else:
                # dKV of this block's rows, a chunk of columns at a time: dS^T Q + P^T dO (the rope part dS^T Q_pe),
                # both warpgroups' halves of dS and P read from shared memory, the sums added with fp32 atomics.
                idx_g = gl.load(idx_base + j * BLOCK_K + offs_kg)
                ok_g = (idx_g >= 0) & (idx_g < T)
                g_rows = DKV + b64 * sgb + gl.where(ok_g, idx_g, 0).to(gl.int64)[:, None] * sgt + offs_cg[None, :]
                idx_gp = gl.load(idx_base + j * BLOCK_K + offs_kgp)
                ok_gp = (idx_gp >= 0) & (idx_gp < T)
                gp_rows = DKV + b64 * sgb + gl.where(ok_gp, idx_gp, 0).to(gl.int64)[:, None] * sgt + offs_cgp[None, :]
            # Waited here, not at the next block's start (where the next copy needs this buffer and dS is rewritten):
            # an accumulator in flight across the loop's back edge makes ptxas serialize every wgmma.
            dq_n, dq_p = warpgroup_mma_wait(0, deps=[acc_n, acc_p])
            if DKV_CW > 0:
                ds_t = ds_buf.permute((1, 0))
                p_t = p_smem.index(z).permute((1, 0))
                for c in gl.static_range(D_V // DKV_CW):
                    g = warpgroup_mma(ds_t, q_smem.index(z).slice(c * DKV_CW, DKV_CW, dim=1), g_zero, use_acc=False,
                                      is_async=True)
                    g = warpgroup_mma(p_t, do_smem.index(z).slice(c * DKV_CW, DKV_CW, dim=1), g, is_async=True)
                    g = warpgroup_mma_wait(0, deps=[g])
                    gl.atomic_add(g_rows + c * DKV_CW, g, mask=ok_g[:, None], sem="relaxed")
                gp = warpgroup_mma(ds_t, qp_smem.index(z), gp_zero, use_acc=False, is_async=True)
                gp = warpgroup_mma_wait(0, deps=[gp])
                gl.atomic_add(gp_rows, gp, mask=ok_gp[:, None], sem="relaxed")
        cp.wait_group(0)

        dq_base = DQ + b64 * sqgb + s64 * sqgs
        offs_hn = (hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, qn_layout))).to(gl.int64)
        offs_vn = gl.arange(0, D_V, layout=gl.SliceLayout(0, qn_layout))
        gl.store(dq_base + offs_hn[:, None] * sqgh + offs_vn[None, :], dq_n.to(dtype))
        offs_hp = (hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, qp_layout))).to(gl.int64)
        offs_vp = D_V + gl.arange(0, D_PE, layout=gl.SliceLayout(0, qp_layout))
        gl.store(dq_base + offs_hp[:, None] * sqgh + offs_vp[None, :], dq_p.to(dtype))


def is_fused(config: tuple | None) -> bool:
    return config is not None and config[0] == "sm90-fused"


def supported(q, kv, indices, dout, d_v: int, config: tuple | None = None) -> tuple[bool, str]:
    """Whether the sm_90 backward kernel takes these (already validated) inputs in this configuration; why not."""
    ok, why = fwd.supported(q, kv, indices, d_v)
    if not ok:
        return ok, why
    return shape_ok(q, indices, dout, config)


def shape_ok(q, indices, dout, config: tuple | None = None) -> tuple[bool, str]:
    """What this kernel asks beyond the forward's `sparse_mla_sm90.shape_ok` (no device needed): top-k a multiple
    of its BLOCK_K, and dO rows cp.async can copy (16-byte aligned, unit last stride)."""
    block_k = (config or SM90_BWD_CONFIG)[1]
    if indices.shape[2] % block_k:
        return False, f"top-k {indices.shape[2]} not a multiple of {block_k}"
    if dout.stride(3) != 1 or any(st % 8 for st in dout.stride()[:3]) or dout.data_ptr() % 16:
        return False, "dO rows are not 16-byte aligned"
    return True, ""


def _mode(config: tuple | None) -> tuple[int, int, int]:
    """(BLOCK_K, STAGES, DKV_CW) of a configuration: ("sm90", BLOCK_K, STAGES) or ("sm90-fused", 64, DKV_CW)."""
    name, block_k, third = config or SM90_BWD_CONFIG
    if name == "sm90-fused":
        check(block_k == 64 and third in (64, 128, 256),
              f"sm_90 fused backward config {config}: 64 keys a block and 64, 128 or 256 columns of dKV at a time")
        return block_k, 1, third
    check(name == "sm90" and third in (1, 2), f"sm_90 backward config {config}: 1 or 2 stages")
    return block_k, third, 0


def launch(q, kv, indices, dout, lse, delta, dq, ds, p, s0: int, n: int, sm_scale: float, d_v: int,
           config: tuple | None = None, dkv=None) -> None:
    """Rows [s0, s0 + n) of q: dQ into dq, and either their dS and P into ds and p ([B, >= n, H, K], for the Triton
    dkv kernel) or, with an ("sm90-fused", ...) config, dKV added into dkv ([B, T, D] fp32; ds and p unused). The
    caller checked `supported`. lse and delta are [B, S, H] fp32 with the same strides."""
    b, s, h, d = q.shape
    block_k, stages, dkv_cw = _mode(config)
    check(indices.shape[2] % block_k == 0, f"top-k {indices.shape[2]} must be a multiple of BLOCK_K {block_k}")
    check(tuple(delta.stride()) == tuple(lse.stride()), "lse and delta must share strides")
    check((dkv is not None) == (dkv_cw > 0), "dkv goes with an ('sm90-fused', ...) config, and only with it")
    if dkv_cw:
        ds = p = dq                            # no scratch: any tensor for the unused pointers and strides
    g = dkv if dkv_cw else dq
    nhb = h // BLOCK_H
    _sparse_mla_bwd_sm90_kernel[(n * nhb, b)](
        q, kv, indices, dout, lse, delta, dq, ds, p, g, sm_scale, sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), ds.stride(0), ds.stride(1), ds.stride(2), g.stride(0), g.stride(1),
        s0, kv.shape[1], indices.shape[2],
        D_V=d_v, D_PE=d - d_v, BLOCK_H=BLOCK_H, BLOCK_K=block_k, NUM_HB=nhb, STAGES=stages, DKV_CW=dkv_cw,
        num_warps=NUM_WARPS)


def resource_usage(config: tuple | None = None, d_v: int = 512, d_pe: int = 64) -> dict:
    """Compile for sm_90a without a GPU and report shared memory, registers, spills, wgmma instructions and the
    SASS's wgmma waits (`sparse_mla_sm90_blocks.compile_sm90`), as `sparse_mla_sm90.resource_usage` does for the
    forward; with an ("sm90-fused", ...) config also its global atomics."""
    import re

    block_k, stages, dkv_cw = _mode(config)
    sig = {"Q": "*bf16", "KV": "*bf16", "IDX": "*i32", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
           "DQ": "*bf16", "DS": "*bf16", "P": "*bf16", "DKV": "*fp32", "scale": "fp32", "scale_log2": "fp32"}
    ints = "sqb sqs sqh skb skt sib sis sdb sds sdh slb sls slh sqgb sqgs sqgh spb sps sph sgb sgt s_offset T K".split()
    sig.update({n: "i32" for n in ints})
    ce = dict(D_V=d_v, D_PE=d_pe, BLOCK_H=BLOCK_H, BLOCK_K=block_k, NUM_HB=2, STAGES=stages, DKV_CW=dkv_cw,
              num_warps=NUM_WARPS)
    sig.update({k: "constexpr" for k in ce})
    # As Triton specializes: pointers and the strides that are multiples of 16 (every one but s_offset, T and K).
    aligned = {(i,): [["tt.divisibility", 16]] for i in [*range(10), *range(12, 12 + len(ints) - 3)]}
    res = dict(config=list(config or SM90_BWD_CONFIG))
    res.update(blocks.compile_sm90(_sparse_mla_bwd_sm90_kernel, sig, ce, aligned, {"num_warps": NUM_WARPS}))
    ptx = res.pop("ptx")
    if dkv_cw:
        res["atomics"] = {m: ptx.count(m) for m in sorted(set(re.findall(r"\b(?:red|atom)\.global[\w.]+", ptx)))}
    return res


if __name__ == "__main__":
    import json
    import sys
    # e.g. '["sm90", 32, 2]' '["sm90", 64, 1]' '["sm90-fused", 64, 128]'
    for c in [tuple(json.loads(a)) for a in sys.argv[1:]] or [SM90_BWD_CONFIG]:
        print(json.dumps(resource_usage(c)))
