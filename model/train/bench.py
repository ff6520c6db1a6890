"""Training-step throughput and MFU on one device: dense (pretrain) vs sparse mode at several sequence lengths.

Run (1 GPU):  python -m dsaforge.model.train.bench --preset small --seq-lens 4096 16384 65536 \
                  --out docs/benchmarks/train_small_h200
CPU (smoke):  python -m dsaforge.model.train.bench --preset tiny --seq-lens 128 --steps 2
One sequence per step on random tokens (throughput does not depend on the text); the step is the trainer's:
forward in bf16 autocast (fp32 on CPU), loss over the output head in chunks, backward, AdamW, with the preset's
train.activation_checkpointing. FLOPs come from `dsaforge.model.accounting`.
Writes OUT.json (every measurement) and OUT.md (the table).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dsaforge.config import load_config
from dsaforge.model import Transformer, set_trainable, update_router_bias
from dsaforge.model.accounting import count_params, flops_per_token
from dsaforge.model.train.metrics import peak_flops
from dsaforge.model.train.trainer import forward_lm


def _profile_step(step, device, path: Path) -> dict:
    """One more step under torch.profiler: the kernels that dominate it, written to `path` as a table."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
    wall = time.perf_counter() - t0
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=40, max_name_column_width=90)
    # Device time summed over kernels (launches overlap nothing on one stream): how busy the GPU was in the step.
    busy = sum(e.self_device_time_total for e in events) / 1e6 if device.type == "cuda" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"wall {wall:.3f} s (profiled), device busy {busy} s\n\n{table}\n")
    return {"profile": path.name, "profiled_wall_s": wall, "device_busy_s": busy}


def bench_one(model: Transformer, mode: str, seq_len: int, steps: int, warmup: int, device, dtype: str,
              profile_to: Path | None = None) -> dict:
    params = set_trainable(model, mode)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
    tokens = torch.randint(0, model.cfg.vocab_size, (1, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = device.type == "cuda" and dtype == "bfloat16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []

    def step() -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out, loss = forward_lm(model, inputs, targets, mode)
        if out.indexer_loss is not None:
            loss = loss + out.indexer_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_bias(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    prof = _profile_step(step, device, profile_to) if profile_to else {}
    del opt
    step_s = sorted(times)[len(times) // 2]
    tps = seq_len / step_s
    flops = flops_per_token(model.cfg, seq_len, mode)
    peak = peak_flops(device, dtype)
    row = {"mode": mode, "seq_len": seq_len, "step_s": step_s, "tokens_per_s": tps,
           "tflops": flops * tps / 1e12, "mfu": flops * tps / peak if peak else None,
           "flops_per_token": flops, "loss": loss.item(), **prof}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def write(out: Path, result: dict, cfg, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Training throughput: {args.preset} preset on {result['device']}", "",
             f"{result['params_total'] / 1e9:.2f}B parameters ({result['params_active'] / 1e9:.2f}B active), "
             f"{cfg.train.dtype}, one sequence per step, top-k {cfg.model.index_topk}, activation checkpointing "
             f"{'on' if cfg.train.activation_checkpointing else 'off'}, median of {args.steps} steps after "
             f"{args.warmup} warm-up.",
             "", "| seq len | mode | tokens/s | TFLOP/s | MFU | step s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['mode']} | {r['error'].split('. GPU')[0]} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['seq_len']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {mfu} | "
                     f"{r['step_s']:.3f} | {r.get('peak_memory_gib', float('nan')):.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.bench")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step per row; OUT_<mode>_<seq>.profile.txt lists its top kernels")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, max(args.seq_lens))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg.model)
    model.fused_dsa = device.type == "cuda"        # as the trainer does on one GPU
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.replay_topk = cfg.train.replay_topk
    total, active = count_params(cfg.model)
    rows = []
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "dtype": cfg.train.dtype,
              "params_total": total, "params_active": active, "index_topk": cfg.model.index_topk,
              "batch": "1 sequence per step", "steps_timed": args.steps,
              "activation_checkpointing": cfg.train.activation_checkpointing, "rows": rows}
    for seq_len in args.seq_lens:
        for mode in args.modes:
            try:
                prof = (args.out.parent / f"{args.out.name}_{mode}_{seq_len}.profile.txt"
                        if args.profile and args.out else None)
                row = bench_one(model, mode, seq_len, args.steps, args.warmup, device, cfg.train.dtype, prof)
            except torch.OutOfMemoryError as e:
                row = {"mode": mode, "seq_len": seq_len, "error": f"out of memory: {str(e).splitlines()[0]}"}
            except RuntimeError as e:      # one failing configuration must not hide the others' numbers
                row = {"mode": mode, "seq_len": seq_len, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            if "error" in row:
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:               # after every row: a run stopped by a time limit keeps what it measured
                write(args.out, result, cfg, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
