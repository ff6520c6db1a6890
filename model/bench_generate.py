"""Rollout-engine benchmark: the issue's bars, each against its baseline in the same run.

Run on one GPU:  python -m dsaforge.model.bench_generate --out docs/benchmarks/generation_h200
CPU smoke test:  python -m dsaforge.model.bench_generate --tiny      (tiny sizes, nothing written unless --out)

1. Rollout tokens/s: the small preset (random weights, exported and re-imported, bf16), 64 prompts of 1,024 tokens,
   512 new tokens each (no stop token, so every row decodes all 512): our engine (sparse and dense, CUDA-graph
   decode) against transformers' DeepseekV32ForCausalLM.generate on the same exported checkpoint and batch.
2. Decode-step time per layer at batch 1 and 64 (context 1K + 256), graph replay and eager; sparse also at context
   4K, twice the indexer's top-k (below top-k the selection is every visible key and the indexer does not score).
3. The fused sparse decode kernel at V3.2's attention shape (128 heads, d_qk 576, d_v 512, top-k 2048) over a 64K
   cache: microseconds per call at batch 1 and 64, eager and replayed from a CUDA graph, and TB/s of gathered cache
   (B x 2048 x 576 x 2 bytes per call). Measured as `kernels.bench_decode` measures its sweep (ascending top-k
   indices as the engine's, back-to-back graph replays between CUDA events), so the two agree.
Writes OUT.json (every number) and OUT.md (the table).

--profile instead writes OUT_profile.json / OUT_profile.md (`model/bench_profile.py`): the top kernels of eager
decode steps, launches per layer, wall vs GPU-busy time per step, and the decode kernel by timing method.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dsaforge.config import preset
from dsaforge.kernels.bench_decode import graph_us
from dsaforge.kernels.sparse_mla import sparse_mla_decode
from dsaforge.model.engine import Engine
from dsaforge.model.hf import export_hf, import_hf
from dsaforge.model.sampling import SamplingParams
from dsaforge.model.transformer import Transformer


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int = 20) -> float:
    """Median seconds of fn() after a warm-up call."""
    fn()
    _sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def _graph_options(device, eager: bool) -> list[bool]:
    if device.type != "cuda":
        return [False]
    return [True, False] if eager else [True]


def rollout(model_dir: Path, model: Transformer, batch: int, prompt_len: int, new: int, device, modes, hf: bool,
            max_batch: int, eager: bool = True) -> dict:
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(16, vocab, (batch, prompt_len), generator=g)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new)
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new}
    for mode in modes:
        for graphs in _graph_options(device, eager):
            eng = Engine(model, mode=mode, max_batch=max_batch, max_len=prompt_len + new + 1, cuda_graphs=graphs,
                         capture_routing=True)
            eng.generate(prompts[:2].tolist(), SamplingParams(max_new_tokens=4))      # warm-up (and graph capture)
            _sync()
            t = time.perf_counter()
            res = eng.generate(prompts.tolist(), params)
            _sync()
            wall = time.perf_counter() - t
            n = sum(len(r.tokens) for r in res)
            key = f"engine_{mode}" + ("_graphs" if graphs else "_eager")
            out[key] = {"seconds": wall, "new_tokens": n, "tokens_per_s": n / wall,
                        "cuda_graphs": eng.stats["cuda_graphs"]}
            print(f"  {key}: {n / wall:,.0f} new tokens/s ({wall:.1f} s; graphs {eng.stats['cuda_graphs']})", flush=True)
            del eng
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if hf:
        import transformers

        m = transformers.DeepseekV32ForCausalLM.from_pretrained(model_dir, dtype=model.embed.weight.dtype).to(device)
        m.eval()
        ids = prompts.to(device)
        with torch.no_grad():
            m.generate(ids[:2], max_new_tokens=4, do_sample=True, pad_token_id=0)
            _sync()
            t = time.perf_counter()
            gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=True, top_p=0.95, temperature=1.0, pad_token_id=0)
            _sync()
        wall = time.perf_counter() - t
        n = (gen.shape[1] - prompt_len) * batch
        out["transformers"] = {"seconds": wall, "new_tokens": n, "tokens_per_s": n / wall}
        print(f"  transformers generate: {n / wall:,.0f} new tokens/s ({wall:.1f} s)", flush=True)
        for k, v in out.items():
            if k.startswith("engine_"):
                v["vs_transformers"] = v["tokens_per_s"] / out["transformers"]["tokens_per_s"]
        del m
    return out


def decode_step(model: Transformer, ctx: int, batches, device, eager: bool = True) -> dict:
    """Seconds per decode step over `batch` slots at context `ctx`, per layer. Then sparse at twice the indexer's
    top-k: below top-k keys the engine selects every visible key without scoring (exact), so this row is the one
    where the indexer scores and selects at every step."""
    out = {}
    graph_opts = _graph_options(device, eager)
    runs = [(b, mode, graphs, ctx) for b in batches for mode in ("sparse", "dense") for graphs in graph_opts]
    runs += [(b, "sparse", graph_opts[0], 2 * model.cfg.index_topk) for b in batches]
    for b, mode, graphs, c in runs:
        eng = Engine(model, mode=mode, max_batch=b, max_len=c + 64, cuda_graphs=graphs)
        prompts = torch.randint(16, model.cfg.vocab_size, (b, c)).tolist()
        for p in prompts:
            eng.submit(p, SamplingParams(max_new_tokens=10_000))
        eng.step()                       # prefill every row, first token
        eng.step()                       # one decode (captures the graph)
        t = _time(eng.step, reps=20)
        key = f"{mode}_b{b}_" + ("graphs" if graphs else "eager") + (f"_ctx{c}" if c != ctx else "")
        out[key] = {"step_ms": t * 1e3, "per_layer_us": t * 1e6 / model.cfg.n_layers, "context": c,
                    "cuda_graphs": eng.stats["cuda_graphs"]}
        print(f"  decode {key}: {t * 1e3:.2f} ms/step, {t * 1e6 / model.cfg.n_layers:.0f} us/layer", flush=True)
        del eng
    return out


def sparse_decode_kernel(device, t_len: int, batches, h=128, d_v=512, d_pe=64, top_k=2048) -> dict:
    out = {}
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    for b in batches:
        q = torch.randn(b, 1, h, d_v + d_pe, device=device, dtype=dt)
        kv = torch.randn(b, t_len, d_v + d_pe, device=device, dtype=dt)
        # the engine's top-k come ascending (kernels.topk_indices); the sweep draws them the same way
        idx = torch.stack([torch.randperm(t_len, device=device)[:top_k].sort().values for _ in range(b)])[:, None].int()
        fn = lambda: sparse_mla_decode(q, kv, idx, (d_v + d_pe) ** -0.5, d_v)   # noqa: E731
        gathered = b * top_k * (d_v + d_pe) * kv.element_size()
        row = {"eager_us": _time(fn) * 1e6}
        if device.type == "cuda":   # the sweep's method: back-to-back graph replays between CUDA events
            row["graph_us"] = graph_us(fn, reps=50)
        best = min(v for k, v in row.items() if k.endswith("_us"))
        row.update(gathered_bytes=gathered, tb_per_s=gathered / (best * 1e-6) / 1e12)
        out[f"b{b}"] = row
        print(f"  sparse decode T={t_len} B={b}: eager {row['eager_us']:.1f} us, graph {row.get('graph_us', 0):.1f} us, "
              f"{row['tb_per_s']:.2f} TB/s", flush=True)
    return out


def table(res: dict) -> str:
    r, lines = res["rollout"], []
    lines += [f"# Rollout engine, {res['device']}", "", f"{res['date']}; torch {res['torch']}; {res['preset']} preset "
              f"(random weights, bf16), {r['batch']} prompts x {r['prompt_len']} tokens, {r['new_tokens']} new tokens.",
              "", "| rollout | new tokens/s | vs transformers |", "|---|---|---|"]
    if "transformers" in r:
        lines.append(f"| transformers `generate` (DeepseekV32ForCausalLM) | {r['transformers']['tokens_per_s']:,.0f} | 1.00x |")
    for k, v in r.items():
        if k.startswith("engine_"):
            lines.append(f"| {k} | {v['tokens_per_s']:,.0f} | {v.get('vs_transformers', float('nan')):.2f}x |")
    lines += ["", "| decode step | ms / step | us / layer | CUDA graphs |", "|---|---|---|---|"]
    for k, v in res["decode_step"].items():
        lines.append(f"| {k} | {v['step_ms']:.3f} | {v['per_layer_us']:.1f} | {v['cuda_graphs']} |")
    lines += ["", f"Sparse decode kernel, V3.2 shape (h 128, d_qk 576, d_v 512, top-k 2048), cache {res['kernel_t']} "
              "tokens (bar: <= 50 us at batch 1, >= 2 TB/s gathered at batch 64):", "",
              "| batch | eager us | graph us | gathered TB/s |", "|---|---|---|---|"]
    for k, v in res["sparse_decode"].items():
        lines.append(f"| {k[1:]} | {v['eager_us']:.1f} | {v.get('graph_us', float('nan')):.1f} | {v['tb_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-eager", action="store_true",
                    help="on a GPU, only the CUDA-graph engine (skip the eager rollouts and decode steps)")
    ap.add_argument("--profile", action="store_true",
                    help="profile eager decode steps and the decode kernel instead (OUT_profile.json/.md)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = preset("tiny" if args.tiny else "small").model
    batch, plen, new, kt = (4, 32, 16, 4096) if args.tiny else (64, 1024, 512, 65536)
    torch.manual_seed(0)
    if args.profile:
        return profile_main(args, cfg, device, batch, plen + new // 2, kt)
    with tempfile.TemporaryDirectory() as d:
        m = Transformer(cfg)
        export_hf(m.to(torch.bfloat16) if device.type == "cuda" else m, d)
        model = import_hf(d, device=device)
        print("rollout:", flush=True)
        ro = rollout(Path(d), model, batch, plen, new, device, ("sparse", "dense"), not args.no_hf, batch,
                     eager=not args.no_eager)
    print("decode step:", flush=True)
    ds = decode_step(model, plen + new // 2, (1, batch), device, eager=not args.no_eager)
    print("sparse decode kernel:", flush=True)
    sd = sparse_decode_kernel(device, kt, (1, batch) if not args.tiny else (1, 2),
                              **({} if not args.tiny else dict(h=4, d_v=32, d_pe=16, top_k=64)))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "preset": "tiny" if args.tiny else "small", "rollout": ro, "decode_step": ds,
           "sparse_decode": sd, "kernel_t": kt}
    md = table(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def profile_main(args, cfg, device, batch: int, ctx: int, kt: int) -> int:
    from dsaforge.model import bench_profile

    model = Transformer(cfg).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    print("profile of eager decode steps:", flush=True)
    steps = bench_profile.profile_decode(model, ctx, (1, batch), device)
    print("sparse decode kernel by timing method:", flush=True)
    kern = bench_profile.decode_kernel_methods(device, kt, (1, batch) if not args.tiny else (1, 2),
                                               **({} if not args.tiny else dict(h=4, d_v=32, d_pe=16, top_k=64)))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "preset": "tiny" if args.tiny else "small", "n_layers": cfg.n_layers,
           "ctx": ctx, "steps": 5, "kernel_t": kt, "steps_profile": steps, "decode_kernel": kern}
    md = bench_profile.profile_table(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        stem = out.parent / (out.name + "_profile")
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
