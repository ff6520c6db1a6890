"""What the Hopper (Gluon) sparse MLA kernels share: the program's coordinates, the selected indices a block at a
time, the cp.async gathers of latent rows, the online-softmax step, and the compile-and-inspect helper that checks
a kernel's resources for sm_90a without a GPU.

Used by the forward's schedules (`sparse_mla_sm90`, `sparse_mla_sm90_ws`) and the backward's dq kernel
(`sparse_mla_bwd_sm90`). Gluon jit functions are inlined into each kernel.
"""
from __future__ import annotations

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
except ImportError:  # pragma: no cover - older Triton: the Triton kernels serve every GPU
    gluon = None

BLOCK_H = 64       # heads a program takes: one m64 wgmma row block

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
