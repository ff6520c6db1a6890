"""Sparse MLA backward: the split algorithm with the Triton dq kernel against the Hopper (Gluon) ones, side by side.

Run on one sm_90 GPU:  python -m dsaforge.kernels.bench_bwd --out docs/benchmarks/sparse_bwd_h200
V3.2's attention shape (h 128, d_qk 576, d_v 512, top-k 2048), s_q 4096 queries over 64K and 128K keys. Each row
times the whole `sparse_mla_bwd` (split, deterministic=False) with the Triton dq kernel (DSAFORGE_SM90_BWD=0) and
with the Hopper kernel in each configuration of --configs (the dq kernel, or ("sm90-fused", ...) forming dKV too):
ms (median of device-event timings, `bench_harness.timeit`), TFLOP/s as FlashMLA counts the backward,
2*s_q*k*h*(3*d_qk + 2*d_v), and the ratio Triton / Hopper; each kernel's own time from one profiled call; and the
relative error of the Hopper dQ and dKV against the Triton ones. Writes OUT.json and OUT.md. About a minute.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsaforge.kernels._dispatch import env_var, last_path
from dsaforge.kernels.bench_harness import _rand, environment, timeit
from dsaforge.kernels.checks import _indices, rel_err
from dsaforge.kernels.sparse_mla import sparse_mla_bwd, sparse_mla_flops, sparse_mla_fwd
from dsaforge.kernels.sparse_mla_bwd_sm90 import SM90_BWD_CONFIG, SM90_FUSED_CONFIG, is_fused

H, D, DV, K, S_Q = 128, 576, 512, 2048, 4096
CONFIGS = (SM90_BWD_CONFIG, ("sm90", 64, 1), SM90_FUSED_CONFIG)


def sm90_bwd(on: bool):
    return env_var("DSAFORGE_SM90_BWD", "1" if on else "0")


def kernel_ms(fn) -> dict:
    """Device milliseconds of each `_sparse_mla_bwd*` kernel in one call of fn, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if "_sparse_mla_bwd" in e.key or "_segment_sum" in e.key:
            us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            out[e.key] = round(out.get(e.key, 0.0) + us / 1e3, 3)
    return out


def run(sizes=(65536, 131072), configs=CONFIGS, s_q: int = S_Q, k: int = K, h: int = H) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    flops = sparse_mla_flops(s_q, k, h, D, DV, backward=True)
    scale = D ** -0.5
    for s_kv in sizes:
        q = _rand(1, s_q, h, D, dev="cuda")
        kv = _rand(1, s_kv, D, dev="cuda")
        idx = _indices(1, s_q, s_kv, k, "cuda")
        out, lse = sparse_mla_fwd(q, kv, idx, scale, DV)
        dout = torch.randn_like(out)

        def bwd(config=None):
            return sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, DV, algorithm="split", config=config)

        base = dict(s_q=s_q, s_kv=s_kv, k=k, h=h)
        with sm90_bwd(False):
            ms_old = timeit(bwd)
            dq_old, dkv_old = bwd()
            rows.append(dict(base, variant="triton split", path=last_path("sparse_mla_bwd")[1], ms=ms_old,
                             tflops=flops / ms_old / 1e9, kernels_ms=kernel_ms(bwd)))
        for cfg in configs:
            row = dict(base, variant="sm90, dkv fused" if is_fused(cfg) else "sm90 dq + triton dkv", config=list(cfg))
            try:
                with sm90_bwd(True):
                    ms = timeit(lambda: bwd(cfg))
                    dq, dkv = bwd(cfg)
                    row.update(path=last_path("sparse_mla_bwd")[1], ms=ms, tflops=flops / ms / 1e9,
                               speedup=ms_old / ms, kernels_ms=kernel_ms(lambda: bwd(cfg)),
                               dq_vs_triton_rel_err=rel_err(dq, dq_old), dkv_vs_triton_rel_err=rel_err(dkv, dkv_old))
                del dq, dkv
            except Exception as e:      # keep the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        del q, kv, idx, out, lse, dout, dq_old, dkv_old
        torch.cuda.empty_cache()
    return rows


def render(rows: list[dict], env: dict | None = None) -> str:
    lines = ["# Sparse MLA backward: Triton split against the Hopper kernels", ""]
    if env:
        lines += [f"{env.get('gpu', '')}, torch {env.get('torch', '')}, triton {env.get('triton', '')}", ""]
    lines += ["FLOPs as FlashMLA counts the backward, 2*s_q*k*h*(3*d_qk + 2*d_v); d_qk 576, d_v 512; "
              "`python -m dsaforge.kernels.bench_bwd`.", "",
              "| s_q | s_kv | k | h | variant | config | ms | TFLOP/s | Triton / this | dq kernel ms | dkv kernel ms "
              "| dQ, dKV rel. err. vs Triton |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        km = r.get("kernels_ms", {})
        dq_ms = sum(v for kk, v in km.items() if "bwd_dq" in kk or "bwd_sm90" in kk)
        dkv_ms = sum(v for kk, v in km.items() if "bwd_dkv" in kk)
        if "error" in r:
            lines.append(f"| {r['s_q']} | {r['s_kv']} | {r['k']} | {r['h']} | {r['variant']} | {r.get('config', '')} "
                         f"| error: {r['error'][:120]} | | | | | |")
            continue
        err = (f"{r['dq_vs_triton_rel_err']:.1e}, {r['dkv_vs_triton_rel_err']:.1e}"
               if "dq_vs_triton_rel_err" in r else "")
        cfg = ", ".join(map(str, r["config"])) if "config" in r else ""
        lines.append(f"| {r['s_q']} | {r['s_kv']} | {r['k']} | {r['h']} | {r['variant']} | {cfg} | {r['ms']:.2f} "
                     f"| {r['tflops']:.0f} | {r.get('speedup', 1.0):.2f}x | {dq_ms:.2f} | {dkv_ms:.2f} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/benchmarks/sparse_bwd_h200", help="writes OUT.json and OUT.md")
    ap.add_argument("--sizes", default="65536,131072")
    ap.add_argument("--configs", default=None, help='JSON list of sm90 configs, e.g. [["sm90", 32, 2]]')
    args = ap.parse_args(argv)
    configs = [tuple(c) for c in json.loads(args.configs)] if args.configs else CONFIGS
    rows = run(tuple(int(x) for x in args.sizes.split(",")), configs)
    env = environment()
    md = render(rows, env)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    return rows


if __name__ == "__main__":
    main()
