"""One training stage under several parallel layouts, against the same stage in one process.

Run (2 GPUs):  python -m dsaforge.model.train.scaling --preset small --stage sparse --layouts tp2,ep2 --steps 50 \
                   --out docs/benchmarks/scaling_small_h200x2
8 GPUs:        ... --layouts dp8,tp2.dp4,ep8,tp2.ep4.dp4,pp2.dp4 (a weak-scaling table: --weak)
CPU (gloo):    python -m dsaforge.model.train.scaling --preset tiny --stage sparse --layouts tp2,ep2 --steps 3 \
                   --set train.device=cpu --set train.dtype=float32 --out /tmp/scaling

Every layout starts from the same checkpoint (`--init`, an earlier stage's output; without it the earlier stages
run briefly first, in one process) on the same data and the same global batch, so the per-step losses must agree
with the one-process run up to the numerics of the reduction order (fp32: ~1e-6; bf16: a few 1e-3 relative). With
--weak the global batch grows with the data-parallel size instead. Multi-process layouts go through the stage's own
launcher (torchrun, megatron-core's process groups; NVLink multicast off unless `parallel.nvls`).

Layouts: `tp2`, `ep2`, `pp2`, `dp2` or combinations joined by dots (`tp2.ep2.dp2`); the world size is
tp x pp x dp, where dp defaults to ep (experts are split within the data-parallel ranks). `1` is the reference.
Writes OUT.json (every step of every layout) and OUT.md (the table): the largest per-step loss difference against
the reference, median tokens/s and MFU after the first step, and scaling efficiency = tokens/s / (world x tokens/s
of one process).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from dsaforge.config import Config, ConfigError, load_config
from dsaforge.stages import StageContext
from dsaforge.tracking import NullTracker

_PART = re.compile(r"^(tp|pp|ep|dp)([1-9][0-9]*)$")
LOSS_KEY = {"pretrain": "train/lm_loss", "warmup": "train/indexer_kl", "sparse": "train/lm_loss"}


def parse_layout(text: str) -> dict[str, int]:
    """'tp2.ep2' -> {'tp': 2, 'pp': 1, 'ep': 2, 'dp': 2, 'world': 4}; '1' -> one process."""
    sizes = {"tp": 1, "pp": 1, "ep": 1, "dp": 0}
    if text != "1":
        for part in text.split("."):
            m = _PART.match(part)
            if not m:
                raise ConfigError(f"layout {text!r}: {part!r} is not tpN, ppN, epN or dpN (join parts with '.')")
            sizes[m.group(1)] = int(m.group(2))
    dp = sizes["dp"] or sizes["ep"]
    if dp % sizes["ep"]:
        raise ConfigError(f"layout {text!r}: ep={sizes['ep']} must divide the data-parallel size {dp}")
    return {**sizes, "dp": dp, "world": sizes["tp"] * sizes["pp"] * dp}


def layout_config(base: Config, stage: str, layout: dict[str, int], steps: int, weak: bool) -> Config:
    cfg = base.model_copy(deep=True)
    p = cfg.parallel
    p.tp, p.pp, p.ep, p.nproc_per_node, p.nnodes = layout["tp"], layout["pp"], layout["ep"], layout["world"], 1
    s = getattr(cfg.train, stage)
    s.steps, s.eval_every, s.ckpt_every, s.keep_last = steps, steps, steps, 1
    if weak:
        s.batch_size *= layout["dp"]
    if s.batch_size % (layout["dp"] * s.micro_batch_size):
        raise ConfigError(f"train.{stage}.batch_size={s.batch_size} is not a multiple of dp x micro_batch_size "
                          f"= {layout['dp']} x {s.micro_batch_size}")
    return Config.model_validate(cfg.model_dump())       # the cross-field checks of a fresh config


def _starting_point(cfg: Config, stage: str, out: Path, data: Path | None, init: Path | None,
                    init_steps: int) -> dict[str, Path]:
    """prepare-data output and the earlier stage's output the measured stage starts from."""
    from dsaforge.model.train import stages
    if data is None:
        from dsaforge.data.prepare import prepare
        data = out / "data"
        if not (data / "manifest.json").exists():
            prepare(cfg, data)
    inputs = {"prepare-data": data}
    earlier = stages.ORDER[:stages.ORDER.index(stage)]
    if init is not None:
        if not earlier:
            inputs["hf-checkpoint"] = init / "hf" if (init / "hf").is_dir() else init
        else:
            inputs[earlier[-1]] = init
        return inputs
    for name in earlier:                                   # one process, a few steps each
        pre = cfg.model_copy(deep=True)
        getattr(pre.train, name).steps = init_steps
        getattr(pre.train, name).eval_every = getattr(pre.train, name).ckpt_every = init_steps
        if not (out / name / "hf" / "config.json").exists():
            getattr(stages, name)(StageContext(pre, out / name, dict(inputs), NullTracker()))
        inputs = {"prepare-data": data, name: out / name}
    return inputs


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", 0) >= 1 and "perf/tokens_per_s" in r]


