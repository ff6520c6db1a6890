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
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol

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
    def finish(self, status: str = "FINISHED") -> None: ...
    def log_model(self, name: str, path: str | Path, metrics: Optional[Mapping[str, float]] = None,
                  reference_uri: Optional[str] = None, max_mb: float = 2048.0) -> Optional[str]: ...


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

    def finish(self, status="FINISHED"):
        self.tags["status"] = status

    def log_model(self, name, path, metrics=None, reference_uri=None, max_mb=2048.0):
        self.artifacts.append(f"model:{name}")
        return None


def default_tracking_uri(home: str | Path) -> str:
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(cfg: Config) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if os.environ.get("KFP_POD_NAME"):
        # In a cluster pod a local SQLite file would be lost with the pod and differ per task.
        raise ConfigError("no MLflow tracking server for this pod: set tracking.uri, or MLFLOW_TRACKING_URI in the "
                          "dsaforge-mlflow Secret (pipeline.secrets)")
    return default_tracking_uri(cfg.pipeline.home)


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
    if os.environ.get("DSAFORGE_GIT_COMMIT"):       # set in the images, which have no .git
        return os.environ["DSAFORGE_GIT_COMMIT"]
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

    def log_model(self, name, path, metrics=None, reference_uri=None, max_mb=2048.0):
        """An MLflow LoggedModel of this run: the files under `path` when smaller than `max_mb`, else a tag pointing
        at `reference_uri` (where the checkpoint stays); `metrics` are logged on the run linked to the model."""
        import time

        from mlflow.entities import Metric

        path = Path(path)
        exp = self._client.get_run(self.run_id).info.experiment_id
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        model = self._client.create_logged_model(exp, name=name, source_run_id=self.run_id, model_type="dsaforge-hf",
                                                 tags={"dsaforge.stage": name, "dsaforge.bytes": str(size)})
        if size <= max_mb * 2**20:
            self._client.log_model_artifacts(model.model_id, str(path))
        else:
            self._client.set_logged_model_tags(model.model_id, {"dsaforge.checkpoint_uri": reference_uri or str(path)})
        if metrics:
            ts = int(time.time() * 1000)
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, 0, model_id=model.model_id)
                                                         for k, v in metrics.items()])
        self._client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

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


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
              enabled: bool = True) -> Iterator[Tracker]:
    """The one lifecycle of a stage's run, for every caller (CLI, KFP component, the in-process chain).

    Opens the run (a child of `parent_run_id` when given), yields its tracker, and closes it FINISHED; when the
    body raises, the run gets a `dsaforge.error` tag and an `error.json` traceback and is closed FAILED.
    `enabled=False` yields a NullTracker (no MLflow)."""
    tracker: Tracker = (start_stage_run(cfg, stage, parent_run_id=parent_run_id or None,
                                        tracking_uri=tracking_uri or None) if enabled else NullTracker())
    try:
        yield tracker
    except BaseException as e:
        tracker.set_tags({"dsaforge.error": f"{type(e).__name__}: {e}"[:4000]})
        tracker.log_dict({"traceback": traceback.format_exc()}, "error.json")
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def attach_run(uri: str, run_id: str) -> MlflowTracker:
    """A tracker for an existing run (e.g. the pipeline's parent, from the task that closes it)."""
    return MlflowTracker(uri, run_id)


def reopen_run(uri: str, run_id: str) -> MlflowTracker:
    """Mark a finished or failed run RUNNING again (a resumed pipeline continues under its parent run)."""
    tracker = MlflowTracker(uri, run_id)
    tracker._client.update_run(run_id, status="RUNNING")
    return tracker


def find_pipeline_run(cfg: Config, pipeline_run_id: str, tracking_uri: Optional[str] = None) -> str:
    """The parent run tagged kfp.pipeline_run_id=`pipeline_run_id` (how a KFP exit task finds it on a cluster)."""
    uri = tracking_uri or resolve_tracking_uri(cfg)
    client = _client(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    # Stage runs carry the parent's kfp.* tags too; the parent is the one without a parent.
    runs = [] if exp is None else [r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`kfp.pipeline_run_id` = '{pipeline_run_id}'", max_results=1000)
        if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise RuntimeError(f"no MLflow run tagged kfp.pipeline_run_id={pipeline_run_id} in {uri}")
    return runs[0].info.run_id


def stage_errors(uri: str, parent_run_id: str) -> list[str]:
    """`stage: error` for every child run of `parent_run_id` that recorded a failure."""
    client = _client(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [f"{r.data.tags.get('dsaforge.stage', r.info.run_name)}: {r.data.tags['dsaforge.error']}"
            for r in runs if "dsaforge.error" in r.data.tags]


def register_final_model(uri: str, parent_run_id: str, name: str, order: list[str]) -> Optional[Any]:
    """Register the LoggedModel of the pipeline's last model stage (in `order`) as a new version of `name`, tagged
    with the run, pipeline run and config hash, so the version leads back to the run, its config and its data."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    children = {r.info.run_id: r for r in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")}
    models = [m for m in client.search_logged_models([exp]) if m.source_run_id in children]
    rank = {stage: i for i, stage in enumerate(order)}
    models = [m for m in models if m.tags.get("dsaforge.stage") in rank]
    if not models:
        return None
    final = max(models, key=lambda m: (rank[m.tags["dsaforge.stage"]], m.creation_timestamp))
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException subclasses for "not found"
        client.create_registered_model(name, description="Final checkpoints of dsaforge pipelines.")
    tags = {"dsaforge.stage": final.tags["dsaforge.stage"], "dsaforge.model_id": final.model_id,
            "mlflow.parentRunId": parent_run_id,
            **{k: v for k, v in parent.data.tags.items() if k in ("kfp.pipeline_run_id", "dsaforge.config_hash")}}
    # A models:/<id> source links the version to the LoggedModel. MLflow's SQL registry store resolves it through
    # the process-wide tracking URI, not the client's, so point that at this store for the call.
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        version = client.create_model_version(name, source=f"models:/{final.model_id}", run_id=final.source_run_id,
                                              tags=tags, model_id=final.model_id)
    finally:
        mlflow.set_tracking_uri(previous)
    # the SQL registry keeps the link only as the models:/ source; tag both ways so either end finds the other
    client.set_logged_model_tags(final.model_id, {"dsaforge.registered_as": f"{name}/{version.version}"})
    return version
