"""Experiment tracking, the write side. Stage code receives a `Tracker`; only this module and
`dsaforge.tracking_query` (reading runs back) import MLflow.

Run layout (same tag keys as KFP's MLflow plugin, so a cluster with the plugin on compares cleanly):
a pipeline parent run tagged kfp.pipeline_run_id / kfp.pipeline_run_url / kfp.pipeline_id, and one child run per
stage (mlflow.parentRunId). A stage in another process or pod attaches by the parent's run id.

Here: the Tracker protocol and its two implementations (NullTracker, MlflowTracker with its spool and `replay`),
opening the store (`_client`, `ensure_store`) and the run lifecycle (start_pipeline_run, start_stage_run,
stage_run, attach_run, reopen_run, close_orphans).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
import urllib.request
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


class TrackingError(ConfigError):
    """The tracking store or server cannot be used; the message names it (one line, exit 2 from the CLI)."""


def configure_requests(cfg: Config) -> None:
    """Bound every HTTP call MLflow makes: `retries` retries with exponential backoff and a per-request timeout,
    so a dead server costs about a minute by default, not MLflow's own ~4 (retries) x 120 s (timeout). MLflow
    reads these variables on every request, in this process and in the component subprocesses it starts."""
    t = cfg.tracking
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(t.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(max(0, int(round(t.backoff_s))))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(t.connect_timeout_s))))


def describe_store(uri: str) -> str:
    return f"MLflow store {uri.removeprefix('sqlite:///')}" if uri.startswith("sqlite:") else f"MLflow server at {uri}"


def store_problem(uri: str, e: BaseException) -> TrackingError:
    """One line naming the store and what is wrong with it, from whatever MLflow, SQLAlchemy or requests raised."""
    text = str(getattr(e, "orig", None) or e)
    low = text.lower()
    known = [("readonly database", "is read-only (attempt to write a readonly database)"),
             ("read-only file system", "is on a read-only file system"),
             ("file is not a database", "is not an SQLite database (corrupt or foreign file)"),
             ("database disk image is malformed", "is corrupt (database disk image is malformed)"),
             ("unable to open database file", "cannot be opened (missing folder or no permission)"),
             ("database is locked", "stayed locked by another process"),
             ("max retries exceeded", "is unreachable (gave up after its retries)"),
             ("connection refused", "refused the connection"),
             ("read timed out", "did not answer in time")]
    for needle, what in known:
        if needle in low:
            return TrackingError(f"{describe_store(uri)} {what}")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return TrackingError(f"{describe_store(uri)}: {first[:300]}")


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise creating (and migrating) a SQLite store: two processes that open a fresh store at once race in
    MLflow's schema migration and can leave it broken for good (`_alembic_tmp_* already exists`)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrackingError(f"{describe_store(uri)} cannot be created ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _create_sqlite_store(uri: str) -> None:
    """A new SQLite store is created and migrated under another name, then renamed into place: MLflow builds its
    schema in many statements, and a process killed among them would leave a store that no later run can open
    ("table ... already exists"). Call under `_store_lock`."""
    import mlflow

    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists():
        return
    part = db.with_name(db.name + ".creating")
    part.unlink(missing_ok=True)                    # left by a process killed while creating it
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{part}")._tracking_client.store
    store.engine.dispose()
    os.replace(part, db)


def _client(uri: str):
    import mlflow

    with _store_lock(uri):
        try:
            if uri.startswith("sqlite:///"):
                _create_sqlite_store(uri)
            client = mlflow.MlflowClient(tracking_uri=uri)
            client._tracking_client.store          # opening the store creates and migrates its schema
        except Exception as e:  # noqa: BLE001 - every store failure becomes one line naming the store
            raise store_problem(uri, e) from None
    return client


def _experiment_id(client, name: str, artifact_root: Optional[str]) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_root(uri: str, home: str, experiment: str) -> Optional[str]:
    # With a local SQLite store, keep artifacts beside it under the home dir rather than in ./mlruns of the cwd.
    if uri.startswith("sqlite:///"):
        return (Path(home).resolve() / "mlartifacts" / experiment).as_uri()
    return None


class MlflowTracker:
    """A Tracker bound to one MLflow run through MlflowClient (no global active-run state).

    Tracking never stops or loses a stage's work: the first call that fails (after the bounded retries of
    `configure_requests`) switches the tracker offline, and that call and every later one are appended to a spool
    file (JSON lines) instead. `finish()` replays the spool once when the store answers again, else says in one
    line what was not logged and where it is kept (`dsaforge tracking replay SPOOL` logs it later)."""

    def __init__(self, uri: str, run_id: str, system_metrics_interval_s: Optional[float] = None,
                 spool_dir: Optional[str | Path] = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = _client(uri)
        self._monitor = None
        self.offline: Optional[str] = None       # why tracking stopped, once it did
        self.spool = Path(spool_dir or ".dsaforge/spool") / f"{run_id}.jsonl"
        self.spooled = 0
        if system_metrics_interval_s:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=system_metrics_interval_s,
                                                 tracking_uri=uri)
            self._monitor.start()

    # -- every call goes through _call: sent, or kept on disk ----------------------------------------------------
    def _call(self, op: str, **args) -> None:
        if self.offline is None:
            try:
                _apply(self._client, self.run_id, op, args)
                return
            except Exception as e:  # noqa: BLE001 - tracking must not stop the stage
                self.offline = str(store_problem(self.uri, e))
                print(f"dsaforge: warning: {self.offline}; the stage goes on and keeps what it logs in "
                      f"{self.spool}", file=sys.stderr, flush=True)
                self._stop_monitor()
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(json.dumps({"op": op, **args}, default=str) + "\n")
        self.spooled += 1

    def log_params(self, params):
        items = {k: str(v)[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):
            self._call("params", params={k: items[k] for k in keys[i:i + 100]})

    def log_metrics(self, metrics, step=None):
        import time

        self._call("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step or 0,
                   ts=int(time.time() * 1000))

    def log_artifact(self, path, artifact_path=None):
        self._call("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_artifacts(self, path, artifact_path=None):
        self._call("artifacts", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_dict(self, obj, name):
        self._call("dict", obj=obj, name=name)

    def log_dataset(self, name, source, digest, context="training", profile=None):
        self._call("dataset", name=name, source=source, digest=digest, context=context, profile=dict(profile or {}))

    def set_tags(self, tags):
        self._call("tags", tags={k: str(v) for k, v in tags.items()})

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.finish()
            except Exception:  # noqa: BLE001 - its last samples are not worth failing the stage over
                pass

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
        """Close the run. Never raises for tracking reasons: a stage that did its work has done it."""
        self._stop_monitor()
        if self.offline is not None and self.spool.exists():
            try:
                replay(self.spool, self.uri, self.run_id, client=self._client)
                self.offline = None
            except TrackingError as e:
                print(f"dsaforge: warning: {e}; {self.spooled} tracking call(s) of run {self.run_id} were not "
                      f"logged, kept in {self.spool} (`dsaforge tracking replay {self.spool}` logs them)",
                      file=sys.stderr, flush=True)
                return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001
            print(f"dsaforge: warning: {store_problem(self.uri, e)}; run {self.run_id} was not marked {status}",
                  file=sys.stderr, flush=True)


def _apply(client, run_id: str, op: str, a: dict) -> None:
    """Send one tracking call (live, or replayed from a spool)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    if op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in a["params"].items()])
    elif op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, a["ts"], a["step"]) for k, v in a["metrics"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, a["path"], a["artifact_path"])
    elif op == "artifacts":
        client.log_artifacts(run_id, a["path"], a["artifact_path"])
    elif op == "dict":
        client.log_dict(run_id, a["obj"], a["name"])
    elif op == "dataset":
        source = a["source"]
        ds = Dataset(name=a["name"], digest=a["digest"],
                     source_type="local" if "://" not in source else source.split("://")[0],
                     source=json.dumps({"uri": source}), profile=json.dumps(a["profile"]))
        client.log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", a["context"])])])
    elif op == "tags":
        for k, v in a["tags"].items():
            client.set_tag(run_id, k, v)
    else:
        raise ValueError(f"unknown tracking call {op!r}")


