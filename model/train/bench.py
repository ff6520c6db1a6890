"""Training-step throughput and MFU on one device: dense (pretrain) vs sparse mode at several sequence lengths,
every row at the same number of tokens per optimizer step.

Run (1 GPU):  python -m dsaforge.model.train.bench --rows h200:4096,16384,65536:dense,sparse small:4096:dense \
                  h200:4096:dense:train.activation_checkpointing=false \
                  --tokens-per-step 65536 --profile 65536:sparse --out docs/benchmarks/train_h200
              (--preset NAME --seq-lens ... --modes ... is the one-preset form of --rows; a spec's KEY=VALUE
              fields override the config for its rows only)
CPU (smoke):  python -m dsaforge.model.train.bench --preset tiny --seq-lens 64 128 --tokens-per-step 256 --steps 2

Each row trains on random tokens (throughput does not depend on the text) with the trainer's step: micro-batches
of `micro_batch` sequences of seq_len, forward in bf16 autocast (fp32 on CPU), loss over the output head in
chunks, backward accumulated over the micro-batches, AdamW, router-bias update, the preset's
train.activation_checkpointing and replay_topk. A row takes max(tokens_per_step, seq_len) tokens per step, so the
dense and sparse rows of one length do the same work. The micro-batch is the most sequences per forward that the
memory plan (`dsaforge.model.train.plan`) fits into the device (`--micro-batch` fixes it).

MFU counts model FLOPs (`accounting.flops_per_token`); "MFU incl. recompute" adds what the step runs again in
backward (`accounting.recompute_flops_per_token`), i.e. the hardware's work. `--profile SEQ[:MODE]` profiles one
more step of the matching rows: device time by kernel group, among them the indexer side (scores, top-k, indexer
KL and its target, forward and backward: `INDEXER_KERNELS`). Writes OUT.json (every measurement) and OUT.md (the
tables) after every row, so a run stopped by a time limit keeps what it measured; `--time-budget` skips rows
predicted not to finish in time.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from dsaforge.config import Config, load_config
from dsaforge.model import Transformer, set_trainable, update_router_bias
from dsaforge.model.accounting import count_params, flops_per_token, recompute_flops_per_token
from dsaforge.model.train.metrics import peak_flops
from dsaforge.model.train.plan import Layout, rank_plan
from dsaforge.model.train.trainer import forward_lm

# The kernels of the indexer side (dsaforge.kernels): scores, top-k (sample/filter/select/fallback, fp8 quantize
# and re-rank), the sparse KL target (its own kernel, or the rescale-and-sum of the probabilities the sparse forward
# stored; the storing itself runs inside the sparse attention forward), the indexer KL (forward and backward) and the
# warm-up's attention LSE.
INDEXER_KERNELS = ("_indexer_scores_kernel", "_indexer_scores_kernel_v2", "_act_quant_kernel", "_take_slots_kernel",
                   "_indexer_rerank_kernel", "_sample_kernel", "_filter_kernel", "_select_kernel", "_fallback_kernel",
                   "_sparse_target_kernel", "_selected_mass_kernel", "_indexer_kl_kernel",
                   "_attention_lse_kernel")
SPARSE_ATTENTION_KERNELS = ("_sparse_mla_", "_segment_sum_kernel")


def kernel_group(name: str) -> str:
    """Which part of the step a device kernel belongs to, by its name."""
    low = name.lower()
    if name in INDEXER_KERNELS:
        return "indexer"
    if name.startswith(SPARSE_ATTENTION_KERNELS):
        return "sparse attention"
    if any(s in low for s in ("sdpa", "flash", "fmha", "attention")):
        return "dense attention"
    if any(s in low for s in ("multi_tensor_apply", "adam")):
        return "optimizer"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "grouped")):
        return "matmul"
    return "other"


def kernel_shares(kernels: Iterable[tuple[str, float]]) -> dict:
    """(name, device seconds) of every kernel of a step -> busy seconds, seconds and share by group, top kernels."""
    by_name: dict[str, list] = {}
    for name, sec in kernels:
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += sec
        entry[1] += 1
    busy = sum(v[0] for v in by_name.values())
    groups: dict[str, float] = {}
    for name, (sec, _) in by_name.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + sec
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {"device_busy_s": busy,
            "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "shares": {g: (s / busy if busy else None) for g, s in groups.items()},
            "top_kernels": [{"name": n, "s": s, "calls": c, "group": kernel_group(n)} for n, (s, c) in top]}


def _profile_step(step, device, path: Optional[Path]) -> dict:
    """One more step under torch.profiler: device time by kernel and group (the raw table goes to `path`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
    wall = time.perf_counter() - t0
    # Device events only: CPU ops and user ranges also carry device time, which would count kernels twice. On a
    # CPU the ops' self times stand in (the smoke run exercises the same report).
    if device.type == "cuda":
        kernels = [(e.name, e.self_device_time_total / 1e6) for e in prof.events()
                   if e.device_type == DeviceType.CUDA]
        if not kernels:   # no device events (a profiler that only attaches kernels to ops): by launching op
            kernels = [(e.name, e.self_device_time_total / 1e6) for e in prof.events()
                       if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    else:
        kernels = [(e.name, e.self_cpu_time_total / 1e6) for e in prof.events() if e.device_type == DeviceType.CPU]
    out = {"profiled_wall_s": wall, **kernel_shares(kernels)}
    if path is not None:
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"wall {wall:.3f} s (profiled), kernels busy {out['device_busy_s']:.3f} s\n\n{table}\n")
        out["profile"] = path.name
    return out


def device_memory_gib(device) -> Optional[float]:
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None


def plan_gib(cfg: Config, mode: str, seq_len: int, micro_batch: int, sequences: int) -> float:
    """The memory plan's busiest figure for this row on one device."""
    stage = {"dense": "pretrain"}.get(mode, mode)
    c = cfg.model_copy(deep=True)
    s = getattr(c.train, stage)
    s.micro_batch_size, s.batch_size = micro_batch, sequences
    return rank_plan(c, Layout(1, 1, 1, 1), stage, seq_len, float("inf")).total_gib


def choose_micro_batch(cfg: Config, mode: str, seq_len: int, sequences: int, mem_gib: Optional[float]) -> int:
    """The most sequences per forward, dividing `sequences`, whose planned memory fits 90% of mem_gib (the plan's
    headroom); all of them when the memory is unknown (CPU)."""
    divisors = [d for d in range(1, sequences + 1) if sequences % d == 0]
    if mem_gib is None:
        return sequences
    fitting = [d for d in divisors if plan_gib(cfg, mode, seq_len, d, sequences) <= 0.9 * mem_gib]
    return max(fitting, default=1)


def bench_one(model: Transformer, cfg: Config, mode: str, seq_len: int, tokens_per_step: int, micro_batch: int,
              steps: int, warmup: int, device, profile_to: Optional[Path] = None, profile: bool = False,
              variant: str = "") -> dict:
    sequences = max(1, tokens_per_step // seq_len)
    if micro_batch < 1 or sequences % micro_batch:
        raise ValueError(f"micro-batch {micro_batch} does not divide the {sequences} sequences of a step")
    n_micro = sequences // micro_batch
    params = set_trainable(model, mode)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    tokens = torch.randint(0, model.cfg.vocab_size, (n_micro, micro_batch, seq_len + 1), device=device)
    autocast = device.type == "cuda" and cfg.train.dtype == "bfloat16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for i in range(n_micro):                      # no host sync between micro-batches, as in the trainer
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                out, loss = forward_lm(model, tokens[i, :, :-1], tokens[i, :, 1:], mode)
            for extra in (out.indexer_loss, out.aux_loss):
                if extra is not None:
                    loss = loss + extra
            (loss / n_micro).backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_bias(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return total / n_micro

    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    prof = _profile_step(step, device, profile_to) if profile else {}
    del opt
    model.zero_grad(set_to_none=True)
    step_s = sorted(times)[len(times) // 2]
    n_tokens = sequences * seq_len
    tps = n_tokens / step_s
    flops = flops_per_token(model.cfg, seq_len, mode)
    recompute = recompute_flops_per_token(model.cfg, seq_len, mode, model.activation_checkpointing,
                                          model.replay_topk)
    peak = peak_flops(device, cfg.train.dtype)
    row = {"preset": cfg.preset, "variant": variant, "mode": mode, "seq_len": seq_len, "tokens_per_step": n_tokens,
           "sequences": sequences, "micro_batch": micro_batch, "micro_steps": n_micro, "step_s": step_s,
           "step_times_s": times, "tokens_per_s": tps, "tflops": flops * tps / 1e12,
           "tflops_with_recompute": (flops + recompute) * tps / 1e12,
           "mfu": flops * tps / peak if peak else None,
           "mfu_with_recompute": (flops + recompute) * tps / peak if peak else None,
           "flops_per_token": flops, "recompute_flops_per_token": recompute, "loss": float(loss),
           "plan_gib": plan_gib(cfg, mode, seq_len, micro_batch, sequences), **prof}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ------------------------------------------------------------------ rows, budget, report

def parse_rows(specs: list[str]) -> list[tuple[str, int, str, tuple[str, ...]]]:
    """'PRESET:SEQ,SEQ:MODE,MODE[:KEY=VALUE...]' specs -> (preset, seq_len, mode, overrides) in order (lengths
    outer, modes inner). The overrides apply to that spec's rows only (a variant, e.g.
    train.activation_checkpointing=false), after the run's --set."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) < 3 or not all(parts) or any("=" not in p for p in parts[3:]):
            raise ValueError(f"row spec {spec!r} must be PRESET:SEQ[,SEQ...]:MODE[,MODE...][:KEY=VALUE...]")
        try:
            seqs = [int(s) for s in parts[1].split(",")]
        except ValueError:
            raise ValueError(f"row spec {spec!r}: sequence lengths must be integers") from None
        for mode in parts[2].split(","):
            if mode not in ("dense", "warmup", "sparse"):
                raise ValueError(f"row spec {spec!r}: mode must be dense, warmup or sparse, got {mode!r}")
        out += [(parts[0], seq, mode, tuple(parts[3:])) for seq in seqs for mode in parts[2].split(",")]
    return out


def wants_profile(profile: Optional[list[str]], seq_len: int, mode: str) -> bool:
    """--profile absent: no; given without values: every row; else rows matching one SEQ or SEQ:MODE."""
    if profile is None:
        return False
    return not profile or any(p in (str(seq_len), f"{seq_len}:{mode}") for p in profile)


def predicted_s(rows: list[dict], cfg: Config, mode: str, seq_len: int, tokens_per_step: int, n_steps: int,
                variant: str = "") -> float:
    """Seconds a row should take, scaled by FLOPs from the latest measured row of the same preset, variant and
    mode (0 when there is none yet: the row runs)."""
    done = [r for r in rows if r.get("preset") == cfg.preset and r.get("variant", "") == variant
            and r.get("mode") == mode and "step_s" in r]
    if not done:
        return 0.0
    ref = done[-1]
    work = lambda s, n: n * (flops_per_token(cfg.model, s, mode) + recompute_flops_per_token(  # noqa: E731
        cfg.model, s, mode, cfg.train.activation_checkpointing, cfg.train.replay_topk))
    return n_steps * ref["step_s"] * work(seq_len, max(tokens_per_step, seq_len)) / work(ref["seq_len"],
                                                                                         ref["tokens_per_step"])


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(result))


def report(result: dict) -> str:
    rows = result["rows"]
    lines = [f"# Training throughput on {result['device']}", "",
             f"torch {result['torch']}, {result['tokens_per_step']:,} tokens per optimizer step (or one sequence when "
             f"longer), median of {result['steps']} steps after {result['warmup']} warm-up, random tokens. "
             "MFU counts model FLOPs; \"incl. recompute\" adds the forward work the step runs again in backward "
             "(activation checkpointing, the chunked loss's head). sparse/dense: the sparse step's time over the "
             "dense step's at the same length and tokens."
             + (f" Overrides: {', '.join(result['overrides'])}." if result.get("overrides") else ""), ""]
    for name, info in result["presets"].items():
        lines.append(f"- `{name}`: {info['params_total'] / 1e9:.2f}B parameters ({info['params_active'] / 1e9:.2f}B "
                     f"active), {info['n_heads']} heads, top-k {info['index_topk']}, activation checkpointing "
                     f"{'on' if info['activation_checkpointing'] else 'off'}, replay_topk "
                     f"{'on' if info['replay_topk'] else 'off'}")
    lines += ["", "| preset | seq len | mode | seqs x micro-batch | tokens/s | TFLOP/s | MFU | MFU incl. recompute | "
              "step s | sparse/dense | peak GiB | plan GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["preset"], r.get("variant", ""), r["seq_len"])   # noqa: E731
    dense = {key(r): r["step_s"] for r in rows if r.get("mode") == "dense" and "step_s" in r}
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"   # noqa: E731
    for r in rows:
        label = r["preset"] + (f" ({r['variant']})" if r.get("variant") else "")
        head = f"| {label} | {r['seq_len']} | {r['mode']} |"
        if "step_s" not in r:
            lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | | | | | | |")
            continue
        dense_s = dense.get(key(r)) if r["mode"] != "dense" else None
        rel = f"{r['step_s'] / dense_s:.2f}" if dense_s else "-"
        lines.append(f"{head} {r['sequences']} x {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
                     f"{pct(r['mfu'])} | {pct(r['mfu_with_recompute'])} | {r['step_s']:.3f} | {rel} | "
                     f"{r.get('peak_memory_gib', float('nan')):.1f} | {r['plan_gib']:.1f} |")
    for r in rows:
        if "groups_s" not in r:
            continue
        busy = r["device_busy_s"]
        label = r["preset"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines += ["", f"## Where the step goes: {label}, {r['mode']}, {r['seq_len']} tokens per sequence", "",
                  f"Profiled step: wall {r['profiled_wall_s']:.3f} s, kernels busy {busy:.3f} s"
                  + (f" ({busy / r['profiled_wall_s']:.0%} of the wall time)." if busy else "."), "",
                  "| part | device s | share of kernel time |", "|---|---|---|"]
        lines += [f"| {g} | {s:.3f} | {pct(r['shares'][g])} |" for g, s in r["groups_s"].items()]
        lines += ["", "| kernel | part | device ms | calls |", "|---|---|---|---|"]
        lines += [f"| `{k['name'][:80]}` | {k['group']} | {1e3 * k['s']:.2f} | {k['calls']} |"
                  for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.bench")
    ap.add_argument("--rows", nargs="+", metavar="PRESET:SEQS:MODES[:KEY=VALUE...]",
                    help="e.g. h200:4096,16384,65536:dense,sparse small:4096:dense "
                         "h200:4096:dense:train.activation_checkpointing=false (replaces the three below)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    ap.add_argument("--tokens-per-step", type=int, default=65536,
                    help="tokens per optimizer step of every row (a longer sequence is one sequence per step)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward; default: the most the memory plan fits in the device")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: skip a row predicted (from the last measured row) to end past this")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every preset (e.g. train.replay_topk=false); repeatable")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", nargs="*", metavar="SEQ[:MODE]",
                    help="profile one more step of the matching rows (all rows without values)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    specs = args.rows or [f"{args.preset}:{','.join(map(str, args.seq_lens))}:{','.join(args.modes)}"]
    plan_rows = parse_rows(specs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mem = device_memory_gib(device)
    rows: list[dict] = []
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "device_memory_gib": mem, "overrides": args.overrides,
              "tokens_per_step": args.tokens_per_step,
              "steps": args.steps, "warmup": args.warmup, "presets": {}, "rows": rows}
    model, cfg, built = None, None, None
    for name, seq_len, mode, extra in plan_rows:
        variant = ",".join(extra)
        if built != (name, extra):
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cfg = load_config(name, overrides=[*args.overrides, *extra])
            cfg.model.max_seq_len = max([cfg.model.max_seq_len] + [s for n, s, _, _ in plan_rows if n == name])
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(cfg.model)
            model.fused_dsa = device.type == "cuda"        # as the trainer does on one GPU
            model.activation_checkpointing = cfg.train.activation_checkpointing
            model.replay_topk = cfg.train.replay_topk
            model.validate_token_ids = False               # random ids in range; the check is a GPU read-back
            built = (name, extra)
            total, active = count_params(cfg.model)
            result["presets"][name + (f" ({variant})" if variant else "")] = {
                "params_total": total, "params_active": active, "dtype": cfg.train.dtype, "n_heads": cfg.model.n_heads,
                "index_topk": cfg.model.index_topk, "activation_checkpointing": cfg.train.activation_checkpointing,
                "replay_topk": cfg.train.replay_topk}
        base = {"preset": name, "variant": variant, "mode": mode, "seq_len": seq_len}
        profile = wants_profile(args.profile, seq_len, mode)
        expect = predicted_s(rows, cfg, mode, seq_len, args.tokens_per_step, args.warmup + args.steps + profile,
                             variant)
        left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - t_start)
        if left is not None and (left <= 0 or expect > left):
            row = {**base, "skipped": f"skipped: predicted {expect:.0f} s, {max(left, 0):.0f} s of the budget left"}
        else:
            try:
                sequences = max(1, args.tokens_per_step // seq_len)
                mb = args.micro_batch or choose_micro_batch(cfg, mode, seq_len, sequences, mem)
                tag = name + "".join(f"_{e.split('.')[-1].replace('=', '-')}" for e in extra)
                prof_path = (args.out.parent / f"{args.out.name}_{tag}_{mode}_{seq_len}.profile.txt"
                             if profile and args.out else None)
                row = bench_one(model, cfg, mode, seq_len, args.tokens_per_step, mb, args.steps, args.warmup,
                                device, prof_path, profile, variant)
            except torch.OutOfMemoryError as e:
                row = {**base, "error": f"out of memory: {str(e).splitlines()[0].split('. GPU')[0]}"}
            except (RuntimeError, ValueError) as e:   # one failing row must not hide the others' numbers
                row = {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            if "error" in row:
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels", "step_times_s")}), flush=True)
        if args.out:               # after every row: a run stopped by a time limit keeps what it measured
            write(args.out, result)
    print(report(result))
    return result


if __name__ == "__main__":
    main()
    raise SystemExit(0)
