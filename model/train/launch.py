"""One torchrun worker of a training stage or grpo (started by `dsaforge.model.train.stages.run_parallel`; not
called by hand).

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


# NVLink multicast (NVLS) switches, kept off unless parallel.nvls says otherwise.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def collective_env(cfg: Config, base: dict | None = None) -> dict[str, str]:
    """The environment for a stage's worker processes: `base` (default os.environ) with NVLink multicast turned off,
    whatever the environment says, unless `parallel.nvls` is set (then the environment decides)."""
    env = dict(os.environ if base is None else base)
    if not cfg.parallel.nvls:
        env.update(NVLS_OFF)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.launch")
    ap.add_argument("stage", choices=["pretrain", "warmup", "sparse", "sft", "grpo"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--tracking-uri")
    ap.add_argument("--run-id")
    args = ap.parse_args(argv)
    cfg = Config.model_validate_json(Path(args.config).read_text())
    os.environ.update(collective_env(cfg))          # also when torchrun was started by hand, before NCCL starts
    inputs = dict(kv.split("=", 1) for kv in args.input)
    tracker = NullTracker()
    if args.tracking_uri and args.run_id and int(os.environ.get("RANK", 0)) == 0:
        from dsaforge.tracking import MlflowTracker
        tracker = MlflowTracker(args.tracking_uri, args.run_id)
    ctx = StageContext(cfg=cfg, out_dir=Path(args.out), inputs={k: Path(v) for k, v in inputs.items()},
                       tracker=tracker)
    if args.stage == "grpo":
        from dsaforge.model.rl.stage import train
        train(ctx)
    else:
        from dsaforge.model.train.stages import train_stage
        train_stage(ctx, args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
