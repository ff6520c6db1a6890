"""The Hopper (Gluon) sparse MLA forward, on a machine without a GPU: it compiles for sm_90a with Triton's bundled
ptxas, fits shared memory, does not spill, and issues the wgmma instructions its schedule is built on (S = Q K^T
split between the two warpgroups, never computed by both); the dispatch leaves CPU tensors to the other paths. Numerics are checked on the H200
(`checks.check_sparse_mla`)."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from dsaforge.kernels._dispatch import KernelInputError

sm90 = pytest.importorskip("dsaforge.kernels.sparse_mla_sm90")
if sm90.gluon is None:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (1 KB of it reserved)


def test_compiles_for_sm90_within_limits():
    # A fresh process: this one runs Triton's interpreter, which Gluon cannot compile against.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cfgs = [["sm90", 64, 2, "pingpong"], ["sm90", 64, 2, "serial"], ["sm90", 64, 2, "prefetch"],
            ["sm90", 32, 3, "serial"], ["sm90", 64, 3, "ws3"],
            ["sm90", 64, 2, "prefetch", "store_p"]]          # the forward that also leaves P for the KL target
    out = subprocess.run([sys.executable, "-m", "dsaforge.kernels.sparse_mla_sm90", *map(json.dumps, cfgs)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] + (["store_p"] if r.get("store_p") else []) for r in rows] == cfgs
    for (_, block_k, _, schedule, *_), r in zip(cfgs, rows):
        assert r["shared_bytes"] + 1024 <= SMEM_LIMIT, r
        if schedule == "pingpong":
            # Each math warpgroup: S of its own block whole (36 k-steps of 16 over 576 columns), then both blocks'
            # P.V into its 256 columns (64 / 16 k-steps each); the partitions get the registers asked for.
            assert r["wgmma"] == {f"m64n{block_k}k16": 72, "m64n256k16": 2 * 2 * block_k // 16}, r
            assert set(sm90.PP_REGS) <= set(r["setmaxnreg"]), r
            if "local" in r:
                assert r["local"] == 0 and r["stack"] <= 8, r     # 8 bytes of the default partition's epilogue
            continue
        ws = schedule == "ws3"
        # S, 576 / 16 = 36 k-steps issued once: each warpgroup owns half of the block's keys, or (ws3) the
        # default partition's warpgroup owns all of them.
        assert r["wgmma"].get(f"m64n{block_k if ws else block_k // 2}k16") == 36, r
        # O: each warpgroup owns 256 of the 512 value columns.
        assert r["wgmma"].get("m64n256k16") == block_k // 16, r
        if "local" in r and schedule != "ws3":   # ws3 is known to spill (docs/kernels.md)
            assert r["local"] == 0 and r["stack"] == 0, r


def test_default_schedule_takes_pairs_of_blocks():
    assert sm90.SM90_FWD_CONFIG[3] == "pingpong"
    bk = sm90.SM90_FWD_CONFIG[1]
    assert sm90.resolve_config(2048) == sm90.SM90_FWD_CONFIG
    assert sm90.resolve_config(3 * bk) == sm90.SM90_FWD_FALLBACK     # an odd number of blocks
    assert sm90.resolve_config(3 * bk, ("sm90", 64, 2, "serial")) == ("sm90", 64, 2, "serial")


def test_dispatch_declines_cpu_tensors():
    q = torch.zeros(1, 2, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(1, 8, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 2, 64, dtype=torch.int32)
    ok, why = sm90.supported(q, kv, idx, 512)
    assert not ok and "CUDA" in why


@pytest.mark.parametrize("h,d,k,dtype,ok", [(128, 576, 2048, torch.bfloat16, True), (64, 576, 128, torch.float16, True),
                                            (96, 576, 2048, torch.bfloat16, False), (128, 320, 2048, torch.bfloat16, False),
                                            (128, 576, 2000, torch.bfloat16, False), (128, 576, 2048, torch.float32, False)])
def test_shape_rules(h, d, k, dtype, ok):
    q = torch.zeros(1, 1, h, d, dtype=dtype)
    kv = torch.zeros(1, 4, d, dtype=dtype)
    idx = torch.zeros(1, 1, k, dtype=torch.int32)
    got, why = sm90.shape_ok(q, kv, idx, 512 if d == 576 else 256)
    assert got == ok, why


@pytest.mark.parametrize("schedule", sm90.SCHEDULES)
def test_launch_binds_every_kernel_parameter(monkeypatch, schedule):
    """`launch` without a GPU: each schedule's kernel gets every one of its parameters exactly once, the grid is one
    program per (query, 64-head block) and batch, and the launch options are the schedule's."""
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.fn, grid, a, kw))

    names = ("_sparse_mla_fwd_sm90_kernel", "_sparse_mla_fwd_ws3_kernel", "_sparse_mla_fwd_pp_kernel")
    for name in names:
        monkeypatch.setattr(sm90, name, Recorder(getattr(sm90, name).fn))
    b, s, h, k = 2, 3, 128, 256
    q = torch.zeros(b, s, h, 576, dtype=torch.bfloat16)
    kv = torch.zeros(b, 40, 576, dtype=torch.bfloat16)
    idx = torch.zeros(b, s, k, dtype=torch.int32)
    out, lse = torch.zeros(b, s, h, 512, dtype=torch.bfloat16), torch.zeros(b, s, h)
    config = ("sm90", 64, 3 if schedule == "ws3" else 2, schedule)
    sm90.launch(q, kv, idx, out, lse, 0.1, 512, config)
    (fn, grid, args, kwargs), = calls
    want = {"pingpong": "_sparse_mla_fwd_pp_kernel", "ws3": "_sparse_mla_fwd_ws3_kernel"}.get(
        schedule, "_sparse_mla_fwd_sm90_kernel")
    assert fn is getattr(sm90, want).fn
    assert grid == (s * h // sm90.BLOCK_H, b)
    options = {"maxnreg"} if schedule == "ws3" else set()
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in options})
    assert set(bound.arguments) == set(inspect.signature(fn).parameters)
    assert bound.arguments["K"] == k and bound.arguments["T"] == 40 and bound.arguments["NUM_HB"] == 2
    if schedule == "pingpong":
        assert (bound.arguments["MATH_REGS"], bound.arguments["GATHER_REGS"]) == sm90.PP_REGS
    if schedule in ("serial", "prefetch"):
        assert bound.arguments["PREFETCH"] == (schedule == "prefetch")


def test_pingpong_refuses_an_odd_number_of_blocks():
    q = torch.zeros(1, 1, 64, 576, dtype=torch.bfloat16)
    idx = torch.zeros(1, 1, 192, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="pairs of 64-entry blocks"):
        sm90.launch(q, torch.zeros(1, 4, 576, dtype=torch.bfloat16), idx, None, None, 0.1, 512,
                    ("sm90", 64, 2, "pingpong"))
