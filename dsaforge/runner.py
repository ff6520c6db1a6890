"""Run a pipeline on KFP's local runner with MLflow tracking, and compile pipelines to KFP IR YAML."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsaforge.config import Config, ConfigError, to_yaml
from dsaforge.tracking import close_orphans, reopen_run, resolve_tracking_uri, start_pipeline_run
from dsaforge.tracking_query import stage_errors


class PipelineFailed(RuntimeError):
    """A pipeline task failed; the message names the stage and its error."""


@dataclass
class PipelineResult:
    name: str
    run_id: str                 # the pipeline run id (kfp.pipeline_run_id)
    mlflow_run_id: str
    tracking_uri: str
    run_dir: Path               # KFP's outputs of this run (one folder per task)
    record: Path                # the resolved config and summary of this run
    seconds: float
    outputs: dict[str, str]


def _run_dir(root: Path, name: str, required: bool = True) -> Optional[Path]:
    """KFP's folder of this run: the only one under the attempt's own pipeline root (never chosen by mtime, which
    would hand two concurrent runs the same folder). None when a failed run wrote none and `required` is False."""
    dirs = [p for p in root.glob(f"{name}-*") if p.is_dir()]
    if not dirs and not required:
        return None
    if len(dirs) != 1:
        raise RuntimeError(f"expected one KFP run folder under {root}, found {len(dirs)}")
    return dirs[0]


def run_local(name: str, cfg: Config, reuse: Optional[dict[str, str]] = None,
              resume: Optional[str] = None, run_id: Optional[str] = None,
              kfp_root: Optional[Path] = None) -> PipelineResult:
    """Run pipeline `name` on KFP's local runner. `reuse` maps stages to finished outputs that are imported instead
    of run (--input); `resume` names an earlier failed run whose finished stages are reused the same way, under the
    same MLflow parent run (see dsaforge.records). `run_id` and `kfp_root` let a launcher (the console's worker)
    choose a new run's id and the folder its attempts' pipeline roots go under (default `<home>/kfp`)."""
    from kfp import local

    from dsaforge.pipelines import get_pipeline
    from dsaforge.records import finished_outputs, find_record, load_record, running_record

    home = Path(cfg.pipeline.home).resolve()
    reuse = dict(reuse or {})
    earlier = None
    if resume:
        earlier = load_record(find_record(home, resume))
        if earlier["pipeline"] != name:
            raise ConfigError(f"--resume: that run is of pipeline {earlier['pipeline']!r}, not {name!r}")
        reuse = {**earlier.get("reused", {}), **earlier.get("finished", {}), **reuse}
    module = get_pipeline(name)
    run_id = earlier["pipeline_run_id"] if earlier else (run_id or uuid.uuid4().hex)
    # Each attempt gets its own pipeline root (a resumed run keeps its run id, not the failed attempt's folder), so
    # concurrent runs never share one and the run folder is found without comparing mtimes.
    kfp_root = (Path(kfp_root).resolve() if kfp_root else home / "kfp") / uuid.uuid4().hex
    kfp_root.mkdir(parents=True)
    record = home / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{run_id[:8]}"
    record.mkdir(parents=True, exist_ok=bool(earlier))
    (record / "config.yaml").write_text(to_yaml(cfg))
    uri = resolve_tracking_uri(cfg)
    cfg.tracking.uri = uri          # every component, in whatever process, writes to the same store
    if earlier:
        parent = reopen_run(uri, earlier["mlflow_run_id"])
        parent.set_tags({"dsaforge.reused": ",".join(sorted(reuse))})
        close_orphans(uri, parent.run_id)
    else:
        parent = start_pipeline_run(cfg, name, run_id, pipeline_run_url=record.as_uri())
    parent.log_artifact(record / "config.yaml")
    # Retries are for a cluster's transient failures (preemption, eviction); on this machine a failed step would
    # only fail again, and open one more MLflow run each time.
    local_cfg = cfg.model_copy(deep=True)
    local_cfg.pipeline.retries = 0
    for r in local_cfg.pipeline.resources.values():
        r.retries = 0
    pipeline = module.build(local_cfg, reuse)

    # The local orchestrator deletes workspace_root after every run, so it gets a fresh temporary directory.
    workspace = Path(tempfile.mkdtemp(prefix="dsaforge-ws-"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root),
               workspace_root=str(workspace), raise_on_error=True, enable_caching=cfg.pipeline.caching)
    t0 = time.time()
    summary = {"pipeline": name, "pipeline_run_id": run_id, "mlflow_run_id": parent.run_id, "tracking_uri": uri,
               "resumed_from": earlier and earlier.get("record"), "reused": reuse, "record": str(record)}
    # Written now and again at the end: a run killed in between still leaves what --resume needs.
    (record / "summary.json").write_text(json.dumps(running_record(summary, kfp_root), indent=2))
    try:
        with warnings.catch_warnings():
            # The local runner warns that the cluster image is not used; running in this interpreter is the point.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
            # Resource and placement settings are for clusters; the local runner says so once per task.
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            pipeline(config_json=json.dumps(cfg.model_dump()), tracking_uri=uri, parent_run_id=parent.run_id)
    except Exception as e:
        errors = stage_errors(uri, parent.run_id)
        reason = "; ".join(dict.fromkeys(errors)) or re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        run_dir = _run_dir(kfp_root, name, required=False)
        summary.update(state="FAILED", error=reason[:4000], kfp_run_dir=str(run_dir or ""),
                       finished=finished_outputs(run_dir), seconds=round(time.time() - t0, 1))
        (record / "summary.json").write_text(json.dumps(summary, indent=2))
        parent.set_tags({"dsaforge.error": reason[:4000]})
        parent.finish("FAILED")
        raise PipelineFailed(f"pipeline {name} failed: {reason} (logs: {kfp_root}; after fixing, "
                             f"resume with --resume {run_id[:8]})") from e
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    seconds = time.time() - t0
    run_dir = _run_dir(kfp_root, name)
    outputs = {p.parent.name: str(p) for p in sorted(run_dir.glob("*/*")) if p.name != "executor_output.json"}
    summary.update(state="SUCCEEDED", kfp_run_dir=str(run_dir), seconds=round(seconds, 1), outputs=outputs,
                   finished=finished_outputs(run_dir))
    (record / "summary.json").write_text(json.dumps(summary, indent=2))
    parent.log_metrics({"pipeline_seconds": seconds})
    parent.log_artifact(record / "summary.json")
    # The exit handler closed the parent run from inside the pipeline; nothing more to mark here.
    return PipelineResult(name, run_id, parent.run_id, uri, run_dir, record, seconds, outputs)


_SCALARS = ("documents", "train_tokens", "bytes_per_token", "steps", "unigram_entropy", "tasks", "envs", "heldout_tasks",
            "lm/dense/loss", "lm/sparse/loss", "long-context/dense/accuracy", "long-context/sparse/accuracy",
            "agentic/pass_at_1", "code/pass_at_1", "reasoning/mean_score")
_CHANGES = ("val/lm_loss", "val/indexer_kl", "val/recall/mean", "heldout/pass_rate")


def stage_highlights(run_dir: Path) -> dict[str, str]:
    """One line per task from its output artifact's metadata: the numbers a reader checks first."""
    lines = {}
    from dsaforge.stages import STAGES

    order = {name: i for i, name in enumerate(STAGES)}
    for executor_output in sorted(run_dir.glob("*/executor_output.json"),
                                  key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name)):
        artifacts = json.loads(executor_output.read_text()).get("artifacts", {})
        for output in artifacts.values():
            meta = output["artifacts"][0].get("metadata", {})
            parts = [f"{k}={meta[k]:.4g}" if isinstance(meta[k], float) else f"{k}={meta[k]}" for k in _SCALARS
                     if k in meta]
            parts += [f"{k} {meta[f'start.{k}']:.4g} -> {meta[f'end.{k}']:.4g}" for k in _CHANGES
                      if f"start.{k}" in meta and f"end.{k}" in meta]
            if parts:
                lines[executor_output.parent.name] = ", ".join(parts)
    return lines


def compile_pipeline(name: str, cfg: Config, out: Path, reuse: Optional[dict[str, str]] = None) -> Path:
    from kfp import compiler

    from dsaforge.pipelines import get_pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(get_pipeline(name).build(cfg, reuse), str(out),
                                pipeline_parameters={"config_json": json.dumps(cfg.model_dump())})
    return out
