"""prepare-data -> pretrain -> warmup -> sparse in one process: a quick end-to-end check on one device, no KFP.

Run (CPU):   python -m dsaforge.model.train.chain --preset tiny --out runs/chain
1 GPU:       python -m dsaforge.model.train.chain --preset small --out runs/chain --set train.pretrain.steps=50
Stages log to MLflow when --mlflow is given (else metrics.jsonl in each stage's directory only).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dsaforge.config import load_config
from dsaforge.stages import StageContext
from dsaforge.tracking import NullTracker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.chain")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], help="config override a.b=c (repeatable)")
    ap.add_argument("--data", type=Path, help="an existing prepare-data output (skips data preparation)")
    ap.add_argument("--mlflow", action="store_true", help="log each stage as an MLflow run")
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, overrides=args.set)
    data = args.data
    if data is None:
        from dsaforge.data.prepare import prepare
        data = args.out / "data"
        if not (data / "manifest.json").exists():
            prepare(cfg, data)
    from dsaforge.model.train import stages
    inputs = {"prepare-data": data}
    for name in stages.ORDER:
        t0 = time.time()
        tracker = NullTracker()
        if args.mlflow:
            from dsaforge.tracking import start_stage_run
            tracker = start_stage_run(cfg, name)
        summary = getattr(stages, name)(StageContext(cfg, args.out / name, dict(inputs), tracker))
        if args.mlflow:
            tracker.finish()
        print(json.dumps({"stage": name, "seconds": round(time.time() - t0, 1), **summary}, default=str), flush=True)
        inputs = {"prepare-data": data, name: args.out / name}
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
