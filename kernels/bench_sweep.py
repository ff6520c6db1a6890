"""Block-size sweeps of the DSA kernels for `python -m dsaforge.kernels.bench --sweep`: the radix top-k, the sparse
MLA forward and backward, the sparse indexer KL, and the indexer's score kernel v1 against v2. Each times its
configurations at one shape and reports the fastest; the top-k, KL (and through `bench.main`, the sparse MLA)
sweeps make the fastest the configuration for the rest of the run.
"""
from __future__ import annotations

import importlib
import json

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels.bench_harness import S_Q, SHAPES, TOP_K, Clock, _rand, timeit
from dsaforge.kernels.checks import _indices
from dsaforge.kernels.indexer import indexer_flops
from dsaforge.kernels.kl import indexer_kl
from dsaforge.kernels.sparse_mla import sparse_mla_bwd, sparse_mla_flops, sparse_mla_fwd
from dsaforge.kernels.topk import topk_indices


SWEEP = {   # split backward: kernel 1 (BLOCK_H, BLOCK_K, warps, stages), kernel 2 (BLOCK_K, columns, warps, stages)
    "v32": ([(64, 32, 8, 2), (64, 32, 8, 1), (64, 64, 8, 1), (32, 64, 8, 2)],
            [(64, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 2)], (32, 32, 8, 1)),
    "small": ([], [], (16, 32, 4, 2)),
}
FWD_SWEEP = {   # forward: Triton (BLOCK_H, BLOCK_K, warps, stages) or Hopper ("sm90", BLOCK_K, stages, schedule)
    "v32": [("sm90", 64, 2, "pingpong"), ("sm90", 64, 2, "prefetch"), ("sm90", 64, 2, "serial"), ("sm90", 64, 3, "ws3"),
            (64, 64, 8, 2)],
    "small": [(16, 128, 4, 2), (16, 128, 4, 3), (16, 64, 4, 3), (16, 64, 4, 4), (16, 256, 8, 2), (16, 64, 2, 3),
              (16, 128, 8, 3)],
}
KL_SWEEP = [(32, 8, 1), (32, 4, 2), (64, 4, 2), (64, 8, 2), (32, 4, 3), (64, 4, 3), (16, 4, 3)]   # (block_n, warps, stages)
TOPK_SWEEP = [(1024, 4), (512, 4), (2048, 4), (1024, 8), (2048, 8)]   # (block, warps) of the filter kernel


