"""Standalone synthesis run (the pipeline uses `dsaforge stage synthesize`, which calls dsaforge.synth.stage).

    python -m dsaforge.synth --preset tiny --out runs/synth                    # CPU, ~15 s on 2 cores
    python -m dsaforge.synth --out runs/synth --workers 2 --max-difficulty 5 \\
        --targets search=6000:300,general=2000:200,code=1000:100,code_interpreter=1000:100
    python -m dsaforge.synth --paper-scale --out runs/synth85k                 # >= 85,000 tasks, >= 1,800 envs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsaforge.config import presets
from dsaforge.progress import Progress
from dsaforge.synth.generate import synthesize

# The paper's Table 1 mix (85,267 prompts; 1,827 general-agent environments), rounded up.
PAPER_SCALE = {"search": (50_300, 1_000), "code": (24_700, 1_000), "code_interpreter": (5_950, 500),
               "general": (4_450, 1_850)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m dsaforge.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", type=Path, help="the prepare-data stage's output directory (documents.parquet)")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--max-difficulty", type=int)
    ap.add_argument("--pass-k", type=int)
    ap.add_argument("--targets", help="per class TASKS:ENVS, comma-separated, e.g. search=6000:300,code=1000:100")
    ap.add_argument("--paper-scale", action="store_true", help="the paper's mix and order of magnitude")
    ap.add_argument("--unsafe-subprocess", action="store_true", help="run untrusted code without bubblewrap")
    args = ap.parse_args(argv)
    cfg = getattr(presets, args.preset)().synth
    for name in ("workers", "max_difficulty", "pass_k"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.unsafe_subprocess:
        cfg.sandbox.backend = "unsafe-subprocess"
    targets = dict(PAPER_SCALE) if args.paper_scale else {}
    for item in filter(None, (args.targets or "").split(",")):
        cls, spec = item.split("=")
        tasks, envs = spec.split(":")
        targets[cls] = (int(tasks), int(envs))
    if targets:
        cfg.agent_classes = [c for c in cfg.agent_classes if c in targets]
    total = sum(t for t, _ in targets.values()) if targets else cfg.tasks_per_class * len(cfg.agent_classes)
    done: dict[str, int] = {}
    t0 = time.monotonic()
    with Progress("synthesize", total=total, unit="task", every_s=30) as bar:
        def progress(cls: str, kept: int, target: int) -> None:
            new = min(kept, target)
            bar.update(new - done.get(cls, 0), cls=cls)
            done[cls] = new

        summary = synthesize(cfg, args.out, data_dir=args.data, on_progress=progress, targets=targets or None)
    summary["wall_s_total"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
