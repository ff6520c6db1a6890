"""What runs inside a component's pod (or local subprocess): parse the config, attach to the pipeline's MLflow
run, call one stage, record the outcome. Component functions stay thin and import only this module."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dsaforge.config import Config, validate
from dsaforge.stages import run_stage
from dsaforge.tracking import attach_run, find_pipeline_run, resolve_tracking_uri, stage_run, start_pipeline_run


def parse_config(config_json: str, tracking_uri: str = "") -> Config:
    """The pipeline's config; a non-empty `tracking_uri` parameter overrides `tracking.uri`."""
    cfg = validate(json.loads(config_json), where="pipeline config")
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    return cfg


def open_pipeline_run(config_json: str, tracking_uri: str, pipeline: str, pipeline_run_id: str,
                      parent_run_id: str) -> str:
    """The run that every stage attaches to: the launcher's (local CLI) or a new one (cluster)."""
    if parent_run_id:
        return parent_run_id
    cfg = parse_config(config_json, tracking_uri)
    tracker = start_pipeline_run(cfg, pipeline, pipeline_run_id, pipeline_run_url="")
    return tracker.run_id


def close_pipeline_run(config_json: str, tracking_uri: str, parent_run_id: str, pipeline_run_id: str, state: str,
                       error: str = "") -> None:
    """Mark the parent run FINISHED or FAILED. An exit task cannot take task outputs, so on a cluster the parent is
    found by its kfp.pipeline_run_id tag; the URI may come from the config, the parameter or MLFLOW_TRACKING_URI."""
    cfg = parse_config(config_json, tracking_uri)
    uri = resolve_tracking_uri(cfg)
    parent_run_id = parent_run_id or find_pipeline_run(cfg, pipeline_run_id, uri)
    tracker = attach_run(uri, parent_run_id)
    if error:
        tracker.set_tags({"dsaforge.error": error[:4000]})
    tracker.finish("FINISHED" if state == "SUCCEEDED" else "FAILED")


def run_component(stage: str, config_json: str, tracking_uri: str, parent_run_id: str, out_dir: str,
                  inputs: Optional[dict[str, str]] = None, metadata: Optional[dict] = None) -> dict[str, Any]:
    cfg = parse_config(config_json, tracking_uri)
    with stage_run(cfg, stage, parent_run_id=parent_run_id, out_dir=Path(out_dir)) as tracker:
        summary = run_stage(stage, cfg, Path(out_dir), {k: Path(v) for k, v in (inputs or {}).items()}, tracker)
        tracker.set_tags({"dsaforge.output": str(out_dir)})
    if metadata is not None:
        metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        metadata["mlflow_run_id"] = tracker.run_id
    return summary


def run_stage_component(stage: str, config_json: str, tracking_uri: str, parent_run_id: str, output,
                        **artifacts) -> dict[str, Any]:
    """run_component for a component whose parameters follow the stage registry: one input artifact per upstream
    stage (named `input_param(stage)`, None when an optional input is not wired) and one output artifact."""
    from dsaforge.stages import get_stage, input_param

    spec = get_stage(stage)
    names = {input_param(n): n for n in spec.inputs + spec.optional}
    unknown = sorted(set(artifacts) - set(names))
    if unknown:
        raise TypeError(f"component of {stage!r} passes {unknown}, not inputs of the stage in dsaforge.stages.STAGES")
    inputs = {names[k]: a.path for k, a in artifacts.items() if a is not None}
    return run_component(stage, config_json, tracking_uri, parent_run_id, output.path, inputs, output.metadata)
