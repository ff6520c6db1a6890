"""The Hopper (Gluon) dq kernel of the split sparse MLA backward, on a machine without a GPU: it compiles for sm_90a
with Triton's bundled ptxas, fits shared memory, neither spills nor has its wgmma serialized, and issues S = Q K^T and
dP = dO V^T split between the two warpgroups; its launch binds every parameter, and the dispatch keeps CPU tensors
and unsupported shapes on the other paths. Numerics are checked on the H200 (`checks.check_sparse_mla_bwd_sm90`)."""
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
    cfgs = [["sm90", 32, 2], ["sm90", 64, 1]]
    out = subprocess.run([sys.executable, "-m", "dsaforge.kernels.sparse_mla_bwd_sm90", *map(json.dumps, cfgs)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in rows] == cfgs
    for (_, block_k, _), r in zip(cfgs, rows):
        assert r["shared_bytes"] + 1024 <= SMEM_LIMIT, r
        # S (576 / 16 = 36 k-steps) and dP (512 / 16 = 32) once, each warpgroup over half of the block's keys;
        # dQ += dS K: 256 nope and 32 rope columns a warpgroup, BLOCK_K / 16 k-steps each.
        want = {f"m64n{block_k // 2}k16": 68, "m64n256k16": block_k // 16}
        want["m64n32k16"] = want.get("m64n32k16", 0) + block_k // 16
        assert r["wgmma"] == want, r
        if "local" in r:
            assert r["local"] == 0 and r["stack"] == 0, r
            assert r["wgmma_waits"] == 2, r          # S and dP, then dQ: not serialized by ptxas


def test_dispatch_declines_cpu_tensors():
    q = torch.zeros(1, 2, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(1, 8, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 2, 64, dtype=torch.int32)
    ok, why = bwd90.supported(q, kv, idx, torch.zeros(1, 2, 64, 512, dtype=torch.bfloat16), 512)
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("k,config,head_major,ok", [(2048, None, False, True), (512, None, True, True),
                                                     (2000, None, False, False), (2016, ("sm90", 32, 2), False, True),
                                                     (2016, ("sm90", 64, 1), False, False)])
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

    fn = bwd90._sparse_mla_bwd_dq_sm90_kernel.fn
    monkeypatch.setattr(bwd90, "_sparse_mla_bwd_dq_sm90_kernel", Recorder(fn))
    b, s, h, k, n = 2, 5, 128, 256, 3
    q = torch.zeros(b, s, h, 576, dtype=torch.bfloat16)
    kv = torch.zeros(b, 40, 576, dtype=torch.bfloat16)
    idx = torch.zeros(b, s, k, dtype=torch.int32)
    dout = torch.zeros(b, s, h, 512, dtype=torch.bfloat16)
    lse, delta = torch.zeros(b, s, h), torch.zeros(b, s, h)
    ds = torch.zeros(b, n, h, k, dtype=torch.bfloat16)
    bwd90.launch(q, kv, idx, dout, lse, delta, torch.zeros_like(q), ds, torch.zeros_like(ds), 2, n, 0.1, 512,
                 ("sm90", 64, 1))
    (grid, args, kwargs), = calls
    assert grid == (n * h // bwd90.BLOCK_H, b)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    assert set(bound.arguments) == set(inspect.signature(fn).parameters)
    got = bound.arguments
    assert (got["K"], got["T"], got["NUM_HB"], got["s_offset"]) == (k, 40, 2, 2)
    assert (got["BLOCK_K"], got["STAGES"], got["D_V"], got["D_PE"]) == (64, 1, 512, 64)
    assert (got["spb"], got["sps"], got["sph"]) == ds.stride()[:3]
    assert got["scale_log2"] == pytest.approx(0.1 * 1.4426950408889634)


def test_benchmark_table():
    """`bench_bwd`'s markdown: the Triton row, a Hopper row with its ratio and kernel times, and a failed row."""
    from dsaforge.kernels.bench_bwd import render
    base = dict(s_q=4096, s_kv=65536, k=2048, h=128)
    rows = [dict(base, variant="triton split", ms=28.0, tflops=210.0,
                 kernels_ms={"_sparse_mla_bwd_dq_kernel": 16.0, "_sparse_mla_bwd_dkv_kernel": 11.0}),
            dict(base, variant="sm90 dq + triton dkv", config=["sm90", 32, 2], ms=20.0, tflops=294.0, speedup=1.4,
                 kernels_ms={"_sparse_mla_bwd_dq_sm90_kernel": 8.0, "_sparse_mla_bwd_dkv_kernel": 11.0},
                 dq_vs_triton_rel_err=2e-3, dkv_vs_triton_rel_err=3e-3),
            dict(base, variant="sm90 dq + triton dkv", config=["sm90", 64, 1], error="KernelInputError: no")]
    md = render(rows)
    lines = [ln for ln in md.splitlines() if ln.startswith("| 4096")]
    assert len(lines) == 3
    assert "| 28.00 | 210 | 1.00x | 16.00 | 11.00 |" in lines[0]
    assert "| sm90, 32, 2 | 20.00 | 294 | 1.40x | 8.00 | 11.00 | 2.0e-03, 3.0e-03 |" in lines[1]
    assert "error: KernelInputError" in lines[2]
