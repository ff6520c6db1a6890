"""The efficiency suite: prefill and decode throughput and cost per million tokens against context position, dense
MLA vs DSA, for the whole model forward (the analogue of DeepSeek-V3.2's cost figure, paper Figure 3).

Model-level, not kernel-level: every layer's projections, attention, FFN/MoE and the output head run, through the
rollout engine's inference forward (`dsaforge.model.infer.forward_rows`: DSA's indexer scores + top-k + sparse MLA,
the fused sparse decode kernel for decode, no indexer KL; dense MLA as MHA for prefill and absorbed MQA for decode).
Decode is timed eager (the engine replays it from a CUDA graph, which removes launch overhead from both modes).
At each position p:
- prefill: the next `prefill_chunk` tokens after a cache holding p tokens (the marginal cost of prefilling at p);
- decode: one token for each of `decode_batch` sequences whose caches hold p tokens.
The caches are filled with random entries: timing does not depend on their values, and filling them by prefill
would cost more than the measurement. cost per million tokens = seconds per token x 1e6 x (USD per GPU-hour / 3600).

GPU only:
    python -m dsaforge.eval.efficiency --preset v32 --set model.n_layers=2 --set model.n_dense_layers=2 \
        --out docs/benchmarks/eval_efficiency_h200       # V3.2's attention shape (128 heads, 576/512, top-k 2048)
    (in the pipeline: `--set eval.suites=[efficiency]` on the evaluate stage measures the evaluated checkpoint)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dsaforge.eval.results import SuiteResult
from dsaforge.progress import Progress

MODES = ("dense", "sparse")


def default_positions(max_len: int, chunk: int) -> list[int]:
    """Doubling from 4096 while the next chunk still fits in max_len."""
    out, p = [], 4096
    while p + chunk <= max_len:
        out.append(p)
        p *= 2
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def time_call(model, mode: str, batch: int, start: int, length: int, repeats: int) -> float:
    """Median seconds of one inference forward (the rollout engine's: per-row positions over a slot cache, no indexer
    KL) of [batch, length] tokens at positions [start, start + length), logits at each row's last token."""
    from dsaforge.model.infer import SlotCache, forward_rows, stack_experts

    dev = next(model.parameters()).device
    cache = SlotCache.allocate(model, batch, start + length, with_indexer=mode == "sparse")
    g = torch.Generator(device=dev).manual_seed(0)
    for t in cache.kv + [k for k in cache.index_k if k is not None]:
        t[:, :start].normal_(generator=g)
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, length), device=dev)
    first = torch.full((batch,), start, device=dev, dtype=torch.long)
    n = torch.full((batch,), length, device=dev, dtype=torch.long)
    stacked = stack_experts(model)
    times = []
    for i in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        forward_rows(model, cache, tokens, first, n, None, mode, stacked)
        _sync(dev)
        if i:                                      # the first call warms up kernels and the allocator
            times.append(time.perf_counter() - t0)
    del cache
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def measure(model, positions: list[int], chunk: int, decode_batch: int, repeats: int,
            usd_per_hour: float) -> list[dict]:
    rows = []
    with Progress("eval efficiency", total=len(positions) * len(MODES) * 2, unit="point") as bar:
        for position in positions:
            for mode in MODES:
                for phase, batch, length in (("prefill", 1, chunk), ("decode", decode_batch, 1)):
                    s = time_call(model, mode, batch, position, length, repeats)
                    tokens = batch * length
                    per_token = s / tokens
                    rows.append({"phase": phase, "mode": mode, "position": position, "batch": batch,
                                 "tokens": tokens, "seconds": s, "tokens_per_s": tokens / s,
                                 "usd_per_mtok": per_token * 1e6 * usd_per_hour / 3600})
                    bar.update(1, pos=position, mode=mode, phase=phase)
    return rows


def summarize_rows(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        key = f"{r['phase']}/{r['mode']}/pos_{r['position']}"
        out[f"{key}/tokens_per_s"] = r["tokens_per_s"]
        out[f"{key}/usd_per_mtok"] = r["usd_per_mtok"]
    for phase in ("prefill", "decode"):
        mine = {(r["mode"], r["position"]): r["seconds"] for r in rows if r["phase"] == phase}
        last = max((p for m, p in mine if m == "sparse"), default=None)
        if last is not None and ("dense", last) in mine:
            out[f"{phase}/dense_over_sparse_at_max"] = mine[("dense", last)] / mine[("sparse", last)]
    return out


def run(model, cfg) -> SuiteResult:
    e = cfg.eval.efficiency
    positions = e.positions or default_positions(model.cfg.max_seq_len, e.prefill_chunk)
    rows = measure(model, positions, e.prefill_chunk, e.decode_batch, e.repeats, e.gpu_hour_usd)
    return SuiteResult("efficiency", rows, summarize_rows(rows),
                       {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        "usd_per_gpu_hour": e.gpu_hour_usd,
                        "prefill_chunk": e.prefill_chunk, "decode_batch": e.decode_batch,
                        "dtype": str(next(model.parameters()).dtype), "top_k": model.cfg.index_topk,
                        "n_heads": model.cfg.n_heads, "kv_lora_rank": model.cfg.kv_lora_rank,
                        "n_layers": model.cfg.n_layers})


def main(argv=None) -> int:
    from dsaforge.config import load_config
    from dsaforge.eval import report
    from dsaforge.model import Transformer

    p = argparse.ArgumentParser(description="Prefill/decode cost per million tokens vs context position, dense vs DSA "
                                            "(random weights: timing only).")
    p.add_argument("--preset", default="v32")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the efficiency benchmark needs a CUDA GPU")
    cfg = load_config(args.preset, (), args.sets)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg.model).to(torch.bfloat16).eval()
    result = run(model, cfg)
    out = Path(args.out)
    result.write(out)
    report.build(out, title=f"efficiency: {cfg.preset} attention shape, {result.info['gpu']}",
                 about={k: v for k, v in result.info.items()})
    print(json.dumps(result.summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