def sweep_topk(dev, clock: Clock, rows: int = S_Q, t: int = 131072, k: int = TOP_K) -> dict:
    """Time the radix top-k's (BLOCK, warps) on full rows of random scores; keep the fastest."""
    topk = importlib.import_module("dsaforge.kernels.topk")
    x = torch.randn(rows, t, device=dev)
    res = dict(rows=rows, t=t, k=k, torch_topk_ms=timeit(lambda: torch.topk(x, k, dim=-1)), runs=[])
    for block, warps in TOPK_SWEEP:
        if clock.left() < 60:
            break
        topk.TOPK_CONFIG.update(block=block, warps=warps)
        try:
            res["runs"].append(dict(block=block, warps=warps, ms=timeit(lambda: topk_indices(x, k))))
        except Exception as e:
            res["runs"].append(dict(block=block, warps=warps, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(res["runs"][-1]), flush=True)
    ok = [r for r in res["runs"] if r.get("ms")]
    best = min(ok, key=lambda r: r["ms"]) if ok else dict(block=4096, warps=8)
    topk.TOPK_CONFIG.update(block=best["block"], warps=best["warps"])
    res["best"] = (best["block"], best["warps"])
    return res


def sweep_fwd(dev, clock: Clock, shape: str, s_kv: int = 65536, s_q: int = S_Q, k: int = TOP_K) -> dict:
    """Time the forward's block configurations at one shape; the fastest becomes FWD_CONFIG for this run."""
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    q = _rand(1, s_q, cfg["h"], d, dev=dev)
    kv = _rand(1, s_kv, d, dev=dev)
    idx = _indices(1, s_q, s_kv, k, dev)
    fl = sparse_mla_flops(s_q, k, cfg["h"], d, cfg["d_v"])
    res = dict(shape=shape, s_kv=s_kv, runs=[])
    for c in FWD_SWEEP[shape]:
        if clock.left() < 60:
            break
        try:
            ms = timeit(lambda: sparse_mla_fwd(q, kv, idx, d ** -0.5, cfg["d_v"], config=c))
            res["runs"].append(dict(cfg=c, ms=ms, tflops=fl / ms / 1e9))
        except Exception as e:
            res["runs"].append(dict(cfg=c, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(res["runs"][-1]), flush=True)
    ok = [r for r in res["runs"] if r.get("ms")]
    res["best"] = min(ok, key=lambda r: r["ms"])["cfg"] if ok else None
    return res


def sweep_kl(dev, clock: Clock, shape: str, s_kv: int = 65536, s_q: int = S_Q, k: int = TOP_K) -> dict:
    """Time the sparse-stage indexer KL (forward + backward, the target precomputed as in training) per KL_SWEEP
    configuration; the fastest becomes KL_CONFIG for this run."""
    kl = importlib.import_module("dsaforge.kernels.kl")
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    q = _rand(1, s_q, cfg["h"], d, dev=dev)
    kv = _rand(1, s_kv, d, dev=dev)
    idx = _indices(1, s_q, s_kv, k, dev)
    lse = sparse_mla_fwd(q, kv, idx, d ** -0.5, cfg["d_v"])[1]
    leaves = [_rand(1, s_q, cfg["hi"], cfg["di"], dev=dev).requires_grad_(),
              _rand(1, s_kv, cfg["di"], dev=dev).requires_grad_(),
              _rand(1, s_q, cfg["hi"], dev=dev, scale=cfg["hi"] ** -0.5).requires_grad_()]

    def step():
        loss = indexer_kl(*leaves, q, kv, lse, d ** -0.5, cfg["d_v"], indices=idx)
        torch.autograd.grad(loss.sum(), leaves)

    default = dict(kl.KL_CONFIG)
    res = dict(shape=shape, s_kv=s_kv, runs=[])
    for block_n, warps, stages in KL_SWEEP:
        if clock.left() < 60:
            break
        kl.KL_CONFIG.update(block_n=block_n, warps=warps, stages=stages)
        try:
            res["runs"].append(dict(cfg=(block_n, warps, stages), ms=timeit(step, max_reps=5)))
        except Exception as e:
            res["runs"].append(dict(cfg=(block_n, warps, stages), error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(res["runs"][-1]), flush=True)
    ok = [r for r in res["runs"] if r.get("ms")]
    best = min(ok, key=lambda r: r["ms"])["cfg"] if ok else None
    kl.KL_CONFIG.update(dict(zip(("block_n", "warps", "stages"), best)) if best else default)
    res["best"] = best
    return res


def sweep_scores(dev, clock: Clock, s_q: int = S_Q, sizes=(65536, 131072), max_reps: int = 20,
                 configs=((4, 64, 8192, 4, 3), (4, 64, 8192, 4, 2), (4, 64, 4096, 4, 3), (4, 64, 16384, 4, 3),
                          (4, 128, 8192, 8, 3), (2, 64, 8192, 4, 4), (2, 128, 8192, 4, 3),
                          (4, 64, 8192, 8, 4))) -> dict:
    """Time the indexer's score pass alone as `indexer_topk` runs it (fp8 from `reference.indexer_fp8_inputs`, V3.2's
    indexer heads, queries the last s_q of s_kv keys, one [s_q, s_kv] fp32 workspace): the v1 kernel (SCORE_CONFIG)
    against v2 configurations (SCORE_CONFIG_V2 tuples). Each v2 workspace is checked against v1's inside the rows'
    [start, end) (max_abs_diff NaN: an element there was never written). Leaves the kernel choice as it was: `best`
    per s_kv is the fastest v2 configuration that matches, for whoever switches the default."""
    idx = importlib.import_module("dsaforge.kernels.indexer")
    hi, di = SHAPES["v32"]["hi"], SHAPES["v32"]["di"]
    res = dict(shape="v32", s_q=s_q, v1_cfg=idx.SCORE_CONFIG["fp8"], runs=[], best={})
    for s_kv in sizes:
        if clock.left() < 60:
            break
        q8, k8, ks, wf = ref.indexer_fp8_inputs(_rand(1, s_q, hi, di, dev=dev), _rand(1, s_kv, di, dev=dev),
                                                _rand(1, s_q, hi, dev=dev, scale=hi ** -0.5))
        args = (q8[0], k8[0], wf[0], ks[0])
        start, end = ref.key_bounds(s_q, s_kv, None, dev)
        mask = ref.bounds_mask(start, end, s_kv)
        fl = indexer_flops(s_q, s_kv, hi, di)
        want, ws = torch.empty(s_q, s_kv, device=dev), torch.empty(s_q, s_kv, device=dev)

        def v1():
            kernel, idx.SCORE_KERNEL = idx.SCORE_KERNEL, {"fp8": "v1", "bf16": "v1"}
            try:
                idx._launch_scores(*args, want, start, end, 0, s_q, False)
            finally:
                idx.SCORE_KERNEL = kernel

        v1_ms = timeit(v1, max_reps=max_reps)
        res["runs"].append(dict(s_kv=s_kv, kernel="v1", ms=v1_ms, tflops=fl / v1_ms / 1e9))
        print(json.dumps(res["runs"][-1]), flush=True)
        scale = want[mask].abs().max().item()
        for c in configs:
            if clock.left() < 60:
                break
            run = dict(s_kv=s_kv, kernel="v2", cfg=c)
            try:
                def v2():
                    idx._launch_scores_v2(*args, ws, start, end, 0, s_q, False, config=c)

                ws.fill_(float("nan"))
                v2()
                diff = (ws - want).abs_()[mask].max().item()
                ms = timeit(v2, max_reps=max_reps)
                run.update(ms=ms, tflops=fl / ms / 1e9, speedup=v1_ms / ms, max_abs_diff=diff, v1_max_abs=scale,
                           match=diff <= 1e-4 * scale)
            except Exception as e:
                run.update(error=f"{type(e).__name__}: {e}"[:300])
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
        ok = [r for r in res["runs"] if r["s_kv"] == s_kv and r.get("match")]
        res["best"][s_kv] = min(ok, key=lambda r: r["ms"])["cfg"] if ok else None
        del want, ws, mask
        if dev == "cuda":
            torch.cuda.empty_cache()
    return res


def sweep(dev, clock: Clock, shape: str = "v32", s_kv: int = 65536, s_q: int = S_Q, k: int = TOP_K) -> dict:
    """Time the backward's block configurations at one shape: kernel 1 configs (with kernel 2's default), then
    kernel 2 configs with the best kernel 1, and the fused backward's config for comparison."""
    dq_cfgs, dkv_cfgs, fused_cfg = SWEEP[shape]
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    q = _rand(1, s_q, cfg["h"], d, dev=dev)
    kv = _rand(1, s_kv, d, dev=dev)
    idx = _indices(1, s_q, s_kv, k, dev)
    out, lse = sparse_mla_fwd(q, kv, idx, d ** -0.5, cfg["d_v"])
    dout = torch.randn_like(out)
    fl = sparse_mla_flops(s_q, k, cfg["h"], d, cfg["d_v"], backward=True)
    res = dict(shape=shape, s_kv=s_kv, dq=[], dkv=[])

    def bench_one(**kw):
        if clock.left() < 60:
            return dict(skipped="time budget")
        try:
            ms = timeit(lambda: sparse_mla_bwd(q, kv, idx, out, lse, dout, d ** -0.5, cfg["d_v"], **kw), max_reps=8)
            return dict(ms=ms, tflops=fl / ms / 1e9)
        except Exception as e:
            return dict(error=f"{type(e).__name__}: {e}"[:300])

    for c in dq_cfgs:
        res["dq"].append(dict(cfg=c, **bench_one(config=c, algorithm="split")))
        print(json.dumps(res["dq"][-1]), flush=True)
    ok = [r for r in res["dq"] if r.get("ms")]
    best_dq = min(ok, key=lambda r: r["ms"])["cfg"] if ok else None
    for c in dkv_cfgs:
        res["dkv"].append(dict(cfg=c, **bench_one(config=best_dq, dkv_config=c, algorithm="split")))
        print(json.dumps(res["dkv"][-1]), flush=True)
    ok = [r for r in res["dkv"] if r.get("ms")]
    res["best_dq"], res["best_dkv"] = best_dq, (min(ok, key=lambda r: r["ms"])["cfg"] if ok else None)
    res["fused"] = dict(cfg=fused_cfg, **bench_one(algorithm="fused", config=fused_cfg))
    print(json.dumps(res["fused"]), flush=True)
    return res
