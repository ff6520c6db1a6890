"""Where a decode step's time goes: `python -m dsaforge.model.bench_generate --profile --out OUT` writes
OUT_profile.json and OUT_profile.md.

1. Eager decode steps of the engine (the small preset, batch 1 and 64, sparse and dense) under torch.profiler: the
   top kernels by GPU time (calls and microseconds per step, share of the step's GPU time), the kernel launches per
   layer per step, and the step's wall time next to its GPU busy time (wall >> busy: the step is host-bound, each
   launch costs more than the kernel it runs). On a GPU the same steps replayed from CUDA graphs follow (`_graphs`
   rows: wall - busy there is the host's own work per step, sampling bookkeeping and syncs, plus gaps between
   kernels). On CPU the profiler's leaf operators stand in for kernels.
2. The sparse decode kernel measured three ways, to explain a benchmark disagreement: one graph replay per host
   sync (what `bench_generate` did), back-to-back replays between CUDA events (the sweep's method,
   `kernels.bench_decode.graph_us`), and the kernel's own duration in the profiler; each with unsorted and with
   ascending indices (the engine's top-k are ascending, `kernels.topk_indices`).
"""
from __future__ import annotations

import itertools
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dsaforge.kernels.sparse_mla import sparse_mla_decode
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams
from dsaforge.model.transformer import Transformer

