"""What runs inside a component's pod (or local subprocess): parse the config, attach to the pipeline's MLflow
run, call one stage, record the outcome. Component functions stay thin and import only this module."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from dsaforge.config import Config, validate
from dsaforge.stages import run_stage
from dsaforge.tracking import attach_run, resolve_tracking_uri, stage_run, start_pipeline_run
from dsaforge.tracking_query import find_pipeline_run, register_final_model


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
    if state == "SUCCEEDED" and cfg.tracking.register_as:
        from dsaforge.stages import STAGES

        order = [s.name for s in STAGES.values() if s.artifact == "Model"]
        version = register_final_model(uri, parent_run_id, cfg.tracking.register_as, order)
        if version is not None:
            tracker.set_tags({"dsaforge.registered_model": f"{version.name}/{version.version}"})
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
    shards = artifacts.pop("shards", None) if spec.fan_out else None
    names = {input_param(n): n for n in spec.inputs + spec.optional}
    unknown = sorted(set(artifacts) - set(names))
    if unknown:
        raise TypeError(f"component of {stage!r} passes {unknown}, not inputs of the stage in dsaforge.stages.STAGES")
    inputs = {names[k]: a.path for k, a in artifacts.items() if a is not None}
    inputs.update({f"shard-{i:05d}": a.path for i, a in enumerate(shards or [])})
    return run_component(stage, config_json, tracking_uri, parent_run_id, output.path, inputs, output.metadata)


def run_shard_component(config_json: str, shard: int, output, prepare_data=None) -> dict[str, Any]:
    """One shard of a fanned-out synthesis (dsaforge.synth.generate.synthesize_shard) into `output`."""
    from dsaforge.synth.generate import synthesize_shard

    cfg = parse_config(config_json)
    summary = synthesize_shard(cfg.synth, Path(output.path), int(shard), cfg.synth.shards,
                               data_dir=Path(prepare_data.path) if prepare_data is not None else None,
                               targets=dict(cfg.synth.targets))
    output.metadata.update(summary)
    return summary
