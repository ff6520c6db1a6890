"""Sparse decode launch sweep: every split count and Triton block configuration against the one-pass Hopper kernel.

Run on one GPU:  python -m dsaforge.kernels.bench_decode --out docs/benchmarks/decode_sweep_h200
V3.2's attention shape (128 heads, d_qk 576, d_v 512, top-k 2048) over a 64K latent cache, one query per sequence,
batch 1 to 64; each launch replayed from a CUDA graph, checked against the unsplit Triton launch. Writes OUT.json
(every launch) and OUT.md (the fastest per batch next to `sparse_mla_decode`'s own choice). The policy in
`sparse_mla_decode` comes from this sweep.

Timing (`graph_us`, also `bench_generate`'s): one call captured in a CUDA graph, warmed up, then `reps` replays
back to back between two CUDA events, in `windows` separate windows; the median window's mean. The top-k indices
are ascending, as the engine's (`kernels.topk_indices`).

Quick run of the launches that matter for the bars (batch 1 and 64, about a minute):
    python -m dsaforge.kernels.bench_decode --out OUT --batches 1 64
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsaforge.kernels.sparse_mla import sparse_mla_decode, sparse_mla_fwd

H, D, DV, K, T = 128, 576, 512, 2048, 65536
CONFIGS = ((64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2))


def graph_us(fn, reps: int = 50, windows: int = 3) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    out = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / reps * 1000)
    return sorted(out)[len(out) // 2]


# The Hopper kernel's schedules (sparse_mla_sm90.SCHEDULES); "pingpong" is the default, the others are candidates
# at batches whose 2 x B head-block programs already fill the GPU.
SM90_CONFIGS = (("sm90", 64, 2, "prefetch"), ("sm90", 64, 2, "serial"), ("sm90", 32, 3, "prefetch"))


def sweep(batches=(1, 2, 4, 8, 16, 32, 64), reps: int = 50) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for b in batches:
        q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(b, T, D, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(T, device="cuda")[:K].sort().values for _ in range(b)]).int()[:, None]
        want, _ = sparse_mla_fwd(q, kv, idx, 0.1, DV, num_splits=1, config=CONFIGS[0])
        launches = [("sparse_mla_decode", lambda: sparse_mla_decode(q, kv, idx, 0.1, DV)),
                    ("sm90 unsplit", lambda: sparse_mla_fwd(q, kv, idx, 0.1, DV))]
        if b >= 8 and torch.cuda.get_device_capability()[0] == 9:
            launches += [(f"sm90 unsplit cfg={cfg[1:]}", lambda cfg=cfg: sparse_mla_fwd(q, kv, idx, 0.1, DV, config=cfg))
                         for cfg in SM90_CONFIGS]
        launches += [(f"triton splits={ns} cfg={cfg}",
                      lambda ns=ns, cfg=cfg: sparse_mla_fwd(q, kv, idx, 0.1, DV, num_splits=ns, config=cfg))
                     for ns in (1, 2, 4, 8, 16, 32, 64) for cfg in CONFIGS if ns <= K // cfg[1]]
        for name, fn in launches:
            try:
                err = (fn()[0].float() - want.float()).abs().max().item()
            except Exception as e:       # a candidate that does not compile here is reported, not fatal
                print(f"batch {b:3d} {name:36s} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            us = graph_us(fn, reps)
            rows.append(dict(batch=b, launch=name, graph_us=round(us, 1),
                             gathered_tb_s=round(b * K * D * 2 / (us * 1e-6) / 1e12, 3), max_err=err))
            print(f"batch {b:3d} {name:36s} {us:8.1f} us", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| batch | sparse_mla_decode us | TB/s | fastest launch | its us |", "|---|---|---|---|---|"]
    for b in sorted({r["batch"] for r in rows}):
        mine = next(r for r in rows if r["batch"] == b and r["launch"] == "sparse_mla_decode")
        best = min((r for r in rows if r["batch"] == b and r["launch"] != "sparse_mla_decode"), key=lambda r: r["graph_us"])
        out.append(f"| {b} | {mine['graph_us']} | {mine['gathered_tb_s']} | {best['launch']} | {best['graph_us']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=50, help="graph replays per timing window")
    args = ap.parse_args()
    rows = sweep(tuple(args.batches), args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(f"# Sparse decode launches, {torch.cuda.get_device_name()}\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
