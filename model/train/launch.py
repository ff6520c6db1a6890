"""One torchrun worker of a training stage (started by `dsaforge.model.train.stages`; not called by hand).

    torchrun --nproc-per-node 2 -m dsaforge.model.train.launch pretrain --config CFG.json --out DIR \
        --input prepare-data=DATA [--tracking-uri URI --run-id ID]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dsaforge.config import Config
from dsaforge.stages import StageContext
from dsaforge.tracking import NullTracker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.launch")
    ap.add_argument("stage", choices=["pretrain", "warmup", "sparse"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--tracking-uri")
    ap.add_argument("--run-id")
    args = ap.parse_args(argv)
    cfg = Config.model_validate_json(Path(args.config).read_text())
    inputs = dict(kv.split("=", 1) for kv in args.input)
    tracker = NullTracker()
    if args.tracking_uri and args.run_id and int(os.environ.get("RANK", 0)) == 0:
        from dsaforge.tracking import MlflowTracker
        tracker = MlflowTracker(args.tracking_uri, args.run_id)
    from dsaforge.model.train.stages import train_stage
    ctx = StageContext(cfg=cfg, out_dir=Path(args.out), inputs={k: Path(v) for k, v in inputs.items()},
                       tracker=tracker)
    train_stage(ctx, args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
