"""Sparse MLA forward for Hopper (sm_90) in Gluon: explicit warpgroup MMAs, layouts and cp.async pipelining.

Why a second forward: in Triton's `tl.dot` lowering, a dot whose result feeds another dot gets all warps along M
(the flash-attention heuristic). With 64 heads and 8 warps that puts both warpgroups on the same 64 rows, so each
computes the whole S = Q K^T of the block: the 576-deep product (53% of the FLOPs) runs twice and Q is read from
shared memory twice per k-step. Gluon lets S use the [4, 2] warp layout instead: each warpgroup computes S for
half of the block's keys, P goes through shared memory, and each warpgroup accumulates half of O's 512 columns.

The default schedule, "pingpong", goes further (the layout of FlashMLA's Hopper kernel): warp-specialized, two math
warpgroups take alternate blocks whole (S as m64n64 wgmma, their softmaxes interleaved with each other's MMAs) and a
third gathers rows with cp.async. On an H200 at V3.2's shape it runs 494-519 TFLOP/s against 322-329 for
"prefetch", the best single-instruction-stream schedule; docs/kernels.md has the measurements. The warp-specialized
schedules' kernels are in `sparse_mla_sm90_ws`, the pieces all Hopper kernels share in `sparse_mla_sm90_blocks`.

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
from dsaforge.kernels.sparse_mla_sm90_blocks import BLOCK_H, compile_sm90, gluon
from dsaforge.kernels.sparse_mla_sm90_ws import (PP_REGS, WS3_MAXNREG, _sparse_mla_fwd_pp_kernel,
                                                 _sparse_mla_fwd_ws3_kernel)

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                 warpgroup_mma_init, warpgroup_mma_wait)

    from dsaforge.kernels.sparse_mla_sm90_blocks import (_copy_block, _issue_block, _load_idx, _program,
                                                        _softmax_step, _valid)

# ("sm90", BLOCK_K, STAGES, schedule): 64 selected entries a block, double-buffered. Schedules: "pingpong" (below),
# "serial" loads a block's indices when its copy is issued, "prefetch" one block earlier, "ws3" is warp-specialized
# with Q in registers. Shared memory: Q 72 KB + 2 x 72 KB of gathered rows + 8 KB of P = 224 KB of the 227 KB a
# block may use. On an H200 at V3.2's shape (4096 queries, 64K keys, top-k 2048): pingpong 494-519 TFLOP/s,
# prefetch 320-329, serial 305-306, ws3 299-303 (ptxas spills 268 bytes and serializes its wgmma for lack of
# registers at 12 warps).
SM90_FWD_CONFIG = ("sm90", 64, 2, "pingpong")
SM90_FWD_FALLBACK = ("sm90", 64, 2, "prefetch")
SCHEDULES = ("serial", "prefetch", "ws3", "pingpong")
NUM_WARPS = 8


if gluon is not None:

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


if __name__ == "__main__":
    import json
    import sys
    # e.g. '["sm90", 64, 2, "serial"]'; a fifth element "store_p" compiles the variant that leaves P for the KL target
    cfgs = [tuple(json.loads(a)) for a in sys.argv[1:]] or [SM90_FWD_CONFIG]
    for c in cfgs:
        print(json.dumps(resource_usage(c[:4], store_p=c[4:] == ("store_p",))))
