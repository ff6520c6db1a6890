"""The Hopper (Gluon) kernel of the sparse MLA backward, on a machine without a GPU, as the split algorithm's dq kernel
and forming dKV itself: it compiles for sm_90a with Triton's bundled ptxas, fits shared memory, neither spills nor has
its wgmma serialized, issues S = Q K^T and dP = dO V^T split between the two warpgroups (and dKV's products from
dS and P in shared memory); its launch binds every parameter, and the dispatch keeps CPU tensors and unsupported
shapes on the other paths. Numerics are checked on the H200 (`checks.check_sparse_mla_bwd_sm90`)."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

bwd90 = pytest.importorskip("dsaforge.kernels.sparse_mla_bwd_sm90")
if bwd90.gluon is None:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (1 KB of it reserved)


def test_compiles_for_sm90_within_limits():
    # A fresh process: this one runs Triton's interpreter, which Gluon cannot compile against.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cfgs = [["sm90", 32, 2], ["sm90", 64, 1], ["sm90-fused", 64, 128]]
    out = subprocess.run([sys.executable, "-m", "dsaforge.kernels.sparse_mla_bwd_sm90", *map(json.dumps, cfgs)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in rows] == cfgs
    for (name, block_k, third), r in zip(cfgs, rows):
        assert r["shared_bytes"] + 1024 <= SMEM_LIMIT, r
        # S (576 / 16 = 36 k-steps) and dP (512 / 16 = 32) once, each warpgroup over half of the block's keys;
        # dQ += dS K: 256 nope and 32 rope columns a warpgroup, BLOCK_K / 16 k-steps each.
        want = {f"m64n{block_k // 2}k16": 68, "m64n256k16": block_k // 16}
        want["m64n32k16"] = want.get("m64n32k16", 0) + block_k // 16
        waits = 2                                    # S and dP, then dQ: not serialized by ptxas
        if name == "sm90-fused":
            # dKV [64 keys, 576]: dS^T Q and P^T dO a chunk of `third` columns at a time (64 heads = 4 k-steps each,
            # half of the chunk a warpgroup), the rope part dS^T Q_pe (32 columns a warpgroup); one wait a chunk
            chunks = 512 // third
            want[f"m64n{third // 2}k16"] = want.get(f"m64n{third // 2}k16", 0) + chunks * 8
            want["m64n32k16"] += 4
            waits += chunks + 1
            assert set(r["atomics"]) <= {"atom.global.gpu.relaxed.add.v2.f32", "red.global.gpu.add.v2.f32"}, r
        assert r["wgmma"] == want, r
        if "local" in r:
            assert r["local"] == 0 and r["stack"] == 0, r
            assert r["wgmma_waits"] == waits, r


def test_dispatch_declines_cpu_tensors():
    q = torch.zeros(1, 2, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(1, 8, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 2, 64, dtype=torch.int32)
    ok, why = bwd90.supported(q, kv, idx, torch.zeros(1, 2, 64, 512, dtype=torch.bfloat16), 512)
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("k,config,head_major,ok", [(2048, None, False, True), (512, None, True, True),
                                                     (2000, None, False, False), (2016, ("sm90", 32, 2), False, True),
                                                     (2016, ("sm90", 64, 1), False, False),
                                                     (2048, ("sm90-fused", 64, 128), False, True),
                                                     (2016, ("sm90-fused", 64, 128), False, False)])
def test_shape_rules(k, config, head_major, ok):
    q = torch.zeros(1, 3, 64, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 3, k, dtype=torch.int32)
    # the output projection's gradient, a head-major buffer seen token-major, is taken as it comes
    dout = torch.zeros(64, 1, 3, 512, dtype=torch.bfloat16).permute(1, 2, 0, 3) if head_major else \
        torch.zeros(1, 3, 64, 512, dtype=torch.bfloat16)
    got, why = bwd90.shape_ok(q, idx, dout, config)
    assert got == ok, why


def test_shape_rules_refuse_misaligned_dout():
    q = torch.zeros(1, 3, 64, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 3, 64, dtype=torch.int32)
    dout = torch.zeros(1, 3, 64, 516, dtype=torch.bfloat16)[..., 2:514]       # rows 4 bytes off 16-byte alignment
    got, why = bwd90.shape_ok(q, idx, dout)
    assert not got and "aligned" in why


def test_launch_binds_every_kernel_parameter(monkeypatch):
    """`launch` without a GPU: the kernel gets every one of its parameters exactly once, one program per (query,
    64-head block) of the chunk and batch, and the chunk's row offset and the configuration's block sizes."""
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((grid, a, kw))

    fn = bwd90._sparse_mla_bwd_sm90_kernel.fn
    monkeypatch.setattr(bwd90, "_sparse_mla_bwd_sm90_kernel", Recorder(fn))
    b, s, h, k, n = 2, 5, 128, 256, 3
    q = torch.zeros(b, s, h, 576, dtype=torch.bfloat16)
    kv = torch.zeros(b, 40, 576, dtype=torch.bfloat16)
    idx = torch.zeros(b, s, k, dtype=torch.int32)
    dout = torch.zeros(b, s, h, 512, dtype=torch.bfloat16)
    lse, delta = torch.zeros(b, s, h), torch.zeros(b, s, h)
    ds = torch.zeros(b, n, h, k, dtype=torch.bfloat16)
    dkv = torch.zeros(b, 40, 576)
    bwd90.launch(q, kv, idx, dout, lse, delta, torch.zeros_like(q), ds, torch.zeros_like(ds), 2, n, 0.1, 512,
                 ("sm90", 64, 1))
    bwd90.launch(q, kv, idx, dout, lse, delta, torch.zeros_like(q), None, None, 0, s, 0.1, 512,
                 ("sm90-fused", 64, 128), dkv=dkv)
    (grid, args, kwargs), (grid_f, args_f, kwargs_f) = calls
    assert grid == (n * h // bwd90.BLOCK_H, b) and grid_f == (s * h // bwd90.BLOCK_H, b)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    assert set(bound.arguments) == set(inspect.signature(fn).parameters)
    got = bound.arguments
    assert (got["K"], got["T"], got["NUM_HB"], got["s_offset"]) == (k, 40, 2, 2)
    assert (got["BLOCK_K"], got["STAGES"], got["D_V"], got["D_PE"], got["DKV_CW"]) == (64, 1, 512, 64, 0)
    assert (got["spb"], got["sps"], got["sph"]) == ds.stride()[:3]
    assert got["scale_log2"] == pytest.approx(0.1 * 1.4426950408889634)
    fused = inspect.signature(fn).bind(*args_f, **kwargs_f).arguments
    assert (fused["BLOCK_K"], fused["STAGES"], fused["DKV_CW"], fused["s_offset"]) == (64, 1, 128, 0)
    assert fused["DKV"] is dkv and (fused["sgb"], fused["sgt"]) == dkv.stride()[:2]
    with pytest.raises(Exception, match="dkv goes with"):
        bwd90.launch(q, kv, idx, dout, lse, delta, torch.zeros_like(q), None, None, 0, s, 0.1, 512,
                     ("sm90-fused", 64, 128))
    with pytest.raises(Exception, match="64 keys a block"):
        bwd90.launch(q, kv, idx, dout, lse, delta, torch.zeros_like(q), None, None, 0, s, 0.1, 512,
                     ("sm90-fused", 32, 128), dkv=dkv)


def test_benchmark_table():
    """`bench_bwd`'s markdown: the Triton row, a Hopper row with its ratio and kernel times, and a failed row."""
    from dsaforge.kernels.bench_bwd import render
    base = dict(s_q=4096, s_kv=65536, k=2048, h=128)
    rows = [dict(base, variant="triton split", ms=28.0, tflops=210.0,
                 kernels_ms={"_sparse_mla_bwd_dq_kernel": 16.0, "_sparse_mla_bwd_dkv_kernel": 11.0}),
            dict(base, variant="sm90 dq + triton dkv", config=["sm90", 32, 2], ms=20.0, tflops=294.0, speedup=1.4,
                 kernels_ms={"_sparse_mla_bwd_sm90_kernel": 8.0, "_sparse_mla_bwd_dkv_kernel": 11.0},
                 dq_vs_triton_rel_err=2e-3, dkv_vs_triton_rel_err=3e-3),
            dict(base, variant="sm90 dq + triton dkv", config=["sm90", 64, 1], error="KernelInputError: no")]
    md = render(rows)
    lines = [ln for ln in md.splitlines() if ln.startswith("| 4096")]
    assert len(lines) == 3
    assert "| 28.00 | 210 | 1.00x | 16.00 | 11.00 |" in lines[0]
    assert "| sm90, 32, 2 | 20.00 | 294 | 1.40x | 8.00 | 11.00 | 2.0e-03, 3.0e-03 |" in lines[1]
    assert "error: KernelInputError" in lines[2]


