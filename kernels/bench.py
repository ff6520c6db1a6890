"""Benchmark of the DSA kernels against dense cuDNN attention and the unfused torch pieces.

Run on one GPU:   python -m dsaforge.kernels.bench [--checks] [--sweep] [--out docs/benchmarks]
CPU smoke test:   python -m dsaforge.kernels.bench --tiny   (tiny sizes, reference paths, nothing written)

Kernel level, for s_kv in 8K..128K at s_q = 4096, k = 2048 and V3.2's (h 128, d_qk 576, d_v 512, indexer 64x128)
and the small preset's (h 16, d_qk 320, d_v 256, indexer 16x128) head shapes: sparse MLA fwd/bwd (TFLOP/s as
FlashMLA counts, 2*s_q*k*h*(d_qk+d_v); backward 2*s_q*k*h*(3*d_qk+2*d_v)), the fused indexer + top-k (fp8, bf16),
the radix top-k against torch.topk, and the unfused torch baselines. Layer level, a whole sequence of L tokens
(S = T = L): DSA forward (indexer + top-k + sparse MLA) and forward+backward against causal SDPA (cuDNN backend) at
the equivalent MHA shape, with peak memory. Writes kernels_h200.json and kernels_h200.md under --out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os

import torch
import torch.nn.functional as F

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import last_path
from dsaforge.kernels.bench_harness import S_Q, SHAPES, SIZES, TOP_K, Clock, _rand, environment, peak_mb, timeit
from dsaforge.kernels.bench_sweep import sweep, sweep_fwd, sweep_kl, sweep_scores, sweep_topk
from dsaforge.kernels.checks import _indices
from dsaforge.kernels.indexer import indexer_flops, indexer_topk
from dsaforge.kernels.kl import indexer_kl
from dsaforge.kernels.sparse_mla import sparse_mla_bwd, sparse_mla_decode, sparse_mla_flops, sparse_mla_fwd
from dsaforge.kernels.topk import topk_indices


def unfused_sparse_fwd(q, kv, idx, scale, d_v):
    """The torch baseline: gather the selected latent rows, then two einsums (bf16), as one would write it."""
    kvg = kv[0][idx[0].clamp_min(0).long()]                                            # [S, K, D]
    logits = torch.einsum("shd,skd->shk", q[0], kvg).float() * scale
    logits = logits.masked_fill((idx[0] < 0)[:, None, :], float("-inf"))
    p = torch.softmax(logits, -1).to(q.dtype)
    return torch.einsum("shk,skd->shd", p, kvg[..., :d_v])


def unfused_indexer(q, k, w, chunk=512):
    """Chunked bf16 torch indexer scores (einsum + ReLU + weighted head sum), scores discarded chunk by chunk."""
    s = q.shape[1]
    for c in range(0, s, chunk):
        sc = torch.einsum("shd,td->sht", q[0, c:c + chunk], k[0]).relu_()
        torch.einsum("sht,sh->st", sc, w[0, c:c + chunk].to(sc.dtype))


def kernel_level(shape: str, s_kv: int, dev, clock: Clock, s_q: int = S_Q, k: int = TOP_K,
                 fwd_cfg=None, bwd_cfg=None, extras: bool = True) -> dict:
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    scale = d ** -0.5
    row = dict(shape=shape, s_kv=s_kv, s_q=s_q, k=k)
    q = _rand(1, s_q, cfg["h"], d, dev=dev)
    kv = _rand(1, s_kv, d, dev=dev)
    idx = _indices(1, s_q, s_kv, k, dev)
    fl_f = sparse_mla_flops(s_q, k, cfg["h"], d, cfg["d_v"])
    fl_b = sparse_mla_flops(s_q, k, cfg["h"], d, cfg["d_v"], backward=True)
    bytes_f = 2 * (q.numel() + s_q * cfg["h"] * cfg["d_v"] + s_q * k * d) + 4 * idx.numel()

    def fwd():
        return sparse_mla_fwd(q, kv, idx, scale, cfg["d_v"], config=fwd_cfg)

    ms = timeit(fwd)
    row.update(fwd_ms=ms, fwd_tflops=fl_f / ms / 1e9, fwd_gbps=bytes_f / ms / 1e6,
               fwd_path=last_path("sparse_mla_fwd")[0], fwd_peak_mb=peak_mb(fwd))
    out, lse = fwd()
    dout = torch.randn_like(out)

    def bwd():
        return sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], config=bwd_cfg)

    if clock.left() > 20:
        ms = timeit(bwd)
        row.update(bwd_ms=ms, bwd_tflops=fl_b / ms / 1e9, bwd_path=last_path("sparse_mla_bwd")[0],
                   bwd_peak_mb=peak_mb(bwd))
    if s_kv == 65536 and extras and clock.left() > 60:
        try:
            ms = timeit(lambda: sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], deterministic=True),
                        max_reps=2)
            row.update(bwd_det_ms=ms, bwd_det_tflops=fl_b / ms / 1e9)
        except Exception as e:
            row["bwd_det_error"] = f"{type(e).__name__}: {e}"[:300]
    if not extras:
        return row
    if clock.left() > 20:
        ms = timeit(lambda: unfused_sparse_fwd(q, kv, idx, scale, cfg["d_v"]), max_reps=5)
        row.update(unfused_fwd_ms=ms, unfused_fwd_tflops=fl_f / ms / 1e9)
    del out, dout
    # Indexer + top-k for the same s_q queries (the last s_q of s_kv positions), fp8 and bf16.
    iq = _rand(1, s_q, cfg["hi"], cfg["di"], dev=dev)
    ik = _rand(1, s_kv, cfg["di"], dev=dev)
    iw = _rand(1, s_q, cfg["hi"], dev=dev, dtype=torch.float32, scale=cfg["hi"] ** -0.5)
    q8, k8, ks, wf = ref.indexer_fp8_inputs(iq, ik, iw)
    fl_i = indexer_flops(s_q, s_kv, cfg["hi"], cfg["di"])
    if clock.left() > 20:
        ms = timeit(lambda: indexer_topk(q8, k8, wf, k, k_scale=ks))
        row.update(indexer_topk_fp8_ms=ms, indexer_topk_fp8_tflops=fl_i / ms / 1e9,
                   indexer_path=last_path("indexer_topk")[0])
        ms = timeit(lambda: indexer_topk(iq, ik, iw, k))
        row.update(indexer_topk_bf16_ms=ms, indexer_topk_bf16_tflops=fl_i / ms / 1e9)
        try:   # the default fp8 path: quantize, fp8 scores, top (k + margin), exact re-score, final top-k
            ms = timeit(lambda: indexer_topk(iq, ik, iw, k, fp8=True))
            row.update(indexer_topk_rerank_ms=ms, indexer_topk_rerank_tflops=fl_i / ms / 1e9)
        except Exception as e:
            row["indexer_topk_rerank_error"] = f"{type(e).__name__}: {e}"[:300]
    if clock.left() > 30:
        ms = timeit(lambda: unfused_indexer(iq, ik[:, :], iw), max_reps=3)
        row.update(unfused_indexer_bf16_ms=ms, unfused_indexer_bf16_tflops=fl_i / ms / 1e9)
    del q8, k8
    # Top-k alone over full rows of s_kv fp32 scores, against torch.topk.
    if clock.left() > 20:
        x = torch.randn(s_q, s_kv, device=dev)
        row["topk_ms"] = timeit(lambda: topk_indices(x, k))
        row["torch_topk_ms"] = timeit(lambda: torch.topk(x, k, dim=-1))
        row["topk_path"] = last_path("topk")[0]
        del x
    # Sparse indexer KL (selected set), forward + backward, for the same rows.
    if clock.left() > 30:
        lse_f = lse.float()
        leaves = [t.detach().requires_grad_() for t in (iq, ik, iw)]

        def kl():
            loss = indexer_kl(*leaves, q, kv, lse_f, scale, cfg["d_v"], indices=idx)
            torch.autograd.grad(loss.sum(), leaves)

        try:
            row["kl_sparse_fwdbwd_ms"] = timeit(kl, max_reps=5)
            row["kl_path"] = last_path("indexer_kl")[0]
        except Exception as e:  # keep the row's other numbers
            row["kl_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def sdpa_dense(L: int, cfg: dict, dev, backward: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = _rand(1, cfg["h"], L, cfg["mha_qk"], dev=dev).requires_grad_(backward)
    k = _rand(1, cfg["h"], L, cfg["mha_qk"], dev=dev).requires_grad_(backward)
    v = _rand(1, cfg["h"], L, cfg["mha_v"], dev=dev).requires_grad_(backward)
    backends = [SDPBackend.CUDNN_ATTENTION] if dev == "cuda" else [SDPBackend.MATH]

    def run():
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            o.backward(torch.ones_like(o))
        return o
    return run


def layer_level(shape: str, L: int, dev, clock: Clock, k: int = TOP_K, dense: bool = True) -> dict:
    """A whole L-token sequence: DSA (fp8 indexer + top-k + sparse MLA) against dense causal cuDNN SDPA."""
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    scale = d ** -0.5
    row = dict(shape=shape, L=L, k=k)
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev == "cuda" else 0
    q = _rand(1, L, cfg["h"], d, dev=dev)
    kv = _rand(1, L, d, dev=dev)
    iq = _rand(1, L, cfg["hi"], cfg["di"], dev=dev)
    ik = _rand(1, L, cfg["di"], dev=dev)
    iw = _rand(1, L, cfg["hi"], dev=dev, dtype=torch.float32, scale=cfg["hi"] ** -0.5)
    q8, k8, ks, wf = ref.indexer_fp8_inputs(iq, ik, iw)
    leaves = [t.requires_grad_() for t in (iq, ik, iw)]
    state = {}

    def select(rerank: bool):
        if rerank:   # fp8 scores, then the top (k + margin) re-scored exactly: recall >= 0.99 (checks)
            return indexer_topk(iq.detach(), ik.detach(), iw.detach(), k, fp8=True)
        return indexer_topk(q8, k8, wf, k, k_scale=ks)

    def fwd(rerank: bool = False):
        state.pop("out", None)                   # the previous call's output is not held during this one
        idx = select(rerank)
        out, lse = sparse_mla_fwd(q, kv, idx, scale, cfg["d_v"])
        state.update(idx=idx, out=out, lse=lse)

    def fwd_bwd():
        fwd()
        if "dout" not in state:
            state["dout"] = torch.randn_like(state["out"])
        sparse_mla_bwd(q, kv, state["idx"], state["out"], state["lse"], state["dout"], scale, cfg["d_v"])

    reps = 3 if L <= 32768 else 1
    row["dsa_fwd_ms"] = timeit(fwd, max_reps=reps, budget_ms=3000)
    ti = timeit(lambda: indexer_topk(q8, k8, wf, k, k_scale=ks), max_reps=reps, budget_ms=3000)
    row["dsa_indexer_topk_ms"] = ti
    row["dsa_indexer_tflops"] = indexer_flops(L, L, cfg["hi"], cfg["di"]) / ti / 1e9
    if clock.left() > 30:
        try:
            row["dsa_fwd_rerank_ms"] = timeit(lambda: fwd(True), max_reps=reps, budget_ms=3000)
            row["dsa_indexer_topk_rerank_ms"] = timeit(lambda: select(True), max_reps=reps, budget_ms=3000)
        except Exception as e:
            row["rerank_error"] = f"{type(e).__name__}: {e}"[:300]
    if clock.left() > 30:
        row["dsa_fwdbwd_ms"] = timeit(fwd_bwd, max_reps=reps, budget_ms=3000)
        if dev == "cuda":
            torch.cuda.synchronize()
            row["dsa_fwdbwd_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    if clock.left() > 60:
        def fwd_bwd_kl():
            fwd_bwd()
            loss = indexer_kl(*leaves, q, kv, state["lse"], scale, cfg["d_v"], indices=state["idx"])
            torch.autograd.grad(loss.sum(), leaves)

        row["dsa_fwdbwd_kl_ms"] = timeit(fwd_bwd_kl, max_reps=reps, budget_ms=3000)
        if dev == "cuda":
            torch.cuda.synchronize()
            row["dsa_fwdbwd_kl_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del q, kv, q8, k8, ks, wf, state, leaves
    if dense and clock.left() > 60:
        if dev == "cuda":
            torch.cuda.empty_cache()
        row["sdpa_fwd_ms"] = timeit(sdpa_dense(L, cfg, dev, False), max_reps=reps, budget_ms=3000)
        mha_flops = 2.0 * L * L / 2 * cfg["h"] * (cfg["mha_qk"] + cfg["mha_v"])
        row["sdpa_fwd_tflops"] = mha_flops / row["sdpa_fwd_ms"] / 1e9
        if clock.left() > 60:
            row["sdpa_fwdbwd_ms"] = timeit(sdpa_dense(L, cfg, dev, True), max_reps=1 if L > 32768 else 3,
                                           budget_ms=3000)
    for a, b in (("fwd", "fwd"), ("fwd", "fwd_rerank"), ("fwdbwd", "fwdbwd"), ("fwdbwd", "fwdbwd_kl")):
        if f"sdpa_{a}_ms" in row and f"dsa_{b}_ms" in row:
            row[f"speedup_{b}"] = row[f"sdpa_{a}_ms"] / row[f"dsa_{b}_ms"]
    return row


def decode_level(shape: str, dev, b: int = 64, s_q: int = 2, s_kv: int = 131072, k: int = TOP_K) -> dict:
    cfg = SHAPES[shape]
    d = cfg["d_v"] + cfg["d_pe"]
    q = _rand(b, s_q, cfg["h"], d, dev=dev)
    kv = _rand(b, s_kv, d, dev=dev)
    idx = _indices(b, s_q, s_kv, k, dev) if s_kv * b * s_q <= 2**28 else torch.randint(
        0, s_kv - s_q, (b, s_q, k), device=dev, dtype=torch.int32)
    ms = timeit(lambda: sparse_mla_decode(q, kv, idx, d ** -0.5, cfg["d_v"]))
    fl = sparse_mla_flops(b * s_q, k, cfg["h"], d, cfg["d_v"])
    by = 2 * (q.numel() + b * s_q * cfg["h"] * cfg["d_v"] + b * s_q * k * d) + 4 * idx.numel()
    return dict(shape=shape, b=b, s_q=s_q, s_kv=s_kv, k=k, ms=ms, tflops=fl / ms / 1e9, gbps=by / ms / 1e6)

def _f(x, nd=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def render_markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"# DSA kernels on {env.get('gpu', 'CPU')}", "",
             f"Measured {env['date']} with torch {env['torch']}, Triton {env['triton']}, CUDA {env.get('cuda')}, "
             f"Python {env['python']} by `python -m dsaforge.kernels.bench`. Times are medians of device-event timings "
             "after a warm-up call. TFLOP/s for sparse MLA as FlashMLA counts, 2*s_q*k*h*(d_qk+d_v) forward and "
             "2*s_q*k*h*(3*d_qk+2*d_v) backward; indexer 2*pairs*Hi*Di over the causal (query, key) pairs.", ""]
    if res.get("kernels"):
        lines += ["## Kernels (s_q = 4096, k = 2048)", "",
                  "| shape | s_kv | sparse fwd ms | fwd TFLOP/s | fwd GB/s | bwd ms | bwd TFLOP/s | unfused fwd ms "
                  "| indexer+top-k fp8 ms (TFLOP/s) | fp8 + re-score ms | bf16 ms (TFLOP/s) | unfused bf16 indexer ms "
                  "| top-k ms | torch.topk ms | KL sparse fwd+bwd ms | fwd peak MB | bwd peak MB |",
                  "|" + "---|" * 17]
        for r in res["kernels"]:
            lines.append(
                f"| {r['shape']} | {r['s_kv'] // 1024}K | {_f(r.get('fwd_ms'), 2)} | {_f(r.get('fwd_tflops'))} | "
                f"{_f(r.get('fwd_gbps'), 0)} | {_f(r.get('bwd_ms'), 2)} | {_f(r.get('bwd_tflops'))} | "
                f"{_f(r.get('unfused_fwd_ms'), 2)} | {_f(r.get('indexer_topk_fp8_ms'), 2)} "
                f"({_f(r.get('indexer_topk_fp8_tflops'))}) | {_f(r.get('indexer_topk_rerank_ms'), 2)} | "
                f"{_f(r.get('indexer_topk_bf16_ms'), 2)} "
                f"({_f(r.get('indexer_topk_bf16_tflops'))}) | {_f(r.get('unfused_indexer_bf16_ms'), 1)} | "
                f"{_f(r.get('topk_ms'), 2)} | {_f(r.get('torch_topk_ms'), 2)} | "
                f"{_f(r.get('kl_sparse_fwdbwd_ms'), 2)} | "
                f"{_f(r.get('fwd_peak_mb'), 0)} | {_f(r.get('bwd_peak_mb'), 0)} |")
        lines.append("")
    if res.get("layers"):
        lines += ["## Whole attention over an L-token sequence (S = T = L)", "",
                  "DSA = fp8 indexer + top-k + sparse MLA; the re-score column selects with the fp8 scores' top "
                  "(k + k/4) re-scored exactly (`indexer_topk(..., fp8=True)`, the path whose recall passes the "
                  "checks). fwd+bwd adds the sparse MLA backward; +KL adds the "
                  "sparse-stage indexer KL forward and backward (the indexer's only gradient). Dense = causal SDPA, "
                  "cuDNN backend, at the MHA shape of the same model (v32: 128 heads, d_qk 192, d_v 128; small: 16 "
                  "heads, 128, 64). Peak memory includes the inputs.", "",
                  "| shape | L | DSA fwd ms | of which indexer+top-k ms (TFLOP/s) | DSA fwd, re-score ms "
                  "| DSA fwd+bwd ms | DSA fwd+bwd+KL ms | dense fwd ms | dense fwd+bwd ms | fwd speedup "
                  "| fwd speedup, re-score | fwd+bwd speedup | fwd+bwd+KL speedup | DSA fwd+bwd peak MB | +KL peak MB |",
                  "|" + "---|" * 15]
        for r in res["layers"]:
            lines.append(
                f"| {r['shape']} | {r['L'] // 1024}K | {_f(r.get('dsa_fwd_ms'), 1)} | "
                f"{_f(r.get('dsa_indexer_topk_ms'), 1)} ({_f(r.get('dsa_indexer_tflops'))}) | "
                f"{_f(r.get('dsa_fwd_rerank_ms'), 1)} | "
                f"{_f(r.get('dsa_fwdbwd_ms'), 1)} | {_f(r.get('dsa_fwdbwd_kl_ms'), 1)} | "
                f"{_f(r.get('sdpa_fwd_ms'), 1)} | {_f(r.get('sdpa_fwdbwd_ms'), 1)} | {_f(r.get('speedup_fwd'), 2)} | "
                f"{_f(r.get('speedup_fwd_rerank'), 2)} | "
                f"{_f(r.get('speedup_fwdbwd'), 2)} | "
                f"{_f(r.get('speedup_fwdbwd_kl'), 2)} | {_f(r.get('dsa_fwdbwd_peak_mb'), 0)} | "
                f"{_f(r.get('dsa_fwdbwd_kl_peak_mb'), 0)} |")
        lines.append("")
    if res.get("decode"):
        lines += ["## Sparse decode", "", "| shape | batch | s_q | s_kv | k | ms | TFLOP/s | GB/s |", "|" + "---|" * 8]
        for r in res["decode"]:
            lines.append(f"| {r['shape']} | {r['b']} | {r['s_q']} | {r['s_kv'] // 1024}K | {r['k']} | "
                         f"{_f(r['ms'], 3)} | "
                         f"{_f(r['tflops'])} | {_f(r['gbps'], 0)} |")
        lines.append("")
    if res.get("sweep"):
        lines += ["## Block-size sweeps (top-k at 128K; sparse MLA at s_kv 64K)", "", "```",
                  json.dumps(res["sweep"], indent=1), "```", ""]
    if res.get("checks"):
        lines += ["## GPU correctness checks (float64 references, poisoned outputs)", "",
                  "| check | passed | details |", "|---|---|---|"]
        for c in res["checks"]:
            det = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in c.items()
                   if k not in ("check", "passed", "shape")}
            lines.append(f"| {c['check']} | {c['passed']} | `{json.dumps(det)}` |")
        lines.append("")
    if res.get("skipped"):
        lines += ["Skipped for the time budget: " + ", ".join(res["skipped"]), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--name", default="kernels_h200")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--checks", action="store_true", help="run the GPU correctness checks first")
    ap.add_argument("--sweep", action="store_true",
                    help="sweep the block sizes of top-k, sparse MLA and the indexer KL first and use the best")
    ap.add_argument("--sweep-only", default=None, help="with --sweep: only these parts (comma list of topk,fwd,bwd,kl; "
                    "score, the indexer score kernel v1 against v2, runs only when named)")
    ap.add_argument("--shapes", default="v32,small")
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--layer-sizes", default=None, help="L for the whole-layer comparison (default: --sizes)")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes; writes nothing")
    args = ap.parse_args(argv)
    clock = Clock(args.budget_s)
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    global S_Q, TOP_K
    if args.tiny:
        SHAPES.update(v32=dict(h=4, d_v=32, d_pe=16, hi=4, di=16, mha_qk=24, mha_v=16))
        SHAPES.update(small=dict(h=2, d_v=16, d_pe=16, hi=2, di=16, mha_qk=16, mha_v=8))
        S_Q, TOP_K = 32, 16
        args.sizes = "64,128"
    res = dict(environment=environment(), kernels=[], layers=[], decode=[], skipped=[])
    shapes = args.shapes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    layer_sizes = [int(s) for s in (args.layer_sizes or args.sizes).split(",")]

    def save():
        if args.tiny:
            return
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
            f.write(render_markdown(res))

    if args.checks and dev == "cuda":
        from dsaforge.kernels.checks import run_all
        res["checks"] = run_all(log=lambda s: print(s, flush=True))
        save()
    if args.sweep and dev == "cuda":
        smla = importlib.import_module("dsaforge.kernels.sparse_mla")   # the module, not the function it exports
        smla_bwd = importlib.import_module("dsaforge.kernels.sparse_mla_bwd")
        parts = set((args.sweep_only or "topk,fwd,bwd,kl").split(","))
        res["sweep"] = []
        if "topk" in parts:
            res["sweep"].append(sweep_topk(dev, clock))
            print(json.dumps(res["sweep"][-1]), flush=True)
        if "score" in parts:
            res["sweep"].append(sweep_scores(dev, clock))
            print(json.dumps(res["sweep"][-1]), flush=True)
        for shape in shapes:
            if "kl" in parts:
                res["sweep"].append(sweep_kl(dev, clock, shape))
            if "fwd" in parts:
                sw = sweep_fwd(dev, clock, shape)
                res["sweep"].append(sw)
                if sw["best"] and sw["best"][0] == "sm90":
                    importlib.import_module("dsaforge.kernels.sparse_mla_sm90").SM90_FWD_CONFIG = tuple(sw["best"])
                elif sw["best"]:
                    smla.FWD_CONFIG[SHAPES[shape]["d_v"]] = tuple(sw["best"])
            if "bwd" in parts:
                sw = sweep(dev, clock, shape)
                res["sweep"].append(sw)
                for kind, table in (("dq", smla_bwd.DQ_CONFIG), ("dkv", smla_bwd.DKV_CONFIG)):
                    if sw.get(f"best_{kind}"):
                        table[SHAPES[shape]["d_v"]] = tuple(sw[f"best_{kind}"])
            save()
    if not args.no_kernels:
        for shape in shapes:
            for s_kv in sizes:
                if clock.left() < 30:
                    res["skipped"].append(f"kernels {shape} {s_kv}")
                    continue
                try:
                    r = kernel_level(shape, s_kv, dev, clock, s_q=S_Q, k=TOP_K)
                except Exception as e:
                    r = dict(shape=shape, s_kv=s_kv, error=f"{type(e).__name__}: {e}"[:500])
                print(json.dumps(r), flush=True)
                res["kernels"].append(r)
                save()
                if dev == "cuda":
                    torch.cuda.empty_cache()
        for shape in shapes:
            if clock.left() < 20:
                break
            try:
                r = decode_level(shape, dev, b=4 if args.tiny else 64, s_kv=sizes[-1], k=TOP_K)
            except Exception as e:
                r = dict(shape=shape, b=0, s_q=0, s_kv=0, k=0, ms=float("nan"), tflops=float("nan"),
                         gbps=float("nan"), error=f"{type(e).__name__}: {e}"[:500])
            print(json.dumps(r), flush=True)
            res["decode"].append(r)
    if not args.no_layers:
        for shape in shapes:
            for L in layer_sizes:
                if clock.left() < 40:
                    res["skipped"].append(f"layer {shape} {L}")
                    continue
                try:
                    r = layer_level(shape, L, dev, clock, k=TOP_K, dense=True)
                except Exception as e:
                    r = dict(shape=shape, L=L, error=f"{type(e).__name__}: {e}"[:500])
                print(json.dumps(r), flush=True)
                res["layers"].append(r)
                save()
                if dev == "cuda":
                    torch.cuda.empty_cache()
    save()
    print(render_markdown(res))
    return res


if __name__ == "__main__":
    main()
