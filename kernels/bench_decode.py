"""Sparse decode launch sweep: every split count and Triton block configuration against the one-pass Hopper kernel.

Run on one GPU:  python -m dsaforge.kernels.bench_decode --out docs/benchmarks/decode_sweep_h200
V3.2's attention shape (128 heads, d_qk 576, d_v 512, top-k 2048) over a 64K latent cache, one query per sequence,
batch 1 to 64; each launch replayed from a CUDA graph, checked against the unsplit Triton launch. Writes OUT.json
(every launch) and OUT.md (the fastest per batch next to `sparse_mla_decode`'s own choice). The policy in
`sparse_mla_decode` comes from this sweep.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsaforge.kernels.sparse_mla import sparse_mla_decode, sparse_mla_fwd

H, D, DV, K, T = 128, 576, 512, 2048, 65536
CONFIGS = ((64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2))


def graph_us(fn, reps: int = 50) -> float:
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
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def sweep(batches=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for b in batches:
        q = torch.randn(b, 1, H, D, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(b, T, D, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(T, device="cuda")[:K].sort().values for _ in range(b)]).int()[:, None]
        want, _ = sparse_mla_fwd(q, kv, idx, 0.1, DV, num_splits=1, config=CONFIGS[0])
        launches = [("sparse_mla_decode", lambda: sparse_mla_decode(q, kv, idx, 0.1, DV)),
                    ("sm90 unsplit", lambda: sparse_mla_fwd(q, kv, idx, 0.1, DV))]
        launches += [(f"triton splits={ns} cfg={cfg}",
                      lambda ns=ns, cfg=cfg: sparse_mla_fwd(q, kv, idx, 0.1, DV, num_splits=ns, config=cfg))
                     for ns in (1, 2, 4, 8, 16, 32, 64) for cfg in CONFIGS if ns <= K // cfg[1]]
        for name, fn in launches:
            err = (fn()[0].float() - want.float()).abs().max().item()
            us = graph_us(fn)
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
    args = ap.parse_args()
    rows = sweep()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(f"# Sparse decode launches, {torch.cuda.get_device_name()}\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
