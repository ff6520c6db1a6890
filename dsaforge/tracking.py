"""Experiment tracking. Stage code receives a `Tracker`; only this module imports MLflow.

Run layout (same tag keys as KFP's MLflow plugin, so a cluster with the plugin on compares cleanly):
a pipeline parent run tagged kfp.pipeline_run_id / kfp.pipeline_run_url / kfp.pipeline_id, and one child run per
stage (mlflow.parentRunId). A stage in another process or pod attaches by the parent's run id.
"""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

from dsaforge.config import Config, ConfigError, config_hash, flatten


class Tracker(Protocol):
    run_id: Optional[str]

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def log_dataset(self, name: str, source: str, digest: str, context: str = "training",
                    profile: Optional[Mapping[str, Any]] = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class NullTracker:
    """Records metrics in memory; for library use without MLflow and for tests."""

    run_id: Optional[str] = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step or 0, float(v)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))

    def log_artifacts(self, path, artifact_path=None):
        self.artifacts.append(str(path))

    def log_dict(self, obj, name):
        self.artifacts.append(name)

    def log_dataset(self, name, source, digest, context="training", profile=None):
        self.tags[f"dataset.{name}"] = digest

    def set_tags(self, tags):
        self.tags.update(tags)


def default_tracking_uri(home: str | Path) -> str:
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(cfg.pipeline.home)


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast with one clear line when an HTTP tracking server is not there (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            raise ConfigError(f"MLflow server at {uri} answered HTTP {resp.status} on /health")
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"MLflow server at {uri} is unreachable ({reason})") from None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _client(uri: str):
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, artifact_root: Optional[str]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def _artifact_root(uri: str, home: str, experiment: str) -> Optional[str]:
    # With a local SQLite store, keep artifacts beside it under the home dir rather than in ./mlruns of the cwd.
    if uri.startswith("sqlite:///"):
        return (Path(home).resolve() / "mlartifacts" / experiment).as_uri()
    return None


class MlflowTracker:
    """A Tracker bound to one MLflow run through MlflowClient (no global active-run state)."""

    def __init__(self, uri: str, run_id: str, system_metrics_interval_s: Optional[float] = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = _client(uri)
        self._monitor = None
        if system_metrics_interval_s:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_interval_s,
                                                 tracking_uri=uri)
            self._monitor.start()

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics, step=None):
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path, artifact_path=None):
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path, artifact_path=None):
        self._client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_dict(self, obj, name):
        self._client.log_dict(self.run_id, obj, name)

    def log_dataset(self, name, source, digest, context="training", profile=None):
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest, source_type="local" if "://" not in source else source.split("://")[0],
                     source=json.dumps({"uri": source}), profile=json.dumps(dict(profile or {})))
        self._client.log_inputs(self.run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags):
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._client.set_terminated(self.run_id, status)


def pipeline_tags(cfg: Config, pipeline: str, pipeline_run_id: str, pipeline_run_url: str) -> dict[str, str]:
    return {"kfp.pipeline_run_id": pipeline_run_id, "kfp.pipeline_run_url": pipeline_run_url,
            "kfp.pipeline_id": pipeline, "dsaforge.preset": cfg.preset, "dsaforge.config_hash": config_hash(cfg),
            "mlflow.source.git.commit": _git_commit(), "dsaforge.version": __import__("dsaforge").__version__}


def start_pipeline_run(cfg: Config, pipeline: str, pipeline_run_id: str, pipeline_run_url: str) -> MlflowTracker:
    """Create the parent run of a pipeline; stages attach to it with `start_stage_run(..., parent_run_id)`."""
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    client = _client(uri)
    exp = _experiment_id(client, cfg.tracking.experiment, _artifact_root(uri, cfg.pipeline.home, cfg.tracking.experiment))
    tags = pipeline_tags(cfg, pipeline, pipeline_run_id, pipeline_run_url)
    run = client.create_run(exp, run_name=f"{pipeline}-{pipeline_run_id[:8]}", tags=tags)
    tracker = MlflowTracker(uri, run.info.run_id)
    tracker.log_params(flatten(cfg))
    tracker.log_dict(cfg.model_dump(), "config.json")
    return tracker


def start_stage_run(cfg: Config, stage: str, parent_run_id: Optional[str] = None,
                    tracking_uri: Optional[str] = None) -> MlflowTracker:
    """Create a stage's run: a child of `parent_run_id` when given (from any process or pod), else top-level."""
    uri = tracking_uri or resolve_tracking_uri(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    client = _client(uri)
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        exp = parent.info.experiment_id
        tags = {k: v for k, v in parent.data.tags.items() if k.startswith(("kfp.", "dsaforge."))}
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp = _experiment_id(client, cfg.tracking.experiment,
                             _artifact_root(uri, cfg.pipeline.home, cfg.tracking.experiment))
        tags = {"dsaforge.preset": cfg.preset, "dsaforge.config_hash": config_hash(cfg),
                "mlflow.source.git.commit": _git_commit()}
    tags["dsaforge.stage"] = stage
    run = client.create_run(exp, run_name=stage, tags=tags)
    interval = cfg.tracking.system_metrics_interval_s if cfg.tracking.system_metrics else None
    tracker = MlflowTracker(uri, run.info.run_id, system_metrics_interval_s=interval)
    tracker.log_params(flatten(cfg))
    return tracker


# ---------------------------------------------------------------------------------------------- reading runs back

def _run_or_error(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run {run_id!r} in the tracking store") from None


def stage_runs(uri: str, run_id: str) -> dict[str, Any]:
    """The stage runs of the pipeline that `run_id` belongs to (itself a pipeline run, or one of its stages), by
    stage name; a run without a parent stands alone as {its stage or name: run}."""
    client = _client(uri)
    run = _run_or_error(client, run_id)
    parent = run.data.tags.get("mlflow.parentRunId") or (run_id if "kfp.pipeline_run_id" in run.data.tags else None)
    if parent is None:
        return {run.data.tags.get("dsaforge.stage", run.info.run_name): run}
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags.get("dsaforge.stage", r.info.run_name): r for r in runs}


def metric_histories(uri: str, run_id: str, names: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {metric: [(step, value), ...]}} for every named metric logged by a stage of `run_id`'s pipeline."""
    client = _client(uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for stage, run in stage_runs(uri, run_id).items():
        for name in names:
            if name in run.data.metrics:
                hist = client.get_metric_history(run.info.run_id, name)
                out.setdefault(stage, {})[name] = sorted((m.step, m.value) for m in hist)
    return out


def run_record(uri: str, run_id: str, stage: Optional[str] = "evaluate") -> dict[str, Any]:
    """Name, id, params, tags and latest metrics of a run. Given a pipeline run, the record of its `stage` child."""
    client = _client(uri)
    run = _run_or_error(client, run_id)
    if stage and run.data.tags.get("dsaforge.stage") != stage and "mlflow.parentRunId" not in run.data.tags:
        children = stage_runs(uri, run_id)
        if stage not in children:
            raise ConfigError(f"MLflow run {run_id} has no {stage!r} stage (stages: {', '.join(sorted(children))})")
        run = children[stage]
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "params": dict(run.data.params), "tags": dict(run.data.tags), "metrics": dict(run.data.metrics)}
