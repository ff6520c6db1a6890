"""The training stages as pipeline steps: pretrain -> warmup -> sparse (DeepSeek-V3.2 §2.1).

Run (CPU, the tiny preset):
    dsaforge stage pretrain --preset tiny --input prepare-data=DATA --out PRE
    dsaforge stage warmup   --preset tiny --input prepare-data=DATA --input pretrain=PRE --out WARM
    dsaforge stage sparse   --preset tiny --input prepare-data=DATA --input warmup=WARM --out SPARSE
1 GPU: the same commands (train.device=auto picks CUDA; the small preset trains in bf16 autocast).
N GPUs: add `--set parallel.nproc_per_node=N --set parallel.tp=T --set parallel.ep=E`; the stage launches
torchrun itself (one process per device, NCCL), so the same command and the same KFP component work in a pod.

Each stage starts from the HF export of the nearest earlier stage it is given (warmup from pretrain, sparse from
warmup; any earlier stage works, e.g. `--input pretrain=PRE` for sparse); pretrain continues from an HF-format
DeepSeek-V3.2 checkpoint given as `--input hf-checkpoint=DIR`, else starts from scratch. A stage resumes from its
own newest checkpoint when its output directory already holds one.

Output directory of a stage:
    checkpoints/step-XXXXXXXX/   sharded, atomic checkpoints (model, optimizer, step, RNG), the last keep_last
    hf/                          HF export (config.json + safetensors, DeepSeek names; dsaforge_stage.json)
    metrics.jsonl                one line of metrics per step (what goes to MLflow)
    metrics.json                 the stage summary (start/end validation metrics, tokens, layout)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from dsaforge.config import ConfigError

ORDER = ("pretrain", "warmup", "sparse")


def _init_from(stage: str, inputs: dict[str, Path]) -> Optional[Path]:
    """The HF export to start from: the nearest earlier stage among the inputs, or for pretrain an optional
    `hf-checkpoint` input (continued pretraining); None: pretrain from scratch."""
    if stage == "pretrain" and "hf-checkpoint" in inputs:
        return Path(inputs["hf-checkpoint"])
    for earlier in reversed(ORDER[:ORDER.index(stage)]):
        if earlier in inputs:
            path = Path(inputs[earlier]) / "hf"
            if not (path / "config.json").is_file():
                raise ConfigError(f"{stage}: input {earlier}={inputs[earlier]} has no hf/ export "
                                  "(that stage did not finish)")
            return path
    if stage != "pretrain":
        raise ConfigError(f"stage {stage!r} needs an earlier stage's output ({' or '.join(ORDER[:ORDER.index(stage)])})")
    return None


def train_stage(ctx, stage: str) -> dict:
    """Run `stage` in this process (one device, or one rank of a torchrun job)."""
    from dsaforge.model.train.trainer import Trainer

    if "prepare-data" not in ctx.inputs:
        raise ConfigError(f"stage {stage!r} needs the prepare-data output (--input prepare-data=DIR)")
    scfg = getattr(ctx.cfg.train, stage)
    trainer = Trainer(ctx.cfg, stage, ctx.inputs["prepare-data"], ctx.out_dir, _init_from(stage, ctx.inputs),
                      ctx.tracker, doc_mask=scfg.doc_mask)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _launch_torchrun(ctx, stage: str) -> dict:
    """Start one process per device with torchrun and wait; rank 0 logs to the same MLflow run."""
    p = ctx.cfg.parallel
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = ctx.out_dir / "config.json"
    cfg_path.write_text(ctx.cfg.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}",
           f"--nnodes={p.nnodes}"]
    if p.nnodes == 1:
        cmd.append("--standalone")
    else:   # multi-node: the pod environment supplies the rendezvous (Kubeflow Trainer sets these)
        cmd += [f"--node-rank={os.environ['NODE_RANK']}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"]
    cmd += ["-m", "dsaforge.model.train.launch", stage, "--config", str(cfg_path), "--out", str(ctx.out_dir)]
    for name, path in ctx.inputs.items():
        cmd += ["--input", f"{name}={path}"]
    uri = getattr(ctx.tracker, "uri", None)
    if uri and ctx.tracker.run_id:
        cmd += ["--tracking-uri", uri, "--run-id", ctx.tracker.run_id]
    from dsaforge.model.train.launch import collective_env
    proc = subprocess.run(cmd, env=collective_env(ctx.cfg))
    if proc.returncode != 0:
        raise RuntimeError(f"{stage}: torchrun exited with status {proc.returncode} (see the rank logs above)")
    summary = json.loads((ctx.out_dir / "metrics.json").read_text())
    if not (uri and ctx.tracker.run_id):   # no shared MLflow run: replay the metrics log into this tracker
        for line in (ctx.out_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            ctx.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    return summary


def run(ctx, stage: str) -> dict:
    scfg = getattr(ctx.cfg.train, stage)
    ctx.tracker.log_params({f"train.{stage}.{k}": v for k, v in scfg.model_dump().items()})
    from dsaforge.model.train.plan import plan_params
    ctx.tracker.log_params(plan_params(ctx.cfg, stage))     # the memory plan of this run's layout (plan.*)
    ctx.tracker.set_tags({"dsaforge.train.mode": {"pretrain": "dense"}.get(stage, stage)})
    inside_torchrun = "LOCAL_RANK" in os.environ
    if ctx.cfg.parallel.world_size > 1 and not inside_torchrun:
        summary = _launch_torchrun(ctx, stage)
    else:
        summary = train_stage(ctx, stage)
    for name in ("metrics.json", "hf/config.json"):
        if (ctx.out_dir / name).is_file():
            ctx.tracker.log_artifact(ctx.out_dir / name)
    return _flat_summary(summary)


def _flat_summary(summary: dict) -> dict:
    out = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    for part in ("start", "end"):
        out.update({f"{part}.{k}": v for k, v in summary.get(part, {}).items()})
    return out


def pretrain(ctx) -> dict:
    """Dense MLA+MoE pre-training from scratch (inputs: prepare-data)."""
    return run(ctx, "pretrain")


def warmup(ctx) -> dict:
    """Dense warm-up of the lightning indexer, backbone frozen (inputs: prepare-data, pretrain)."""
    return run(ctx, "warmup")


def sparse(ctx) -> dict:
    """Sparse adaptation with top-k attention, all parameters (inputs: prepare-data, warmup)."""
    return run(ctx, "sparse")