def test_backward_choice_is_opt_in_and_explicit_configs_must_apply(monkeypatch):
    """DSAFORGE_SM90_BWD picks the Hopper kernel's mode (1: dq kernel, fused: dQ and dKV in one kernel) and falls
    back to Triton where it does not apply (here: CPU tensors); an explicit Hopper config that does not apply, or an
    unknown mode, is an error naming it."""
    from dsaforge.kernels import KernelInputError
    from dsaforge.kernels.sparse_mla_bwd import _sm90_choice
    q = torch.zeros(1, 2, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(1, 8, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 2, 64, dtype=torch.int32)
    dout = torch.zeros(1, 2, 64, 512, dtype=torch.bfloat16)
    monkeypatch.delenv("DSAFORGE_SM90_BWD", raising=False)
    assert _sm90_choice(q, kv, idx, dout, 512, None, False) == (None, "off (DSAFORGE_SM90_BWD=1 or =fused turns it on)")
    for mode in ("1", "fused"):
        monkeypatch.setenv("DSAFORGE_SM90_BWD", mode)
        cfg, why = _sm90_choice(q, kv, idx, dout, 512, None, False)
        assert cfg is None and "CUDA" in why
        assert _sm90_choice(q, kv, idx, dout, 512, None, True) == (None, "deterministic=True")
    monkeypatch.setenv("DSAFORGE_SM90_BWD", "yes")
    with pytest.raises(KernelInputError, match="must be 0, 1 or fused"):
        _sm90_choice(q, kv, idx, dout, 512, None, False)
    with pytest.raises(KernelInputError, match="does not apply"):
        _sm90_choice(q, kv, idx, dout, 512, bwd90.SM90_FUSED_CONFIG, False)
