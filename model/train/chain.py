"""prepare-data -> pretrain -> warmup -> sparse in one process: a quick end-to-end check on one device, no KFP.

Run (CPU):   python -m dsaforge.model.train.chain --preset tiny --out runs/chain
1 GPU:       python -m dsaforge.model.train.chain --preset small --out runs/chain --set train.pretrain.steps=50
With --mlflow the chain is one parent run and each stage a child run (params, per-step metrics, artifacts), as the
KFP pipeline logs them; without it, metrics.jsonl in each stage's directory only.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

from dsaforge.config import load_config
from dsaforge.stages import StageContext
from dsaforge.tracking import stage_run


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
    parent = None
    if args.mlflow:
        from dsaforge.tracking import start_pipeline_run
        parent = start_pipeline_run(cfg, "chain", uuid.uuid4().hex, str(args.out.resolve()))
    inputs = {"prepare-data": data}
    status = "FAILED"
    try:
        for name in stages.ORDER:
            t0 = time.time()
            with stage_run(cfg, name, parent_run_id=parent and parent.run_id, enabled=parent is not None) as tracker:
                summary = getattr(stages, name)(StageContext(cfg, args.out / name, dict(inputs), tracker))
            if parent:
                parent.log_metrics({f"{name}.seconds": time.time() - t0})
            print(json.dumps({"stage": name, "seconds": round(time.time() - t0, 1), **summary}, default=str),
                  flush=True)
            inputs = {"prepare-data": data, name: args.out / name}
        status = "FINISHED"
    finally:
        if parent:
            parent.finish(status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
