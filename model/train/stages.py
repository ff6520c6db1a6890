"""The training stages as pipeline steps: pretrain -> warmup -> sparse (DeepSeek-V3.2 §2.1) -> sft.

Run (CPU, the tiny preset):
    dsaforge stage pretrain --preset tiny --input prepare-data=DATA --out PRE
    dsaforge stage warmup   --preset tiny --input prepare-data=DATA --input pretrain=PRE --out WARM
    dsaforge stage sparse   --preset tiny --input prepare-data=DATA --input warmup=WARM --out SPARSE
    dsaforge stage sft      --preset tiny --input prepare-data=DATA --input sparse=SPARSE --input synthesize=SYN --out SFT
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
from typing import Callable, Optional

from dsaforge.config import ConfigError

ORDER = ("pretrain", "warmup", "sparse", "sft")


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
    rows, stats = None, {}
    if stage == "sft":          # rendered reference trajectories, scored on the assistant's tokens
        from dsaforge.model.train.sft import conversation_rows
        train_rows, val_rows, stats = conversation_rows(ctx.cfg, ctx.inputs)
        rows = (train_rows, val_rows)
    trainer = Trainer(ctx.cfg, stage, ctx.inputs["prepare-data"], ctx.out_dir, _init_from(stage, ctx.inputs),
                      ctx.tracker, doc_mask=scfg.doc_mask, rows=rows)
    try:
        return trainer.fit() | stats
    finally:
        trainer.close()


def rendezvous_args(p, env) -> list[str]:
    """torchrun's rendezvous arguments. One node: standalone. Several: the node's rank and the master's address
    from the environment Kubeflow Trainer's torch runtime gives every node (PET_NNODES, PET_NPROC_PER_NODE,
    PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), checked against the config."""
    if p.nnodes == 1:
        return ["--standalone"]
    missing = [k for k in ("PET_NODE_RANK", "PET_MASTER_ADDR") if not env.get(k)]
    if missing:
        raise ConfigError(f"parallel.nnodes={p.nnodes} needs {' and '.join(missing)} in the environment "
                          "(Kubeflow Trainer's torch runtime sets them in every node's pod)")
    for key, want in (("PET_NNODES", p.nnodes), ("PET_NPROC_PER_NODE", p.nproc_per_node)):
        have = env.get(key, "")
        if have.isdigit() and int(have) != want:
            raise ConfigError(f"{key}={have} in the environment but the config says "
                              f"parallel.{key[4:].lower()}={want}")
    return [f"--node-rank={env['PET_NODE_RANK']}", f"--master-addr={env['PET_MASTER_ADDR']}",
            f"--master-port={env.get('PET_MASTER_PORT') or '29500'}"]


def run_parallel(ctx, stage: str, here: Callable[[object], dict]) -> dict:
    """Run a stage where its layout says: as a Kubeflow Trainer TrainJob (parallel.nnodes > 1, from a KFP task on a
    cluster), under torchrun started here (parallel.world_size > 1), or as `here(ctx)` in this process (one device,
    or already a torchrun worker). -> the stage's summary (its metrics.json)."""
    inside_torchrun = "LOCAL_RANK" in os.environ
    if ctx.cfg.parallel.nnodes > 1 and not inside_torchrun and "PET_NODE_RANK" not in os.environ:
        from dsaforge.trainjob import run_trainjob    # a KFP task on a cluster: the nodes are a TrainJob's pods
        return run_trainjob(ctx, stage)
    if ctx.cfg.parallel.world_size > 1 and not inside_torchrun:
        return _launch_torchrun(ctx, stage)
    return here(ctx)


def _launch_torchrun(ctx, stage: str) -> dict:
    """Start one process per device with torchrun and wait; rank 0 logs to the same MLflow run."""
    p = ctx.cfg.parallel
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = ctx.out_dir / "config.json"
    cfg_path.write_text(ctx.cfg.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}",
           f"--nnodes={p.nnodes}", *rendezvous_args(p, os.environ)]
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
    if "prepare-data" in ctx.inputs and (Path(ctx.inputs["prepare-data"]) / "manifest.json").is_file():
        log_training_data(ctx)
    if "prepare-data" in ctx.inputs and "LOCAL_RANK" not in os.environ:    # once per stage, before any model is built
        from dsaforge.data.prepare import verify_dataset

        verified = verify_dataset(ctx.inputs["prepare-data"], ctx.cfg.model.vocab_size)
        ctx.tracker.set_tags({"dsaforge.dataset.sha256": verified["digest"]})
        ctx.tracker.log_params({f"dataset.{k}": v for k, v in verified.items() if k != "digest"})
    summary = run_parallel(ctx, stage, lambda c: train_stage(c, stage))
    for name in ("metrics.json", "hf/config.json"):
        if (ctx.out_dir / name).is_file():
            ctx.tracker.log_artifact(ctx.out_dir / name)
    flat = _flat_summary(summary)
    if (ctx.out_dir / "hf" / "config.json").is_file():
        ctx.tracker.log_model(stage, ctx.out_dir / "hf", {k: v for k, v in flat.items() if k.startswith("end.val/")
                                                          and isinstance(v, (int, float))},
                              reference_uri=artifact_uri(ctx.out_dir / "hf"), max_mb=ctx.cfg.tracking.model_max_mb)
    return flat


def log_training_data(ctx) -> None:
    """The prepared dataset as the run's training input: the same MLflow dataset (name and digest) prepare-data
    logged, so the run, its model and its data link up."""
    data = Path(ctx.inputs["prepare-data"])
    manifest = json.loads((data / "manifest.json").read_text())
    counts = manifest.get("counts", {})
    ctx.tracker.log_dataset("corpus", artifact_uri(data), manifest["documents_sha256"][:16], context="training",
                            profile={"documents": counts.get("documents"),
                                     "tokens": counts.get("train_tokens", 0) + counts.get("val_tokens", 0)})


def artifact_uri(path: Path) -> str:
    """The object-store URI of a KFP artifact path (KFP mounts s3://b/k at /s3/b/k, gs:// at /gcs, minio:// at
    /minio); a local path stays a path."""
    text = str(Path(path).absolute())
    for mount, scheme in (("/s3/", "s3://"), ("/gcs/", "gs://"), ("/minio/", "minio://")):
        if text.startswith(mount):
            return scheme + text[len(mount):]
    return text


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


def sft(ctx) -> dict:
    """Supervised fine-tuning on the reference trajectories, loss on assistant tokens (inputs: prepare-data,
    sparse, synthesize)."""
    return run(ctx, "sft")