TOP = 15
# CPU leaf operators that only make views, allocate or return their input (a `to` with no child op): not kernels
_NO_KERNEL = {"aten::" + n for n in ("as_strided", "view", "empty", "empty_strided", "reshape", "_reshape_alias",
                                     "expand", "slice", "select", "t", "transpose", "unsqueeze", "squeeze",
                                     "permute", "alias", "detach", "resolve_conj", "resolve_neg", "lift_fresh",
                                     "unflatten", "split", "split_with_sizes", "narrow", "_unsafe_view",
                                     "result_type", "is_nonzero", "item", "_local_scalar_dense", "to",
                                     "contiguous", "resize_", "scalar_tensor", "real", "view_as_real",
                                     "view_as_complex", "movedim", "flatten", "chunk", "expand_as")}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_events(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU activity, or on CPU of every leaf operator (an op with no child op)."""
    out = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out.append((e.name, e.time_range.elapsed_us()))
        elif not cuda and e.device_type == DeviceType.CPU and not e.cpu_children \
                and e.name.startswith("aten::") and e.name not in _NO_KERNEL:
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def kernel_table(events: list[tuple[str, float]], steps: int, n_layers: int) -> dict:
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, us in events:
        agg[name][0] += 1
        agg[name][1] += us
    busy = sum(us for _, us in events)
    memops = sum(c for n, (c, _) in agg.items() if n.lower().startswith(("memcpy", "memset")))
    launches = sum(c for c, _ in agg.values())
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {"gpu_busy_us_per_step": busy / steps,
            "launches_per_step": launches / steps, "memcpy_memset_per_step": memops / steps,
            "launches_per_layer_per_step": launches / steps / n_layers,
            "distinct_kernels": len(agg),
            "top": [{"name": n, "calls_per_step": c / steps, "us_per_step": us / steps,
                     "share": us / busy if busy else 0.0} for n, (c, us) in top]}


def profile_decode(model: Transformer, ctx: int, batches, device, steps: int = 5) -> dict:
    """Decode steps of the engine under torch.profiler, per (mode, batch, eager or CUDA graphs)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for b, mode, graphs in itertools.product(batches, ("sparse", "dense"),
                                             (False, True) if device.type == "cuda" else (False,)):
        eng = Engine(model, mode=mode, max_batch=b, max_len=ctx + 64, cuda_graphs=graphs)
        for p in torch.randint(16, model.cfg.vocab_size, (b, ctx)).tolist():
            eng.submit(p, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10_000))
        for _ in range(3):                  # prefill + first token, then two warm-up decode steps
            eng.step()
        _sync()
        walls = []
        for _ in range(steps):              # wall time without the profiler's own overhead
            t = time.perf_counter()
            eng.step()
            _sync()
            walls.append(time.perf_counter() - t)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                eng.step()
            _sync()
        row = kernel_table(_device_events(prof, device.type == "cuda"), steps, model.cfg.n_layers)
        row["wall_us_per_step"] = sorted(walls)[len(walls) // 2] * 1e6
        row["gpu_busy_share"] = row["gpu_busy_us_per_step"] / row["wall_us_per_step"]
        key = f"{mode}_b{b}" + ("_graphs" if graphs else "")
        out[key] = row
        print(f"  profile {key}: wall {row['wall_us_per_step']:.0f} us/step, GPU busy "
              f"{row['gpu_busy_us_per_step']:.0f} us, {row['launches_per_layer_per_step']:.1f} launches/layer",
              flush=True)
        del eng
    return out


def decode_kernel_methods(device, t_len: int, batches, h=128, d_v=512, d_pe=64, top_k=2048, reps: int = 50) -> dict:
    """The sparse decode kernel's microseconds per call by each timing method and index order."""
    from dsaforge.kernels.bench_decode import graph_us

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    for b in batches:
        torch.manual_seed(0)
        q = torch.randn(b, 1, h, d_v + d_pe, device=device, dtype=dt)
        kv = torch.randn(b, t_len, d_v + d_pe, device=device, dtype=dt)
        perm = torch.stack([torch.randperm(t_len, device=device)[:top_k] for _ in range(b)])[:, None].int()
        for order, idx in (("unsorted", perm), ("ascending", perm.sort(-1).values)):
            fn = lambda idx=idx: sparse_mla_decode(q, kv, idx, (d_v + d_pe) ** -0.5, d_v)   # noqa: E731
            row = {}
            if device.type == "cuda":
                row["sync_per_replay_us"] = _sync_per_replay_us(fn, reps)
                row["back_to_back_us"] = graph_us(fn, reps)
            with profile(activities=[ProfilerActivity.CPU] +
                         ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
                for _ in range(reps):
                    fn()
                _sync()
            ev = _device_events(prof, device.type == "cuda")
            kern = defaultdict(float)
            for name, us in ev:
                kern[name] += us / reps
            row["kernel_us"] = sum(kern.values())
            row["kernels"] = {n: round(us, 2) for n, us in sorted(kern.items(), key=lambda kv: -kv[1])[:4]}
            row["gathered_bytes"] = b * top_k * (d_v + d_pe) * kv.element_size()
            out[f"b{b}_{order}"] = row
            print(f"  decode kernel B={b} {order}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()
                                                                    if k.endswith("_us")), flush=True)
        del q, kv
    return out


def _sync_per_replay_us(fn, reps: int) -> float:
    """The old bench_generate method: one graph replay, then a host sync, median over reps (adds the replay's
    launch latency and the sync's round trip to every call)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def profile_table(res: dict) -> str:
    lines = [f"# Decode-step profile, {res['device']}", "",
             f"{res['date']}; torch {res['torch']}; {res['preset']} preset ({res['n_layers']} layers), eager decode "
             f"(no CUDA graph), context {res['ctx']}, {res['steps']} profiled steps.", "",
             "| step | wall us | GPU busy us | busy share | launches / step | launches / layer | memcpy+memset / step |",
             "|---|---|---|---|---|---|---|"]
    for k, v in res["steps_profile"].items():
        lines.append(f"| {k} | {v['wall_us_per_step']:.0f} | {v['gpu_busy_us_per_step']:.0f} | "
                     f"{v['gpu_busy_share']:.2f} | {v['launches_per_step']:.0f} | "
                     f"{v['launches_per_layer_per_step']:.1f} | {v['memcpy_memset_per_step']:.0f} |")
    for k, v in res["steps_profile"].items():
        lines += ["", f"## {k}: top kernels by GPU time", "", "| kernel | calls / step | us / step | share |",
                  "|---|---|---|---|"]
        for r in v["top"]:
            name = r["name"].replace("|", "/")
            name = name if len(name) <= 110 else name[:107] + "..."
            lines.append(f"| `{name}` | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} | {r['share']:.1%} |")
    lines += ["", f"## Sparse decode kernel by timing method (cache {res['kernel_t']} tokens)", "",
              "| batch / index order | sync per replay us | back-to-back replays us | kernel time (profiler) us | "
              "TB/s (back-to-back) |", "|---|---|---|---|---|"]
    for k, v in res["decode_kernel"].items():
        b2b = v.get("back_to_back_us", float("nan"))
        lines.append(f"| {k} | {v.get('sync_per_replay_us', float('nan')):.1f} | {b2b:.1f} | {v['kernel_us']:.1f} | "
                     f"{v['gathered_bytes'] / (b2b * 1e-6) / 1e12:.2f} |")
    return "\n".join(lines) + "\n"
