"""What runs inside a component's pod (or local subprocess): parse the config, attach to the pipeline's MLflow
run, call one stage, record the outcome. Component functions stay thin and import only this module."""
from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Optional

from dsaforge.config import Config, validate
from dsaforge.outputs import previous_run_id
from dsaforge.stages import get_stage, run_stage
from dsaforge.tracking import MlflowTracker, start_pipeline_run, start_stage_run


def parse_config(config_json: str) -> Config:
    return validate(json.loads(config_json), where="pipeline config")


def open_pipeline_run(config_json: str, tracking_uri: str, pipeline: str, pipeline_run_id: str,
                      parent_run_id: str) -> str:
    """The run that every stage attaches to: the launcher's (local CLI) or a new one (cluster)."""
    if parent_run_id:
        return parent_run_id
    cfg = parse_config(config_json)
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    tracker = start_pipeline_run(cfg, pipeline, pipeline_run_id, pipeline_run_url="")
    return tracker.run_id


def find_pipeline_run(config_json: str, tracking_uri: str, pipeline_run_id: str) -> str:
    """The parent run that `open_pipeline_run` created for this KFP run (an exit handler cannot take task outputs)."""
    import mlflow

    cfg = parse_config(config_json)
    uri = tracking_uri or cfg.tracking.uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`kfp.pipeline_run_id` = '{pipeline_run_id}'", max_results=1)
    if not runs:
        raise RuntimeError(f"no MLflow run tagged kfp.pipeline_run_id={pipeline_run_id} in {uri}")
    return runs[0].info.run_id


def close_pipeline_run(config_json: str, tracking_uri: str, parent_run_id: str, pipeline_run_id: str, state: str,
                       error: str = "") -> None:
    parent_run_id = parent_run_id or find_pipeline_run(config_json, tracking_uri, pipeline_run_id)
    tracker = MlflowTracker(tracking_uri or parse_config(config_json).tracking.uri, parent_run_id)
    if error:
        tracker.set_tags({"dsaforge.error": error[:4000]})
    tracker.finish("FINISHED" if state == "SUCCEEDED" else "FAILED")


def run_component(stage: str, config_json: str, tracking_uri: str, parent_run_id: str, out_dir: str,
                  inputs: Optional[dict[str, str]] = None, metadata: Optional[dict] = None) -> dict[str, Any]:
    cfg = parse_config(config_json)
    resume = previous_run_id(Path(out_dir), stage) if get_stage(stage).resumable else None
    tracker = start_stage_run(cfg, stage, parent_run_id=parent_run_id or None, tracking_uri=tracking_uri or None,
                              resume_run_id=resume)
    try:
        summary = run_stage(stage, cfg, Path(out_dir), {k: Path(v) for k, v in (inputs or {}).items()}, tracker)
    except BaseException as e:
        tracker.set_tags({"dsaforge.error": f"{type(e).__name__}: {e}"[:4000]})
        tracker.log_dict({"traceback": traceback.format_exc()}, "error.json")
        tracker.finish("FAILED")
        raise
    tracker.set_tags({"dsaforge.output": str(out_dir)})
    tracker.finish("FINISHED")
    if metadata is not None:
        metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        metadata["mlflow_run_id"] = tracker.run_id
    return summary