def replay(spool: str | Path, uri: str, run_id: Optional[str] = None, client=None) -> int:
    """Send a spool's calls to its run (the file is named after the run id); the spool is removed once all went
    through. Returns how many calls were sent."""
    spool = Path(spool)
    run_id = run_id or spool.stem
    client = client or _client(uri)
    lines = spool.read_text().splitlines()
    try:
        for line in lines:
            call = json.loads(line)
            _apply(client, run_id, call.pop("op"), call)
    except Exception as e:  # noqa: BLE001
        raise store_problem(uri, e) from None
    spool.unlink()
    return len(lines)


def pipeline_tags(cfg: Config, pipeline: str, pipeline_run_id: str, pipeline_run_url: str) -> dict[str, str]:
    return {"kfp.pipeline_run_id": pipeline_run_id, "kfp.pipeline_run_url": pipeline_run_url,
            "kfp.pipeline_id": pipeline, "dsaforge.preset": cfg.preset, "dsaforge.config_hash": config_hash(cfg),
            "mlflow.source.git.commit": _git_commit(), "dsaforge.version": __import__("dsaforge").__version__}


def start_pipeline_run(cfg: Config, pipeline: str, pipeline_run_id: str, pipeline_run_url: str) -> MlflowTracker:
    """Create the parent run of a pipeline; stages attach to it with `start_stage_run(..., parent_run_id)`."""
    uri = resolve_tracking_uri(cfg)
    configure_requests(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    client = _client(uri)
    try:
        exp = _experiment_id(client, cfg.tracking.experiment,
                             _artifact_root(uri, cfg.pipeline.home, cfg.tracking.experiment))
        tags = pipeline_tags(cfg, pipeline, pipeline_run_id, pipeline_run_url)
        run = client.create_run(exp, run_name=f"{pipeline}-{pipeline_run_id[:8]}", tags=tags)
    except Exception as e:  # noqa: BLE001
        raise store_problem(uri, e) from None
    tracker = MlflowTracker(uri, run.info.run_id, spool_dir=Path(cfg.pipeline.home) / "spool")
    tracker.log_params(flatten(cfg))
    tracker.log_dict(cfg.model_dump(), "config.json")
    return tracker


def start_stage_run(cfg: Config, stage: str, parent_run_id: Optional[str] = None,
                    tracking_uri: Optional[str] = None, resume_run_id: Optional[str] = None) -> MlflowTracker:
    """Create a stage's run: a child of `parent_run_id` when given (from any process or pod), else top-level.
    `resume_run_id`: the run of this stage's earlier, interrupted attempt (recorded in its output directory); it
    is reopened so that one stage keeps one run and one loss curve across kills."""
    uri = tracking_uri or resolve_tracking_uri(cfg)
    configure_requests(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    client = _client(uri)
    interval = cfg.tracking.system_metrics_interval_s if cfg.tracking.system_metrics else None
    spool = Path(cfg.pipeline.home) / "spool"
    try:
        if resume_run_id:
            try:
                old = client.get_run(resume_run_id)
            except Exception:  # noqa: BLE001 - gone (another store): start a new run
                old = None
            if old is not None and old.data.tags.get("dsaforge.stage") == stage:
                client.update_run(resume_run_id, status="RUNNING")
                client.set_tag(resume_run_id, "dsaforge.resumed", "true")
                return MlflowTracker(uri, resume_run_id, system_metrics_interval_s=interval, spool_dir=spool)
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
    except Exception as e:  # noqa: BLE001
        raise store_problem(uri, e) from None
    tracker = MlflowTracker(uri, run.info.run_id, system_metrics_interval_s=interval, spool_dir=spool)
    tracker.log_params(flatten(cfg))
    return tracker


@contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
              enabled: bool = True, out_dir: Optional[Path] = None) -> Iterator[Tracker]:
    """The one lifecycle of a stage's run, for every caller (CLI, KFP component, the in-process chain).

    Opens the run (a child of `parent_run_id` when given), yields its tracker, and closes it FINISHED; when the
    body raises, the run gets a `dsaforge.error` tag and an `error.json` traceback and is closed FAILED.
    `enabled=False` yields a NullTracker (no MLflow). With `out_dir`, an output the stage may not write into is
    refused before any run is opened, and a resumed training stage reopens the run of its interrupted attempt."""
    resume = None
    if out_dir is not None:
        from dsaforge.outputs import check_out_dir, previous_run_id
        from dsaforge.stages import get_stage

        resumable = get_stage(stage).resumable
        check_out_dir(Path(out_dir), stage, resumable)
        resume = previous_run_id(Path(out_dir), stage) if resumable else None
    tracker: Tracker = (start_stage_run(cfg, stage, parent_run_id=parent_run_id or None,
                                        tracking_uri=tracking_uri or None, resume_run_id=resume)
                        if enabled else NullTracker())
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


def close_orphans(uri: str, parent_run_id: str) -> list[str]:
    """Mark the child runs of `parent_run_id` still RUNNING as KILLED (their process died with the pipeline)."""
    client = _client(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    orphans = [r.info.run_id for r in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'")]
    for run_id in orphans:
        client.set_tag(run_id, "dsaforge.error", "interrupted: the pipeline's process died before this stage ended")
        client.set_terminated(run_id, "KILLED")
    return orphans


def ensure_store(uri: str, home: str, experiment: str) -> str:
    """Create the store and the experiment before any run writes to them (the console does at start, so its first
    runs find both); returns the experiment id."""
    client = _client(uri)
    return _experiment_id(client, experiment, _artifact_root(uri, home, experiment))