def summarize(name: str, layout: dict, rows: list[dict], ref: list[dict] | None, key: str) -> dict:
    tps = [r["perf/tokens_per_s"] for r in rows[1:]] or [r["perf/tokens_per_s"] for r in rows]
    mfu = [r["perf/mfu"] for r in rows[1:] if r.get("perf/mfu") is not None]
    out = {"layout": name, **layout, "steps": len(rows), "tokens_per_s": statistics.median(tps),
           "mfu": statistics.median(mfu) if mfu else None, "final_loss": rows[-1][key]}
    if ref is not None:
        pairs = list(zip(ref, rows))
        out["max_abs_loss_diff"] = max(abs(a[key] - b[key]) for a, b in pairs)
        out["max_rel_loss_diff"] = max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in pairs)
    return out


def render(result: dict) -> str:
    lines = [f"# Scaling: {result['stage']} stage, {result['preset']} preset on {result['device']}", "",
             f"{result['steps']} steps per layout from the same checkpoint, global batch "
             f"{'growing with dp (weak scaling)' if result['weak'] else 'fixed'}; loss = `{result['loss_key']}`; "
             f"dtype {result['dtype']}. Scaling efficiency = tokens/s / (world x one-process tokens/s).", "",
             "| layout | world | tp | pp | ep | dp | tokens/s | MFU | efficiency | max abs loss diff | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["layouts"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        eff = f"{r['efficiency']:.2f}" if r.get("efficiency") is not None else "-"
        diff = (f"{r['max_abs_loss_diff']:.2e} | {r['max_rel_loss_diff']:.2e}" if "max_abs_loss_diff" in r
                else "reference | -")
        lines.append(f"| {r['layout']} | {r['world']} | {r['tp']} | {r['pp']} | {r['ep']} | {r['dp']} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {eff} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stage", choices=["pretrain", "warmup", "sparse"], default="sparse")
    ap.add_argument("--layouts", default="tp2,ep2", help="comma list; the one-process reference '1' is always run")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--weak", action="store_true", help="grow the global batch with the data-parallel size")
    ap.add_argument("--data", type=Path, help="an existing prepare-data output")
    ap.add_argument("--init", type=Path, help="an earlier stage's output to start from (else a short chain runs)")
    ap.add_argument("--init-steps", type=int, default=20, help="steps of each earlier stage when --init is not given")
    ap.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="OUT.json / OUT.md; runs go to OUT/")
    args = ap.parse_args(argv)
    layouts = ["1"] + [x for x in args.layouts.split(",") if x and x != "1"]
    parsed = {name: parse_layout(name) for name in layouts}
    base = load_config(args.preset, overrides=args.set)
    runs = args.out
    runs.mkdir(parents=True, exist_ok=True)
    inputs = _starting_point(base, args.stage, runs, args.data, args.init, args.init_steps)
    from dsaforge.model.train import stages
    key = LOSS_KEY[args.stage]
    result = {"preset": args.preset, "stage": args.stage, "steps": args.steps, "weak": args.weak, "loss_key": key,
              "dtype": base.train.dtype, "device": _device_name(base), "layouts": [], "runs": {}}
    ref = None
    for name in layouts:
        cfg = layout_config(base, args.stage, parsed[name], args.steps, args.weak)
        out_dir = runs / f"{args.stage}-{name}"
        t0 = time.time()
        getattr(stages, args.stage)(StageContext(cfg, out_dir, dict(inputs), NullTracker()))
        rows = _steps(out_dir)
        row = summarize(name, parsed[name], rows, None if args.weak else ref, key)
        row["seconds"] = round(time.time() - t0, 1)
        if ref is None:
            ref, ref_tps = rows, row["tokens_per_s"]
        row["efficiency"] = row["tokens_per_s"] / (parsed[name]["world"] * ref_tps)
        result["layouts"].append(row)
        result["runs"][name] = [{k: r[k] for k in (key, "perf/tokens_per_s", "step") if k in r} for r in rows]
        print(json.dumps(row), flush=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")   # after every layout
        args.out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


def _device_name(cfg: Config) -> str:
    import torch
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU (gloo)"


if __name__ == "__main__":
    raise SystemExit(main())
