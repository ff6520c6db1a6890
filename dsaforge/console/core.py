"""What the console does, apart from HTTP: submit, cancel, re-submit and resume runs on a backend, and say where
each run is in MLflow. The web routes (`dsaforge.console.app`) only parse requests and render this."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from dsaforge.config import Config, ConfigError, validate
from dsaforge.console.graph import pipeline_graph
from dsaforge.console.local import LocalBackend
from dsaforge.console.status import RunStatus, run_status
from dsaforge.console.store import FAILED, Run, Store


@dataclass
class Settings:
    home: Path = Path(".dsaforge")
    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = None
    tracking_uri: Optional[str] = None          # default: $MLFLOW_TRACKING_URI, else SQLite under home
    mlflow_url: Optional[str] = None            # MLflow's UI; default: the tracking server, else 127.0.0.1:5000
    max_parallel: int = 1                       # local runs at once (each is a whole pipeline)
    kfp_host: Optional[str] = None              # a Kubeflow Pipelines API: enables the remote backend
    poll_s: float = 1.0                         # how often the queue starts runs and notices finished workers
    remote_poll_s: float = 5.0                  # how often running cluster runs are asked for their state


class Console:
    def __init__(self, settings: Settings) -> None:
        from dsaforge.tracking import default_tracking_uri

        self.settings = settings
        self.home = Path(settings.home).resolve()
        self.tracking_uri = (settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or default_tracking_uri(self.home))
        if settings.mlflow_url:
            self.mlflow_url = settings.mlflow_url.rstrip("/")
        elif self.tracking_uri.startswith(("http://", "https://")):
            self.mlflow_url = self.tracking_uri.rstrip("/")
        else:
            self.mlflow_url = "http://127.0.0.1:5000"   # where `dsaforge mlflow ui` serves the local store
        self.store = Store(self.home / "console" / "console.db")
        self.backends = {"local": LocalBackend(self.store, self.home, settings.max_parallel)}
        if settings.kfp_host:
            from dsaforge.console.remote import RemoteBackend

            self.backends["kfp"] = RemoteBackend(self.store, settings.kfp_host, poll_s=settings.remote_poll_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from dsaforge.tracking import ensure_store

        # Create the store before any worker does: two fresh runs racing on its schema migration break it.
        ensure_store(self.tracking_uri, str(self.home), "dsaforge")
        for backend in self.backends.values():
            for run in backend.recover():
                self._kill_tracking(run, "the console stopped while this run was running")
        self._thread = threading.Thread(target=self._loop, name="dsaforge-console-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for backend in self.backends.values():
                try:
                    backend.tick()
                except Exception as e:  # noqa: BLE001 - the queue keeps going; the next tick retries
                    print(f"dsaforge ui: {backend.kind} queue: {type(e).__name__}: {e}", flush=True)
            self._stop.wait(self.settings.poll_s)

    # ------------------------------------------------------------------ runs

    def prepare(self, cfg: Config) -> Config:
        """The config a run gets: the submitted one with the console's own home and tracking store."""
        data = cfg.model_dump()
        data["pipeline"]["home"] = str(self.home)
        data["tracking"]["uri"] = self.tracking_uri
        return validate(data, where="submitted config")

    def submit(self, pipeline: str, cfg: Config, backend: str = "local", inputs_from: Optional[str] = None,
               **links) -> Run:
        from dsaforge.pipelines import get_pipeline

        get_pipeline(pipeline)
        if backend not in self.backends:
            raise ConfigError(f"backend {backend!r} is not configured; available: {', '.join(self.backends)}")
        reuse = self.inputs(pipeline, backend, inputs_from)
        cfg = self.prepare(cfg)
        self.backends[backend].check(cfg)                  # refused before it is queued, so the form shows why
        run = self.store.add(pipeline, backend, cfg.preset, cfg.model_dump(), **links)
        self.backends[backend].submit(run, reuse)
        return run

    def inputs(self, pipeline: str, backend: str, inputs_from: Optional[str]) -> dict[str, str]:
        """A sub-pipeline's inputs (stage -> output path), taken from an earlier local run's record: the paths come
        from that record, never from the form, which only names the run."""
        from dsaforge.console.graph import needed_inputs
        from dsaforge.records import find_record

        needed = needed_inputs(pipeline)
        if not needed:
            return {}
        if backend != "local":
            raise ConfigError(f"pipeline {pipeline} starts from another run's outputs; submit it to a cluster with "
                              f"`dsaforge submit {pipeline} --input STAGE=URI`")
        source = self.get(inputs_from or "")
        if source is None:
            raise ConfigError(f"pipeline {pipeline} needs the outputs of {', '.join(needed)}: choose the run to "
                              "take them from")
        try:
            summary = json.loads((find_record(self.home, source.id) / "summary.json").read_text())
        except (ConfigError, OSError, ValueError):
            summary = {}
        outputs = {**summary.get("reused", {}), **summary.get("finished", {})}
        missing = [stage for stage in needed if stage not in outputs]
        if missing:
            raise ConfigError(f"run {source.id[:8]} has no finished output of {', '.join(missing)}")
        return {stage: outputs[stage] for stage in needed}

    def get(self, run_id: str) -> Optional[Run]:
        # Only ever look up ids of the store's own form, so no request text reaches a path or a query unchecked.
        if len(run_id) != 32 or not all(c in "0123456789abcdef" for c in run_id):
            return None
        return self.store.get(run_id)

    def cancel(self, run: Run) -> None:
        if not run.active:
            raise ConfigError(f"run {run.id[:8]} is {run.status}; only queued or running runs can be cancelled")
        self.backends[run.backend].cancel(run)
        self._kill_tracking(run, "cancelled from the console")

    def resubmit(self, run: Run, cfg: Config) -> Run:
        return self.submit(run.pipeline, cfg, run.backend, resubmit_of=run.id)

    def resume(self, run: Run) -> Run:
        """Run a failed run again from its failed step, as the same run: the steps that finished are reused (their
        outputs, not recomputed) and MLflow's parent run continues (`dsaforge run --resume`)."""
        if run.status != FAILED:
            raise ConfigError(f"run {run.id[:8]} is {run.status}; only a failed run resumes (its record says which "
                              "steps finished); re-submit the others")
        if run.backend not in self.backends:
            raise ConfigError(f"backend {run.backend!r} of run {run.id[:8]} is not configured in this console")
        self.backends[run.backend].resume(run)
        return self.store.get(run.id)

    def _kill_tracking(self, run: Run, reason: str) -> None:
        from dsaforge.tracking_query import find_pipeline_runs, kill_runs

        try:
            parent, children = find_pipeline_runs(self.tracking_uri, run.config["tracking"]["experiment"],
                                                  run.remote_id or run.id)
            live = [r.run_id for r in ([parent] if parent else []) + children if r.status == "RUNNING"]
            kill_runs(self.tracking_uri, live, reason)
        except Exception as e:  # noqa: BLE001 - the run's own state is already recorded in the queue
            print(f"dsaforge ui: could not mark run {run.id[:8]} in MLflow: {e}", flush=True)

    def status(self, run: Run) -> RunStatus:
        backend = self.backends.get(run.backend)
        outputs = backend.executor_outputs(run) if backend else {}
        tasks = backend.task_states(run) if backend and hasattr(backend, "task_states") else None
        return run_status(run, pipeline_graph(run.pipeline), self.tracking_uri, outputs, tasks)

    def log_tail(self, run: Run, lines: int = 80) -> str:
        backend = self.backends.get(run.backend)
        return backend.log_tail(run, lines) if backend else ""

    # ------------------------------------------------------------------ MLflow links

    def mlflow_run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"

    def mlflow_compare_url(self, runs: list[tuple[str, str]]) -> str:
        """MLflow's compare view for (experiment id, run id) pairs."""
        run_ids = json.dumps([r for _, r in runs])
        experiments = json.dumps(sorted({e for e, _ in runs}))
        return f"{self.mlflow_url}/#/compare-runs?runs={quote(run_ids)}&experiments={quote(experiments)}"


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""
