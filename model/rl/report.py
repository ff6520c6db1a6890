"""A grpo run's curves and held-out results as Markdown + JSON (for docs/benchmarks/).

    python -m dsaforge.model.rl.report runs/small/grpo --out docs/benchmarks/rl_small_h200

Reads the stage's metrics.jsonl and metrics.json; writes OUT.md (a table per step of reward, KL, importance ratio,
OPSM fraction, the engine-trainer log-prob gap and, with rl.diagnostics, the same-run stabiliser comparison; held-out
pass rate per agent class before and after) and OUT.json (the same numbers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CURVES = [("reward", "rl/reward_mean"), ("pass", "rl/pass_rate"), ("KL", "rl/kl"), ("entropy", "rl/entropy"),
          ("ratio min", "rl/ratio_min"), ("ratio mean", "rl/ratio_mean"), ("ratio max", "rl/ratio_max"),
          ("OPSM frac", "rl/opsm_fraction"), ("gap", "rl/engine_trainer_logp_gap"), ("tokens", "rl/response_tokens"),
          ("tools/ep", "rl/tool_calls_per_episode"), ("step s", None)]
DIAG = [("gap, Keep Routing on", "rl/diag/logp_gap/on"), ("gap, Keep Routing off", "rl/diag/logp_gap/routing_off"),
        ("ratio, Keep Sampling Mask on", "rl/diag/ratio_mean/on"),
        ("ratio, Keep Sampling Mask off", "rl/diag/ratio_mean/mask_off")]


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"


def report(run: Path) -> tuple[str, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "metrics.json").read_text())
    steps = [r for r in rows if "rl/reward_mean" in r]
    for r in steps:
        r["step s"] = sum(v for k, v in r.items() if k.startswith("rl/time/"))
    lines = [f"# GRPO run: {run}", "", "## Held-out pass rate", "", "| | before | after |", "|---|---|---|"]
    start, end = summary["start"], summary["end"]
    for key in sorted(k for k in start if k.startswith("heldout/pass_rate")):
        lines.append(f"| {key.removeprefix('heldout/')} | {_fmt(start[key])} | {_fmt(end.get(key))} |")
    lines += ["", "## Curves", "", "| step | " + " | ".join(n for n, _ in CURVES) + " |",
              "|---" * (len(CURVES) + 1) + "|"]
    for r in steps:
        lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(k or n)) for n, k in CURVES) + " |")
    diag = [r for r in steps if "rl/diag/logp_gap/on" in r]
    out = {"summary": summary, "curves": steps}
    if diag:
        means = {name: sum(r[k] for r in diag) / len(diag) for name, k in DIAG}
        out["stabilisers"] = means
        lines += ["", "## Stabilisers on the same run (rl.diagnostics: same weights and episodes each step)", "",
                  "| step | " + " | ".join(n for n, _ in DIAG) + " |", "|---" * (len(DIAG) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(_fmt(r[k]) for _, k in DIAG) + " |" for r in diag]
        lines += [f"| mean | " + " | ".join(_fmt(means[n]) for n, _ in DIAG) + " |"]
    return "\n".join(lines) + "\n", out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a grpo stage's output directory")
    ap.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = ap.parse_args()
    md, data = report(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
    print(md)


if __name__ == "__main__":
    main()
