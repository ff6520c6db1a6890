"""Sampler benchmark: per-sequence inverse-CDF sampling against the batch-wide Gumbel-max it replaced, same run.

Run on one GPU:  python -m dsaforge.model.bench_sampling --out docs/benchmarks/sampling_h200
CPU smoke test:  python -m dsaforge.model.bench_sampling --tiny      (tiny sizes, nothing written unless --out)

For each batch B (decode rows) at DeepSeek-V3.2's vocabulary (129,280) and each truncation setting (none, top-p
0.95, top-k 512), the median time of one `sample` call (processed logits, log-probs, the draw) with
- ours: one uniform per row from the rows' streams (`draw_bits` on the host, the [B] draws copied to the device,
  as the engine's decode step carries them), the inverse CDF of each row's processed distribution (fp64 cumsum,
  searchsorted);
- baseline: the sampler before per-sequence streams: one generator's Gumbel noise over [B, V], argmax.
Also the host time of `draw_bits` alone. Writes OUT.json (every number) and OUT.md (the table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dsaforge.model.sampling import SamplingParams, _param_tensors, draw_bits, processed_logits, sample, to_uniforms

SETTINGS = {"none": SamplingParams(temperature=1.0), "top_p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
            "top_k 512": SamplingParams(temperature=1.0, top_k=512)}


def gumbel_sample(logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator):
    """The baseline: the batch-wide sampler that per-sequence streams replaced (one generator, Gumbel-max)."""
    temp, top_p, top_k = _param_tensors(tuple((p.temperature, p.top_p, p.top_k) for p in params), logits.device)
    x = processed_logits(logits, temp, top_p, top_k, any_top_k=any(p.top_k > 0 for p in params),
                         any_top_p=any(p.top_p < 1 for p in params))
    logp = x.log_softmax(-1)
    u = torch.rand(x.shape, device=logits.device, generator=generator, dtype=torch.float32)
    tokens = (x - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))).argmax(-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _time(fn, device, reps: int) -> float:
    """Median seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def run(batches: list[int], vocab: int, device: torch.device, reps: int) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for b in batches:
        logits = torch.randn(b, vocab, device=device, generator=g) * 3
        streams, positions = list(range(1, b + 1)), [1000] * b
        host_s = _time(lambda: draw_bits(streams, positions), torch.device("cpu"), reps)
        for name, sp in SETTINGS.items():
            params = [sp] * b

            def ours():
                u = to_uniforms(torch.from_numpy(draw_bits(streams, positions)).to(device, non_blocking=True))
                return sample(logits, params, u)

            ours_s = _time(ours, device, reps)
            base_s = _time(lambda: gumbel_sample(logits, params, g), device, reps)
            rows.append({"batch": b, "vocab": vocab, "setting": name, "ours_ms": ours_s * 1e3,
                         "gumbel_ms": base_s * 1e3, "ratio": ours_s / base_s, "draw_bits_us": host_s * 1e6})
            print(f"B={b:4d} {name:11s} ours {ours_s * 1e3:8.3f} ms  gumbel {base_s * 1e3:8.3f} ms  "
                  f"ratio {ours_s / base_s:5.2f}  draw_bits {host_s * 1e6:6.1f} us", flush=True)
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = [f"# Sampler: per-sequence inverse CDF vs batch-wide Gumbel-max ({device})", "",
             "| batch | truncation | ours (ms) | Gumbel-max (ms) | ours / Gumbel | draw_bits on the host (us) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['setting']} | {r['ours_ms']:.3f} | {r['gumbel_ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['draw_bits_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized smoke run")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    batches, vocab = ([1, 8], 2048) if args.tiny else ([1, 64, 256], 129280)
    rows = run(batches, vocab, device, 3 if args.tiny else args.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "numpy": np.__version__}
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(table(rows, name))


if __name__ == "__main__":
    main()
