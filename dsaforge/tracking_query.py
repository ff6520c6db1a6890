"""Experiment tracking, the read side: what was tracked, read back from the MLflow store after (or while) it ran.

Here: a pipeline's stage runs, their metric histories and a run's record (the evaluation report and `compare`),
finding a pipeline's parent run by its kfp.pipeline_run_id and its stages' errors (the runner and the KFP exit
task), registering the pipeline's final model, the console's views of runs (RunView, find_pipeline_runs,
last_step, kill_runs, artifacts), and the tracking server's database schema (the Helm chart's migration job).
The stores are opened by `dsaforge.tracking._client`, the same way the write side opens them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dsaforge.config import Config, ConfigError
from dsaforge.tracking import _client, resolve_tracking_uri


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
    try:
        client = _client(uri)
        exp = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    except Exception:  # noqa: BLE001 - the store being down must not hide the stage's own error
        return []
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


# --- the tracking server's database (the Helm chart's migration job and the server's start-up gate) ---

def upgrade_store(db_uri: str) -> str:
    """Bring an MLflow SQL store and its basic-auth tables to the installed MLflow's schema; returns the revision.
    An empty database gets the tables created; an older one is migrated (back it up first)."""
    from mlflow.server.auth.db import utils as auth_db
    from mlflow.store.db import utils as db

    engine = db.create_sqlalchemy_engine_with_retry(db_uri)
    try:
        if db._all_tables_exist(engine):
            db._upgrade_db(engine)
        else:
            db._initialize_tables(engine)
        auth_db.migrate(engine, "head")
        return db._get_schema_version(engine)
    finally:
        engine.dispose()


def store_schema(db_uri: str) -> tuple[Optional[str], str]:
    """(the store's schema revision or None, the revision the installed MLflow expects)."""
    import sqlalchemy
    from mlflow.store.db import utils as db

    engine = sqlalchemy.create_engine(db_uri)
    try:
        current = db._get_schema_version(engine) if db._all_tables_exist(engine) else None
        return current, db._get_latest_schema_revision()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------- reading runs
# What the console shows of a pipeline run: its parent run, found by the kfp.pipeline_run_id tag (so the same lookup
# serves local runs and cluster runs, whose parent is opened inside the pipeline), and one child run per stage.

@dataclass
class RunView:
    run_id: str
    experiment_id: str
    name: str
    status: str                     # MLflow's: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    start: Optional[float]          # seconds since the epoch
    end: Optional[float]
    tags: dict[str, str]
    metrics: dict[str, float]


def _view(run) -> RunView:
    info = run.info
    return RunView(info.run_id, info.experiment_id, info.run_name or info.run_id, info.status,
                   info.start_time / 1000 if info.start_time else None, info.end_time / 1000 if info.end_time else None,
                   dict(run.data.tags), dict(run.data.metrics))


def find_pipeline_runs(uri: str, experiment: str, pipeline_run_id: str) -> tuple[Optional[RunView], list[RunView]]:
    """The parent run of a pipeline run and its stage children (children empty, parent None, until they exist)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`kfp.pipeline_run_id` = '{pipeline_run_id}'")
    parents = [_view(r) for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        return None, []
    parent = parents[0]
    children = [_view(r) for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
    return parent, sorted(children, key=lambda r: r.start or 0)


def last_step(uri: str, run_id: str, key: str) -> Optional[int]:
    history = _client(uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def kill_runs(uri: str, run_ids: list[str], reason: str) -> None:
    """Mark still-running runs KILLED with a `dsaforge.error` saying why (a cancelled or interrupted pipeline)."""
    client = _client(uri)
    for run_id in run_ids:
        client.set_tag(run_id, "dsaforge.error", reason[:4000])
        client.set_terminated(run_id, "KILLED")


def list_run_artifacts(uri: str, run_id: str, path: Optional[str] = None, depth: int = 2) -> list[str]:
    """Artifact files of a run (not folders), up to `depth` folders down."""
    client = _client(uri)
    out = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            if depth > 0:
                out += list_run_artifacts(uri, run_id, item.path, depth - 1)
        else:
            out.append(item.path)
    return out


def download_run_artifact(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
