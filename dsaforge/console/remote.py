"""The remote backend: runs go to a Kubeflow Pipelines cluster through `dsaforge.cluster` (the same submit, get and
cancel calls as `dsaforge submit` and `dsaforge runs`), queued in the console's store like local runs.

`tick()` submits queued runs and polls running ones (at most every `poll_s`); the KFP run id is the pipeline run
id that the cluster's open-run task tags the MLflow parent run with, so per-step status comes from MLflow as for
local runs, with KFP's own task states filling in what tracking has not recorded yet.
"""
from __future__ import annotations

import time

from dsaforge.config import Config, ConfigError, validate
from dsaforge.console.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Run, Store

_FINAL = {"SUCCEEDED": SUCCEEDED, "FAILED": FAILED, "CANCELED": CANCELLED, "CANCELLED": CANCELLED,
          "SKIPPED": CANCELLED}
_TASKS = {"SUCCEEDED": "succeeded", "SKIPPED": "skipped", "FAILED": "failed", "RUNNING": "running",
          "CANCELED": "failed", "CANCELLED": "failed", "CANCELING": "running", "PENDING": "pending"}


def _line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RemoteBackend:
    kind = "kfp"

    def __init__(self, store: Store, host: str, poll_s: float = 5.0) -> None:
        self.store, self.host, self.poll_s = store, host, poll_s
        self._last_poll = 0.0
        self._tasks: dict[str, dict[str, str]] = {}      # run id -> KFP task display name -> state

    def check(self, cfg: Config) -> None:
        """What a cluster run needs that a laptop run does not (a tracking server every pod reaches)."""
        from dsaforge import cluster

        cluster.check_submittable(cfg)

    def submit(self, run: Run) -> None:
        pass                                        # tick() submits it, so a slow cluster never blocks the form

    def tick(self) -> None:
        from dsaforge import cluster

        for run in reversed(self.store.list(status=(QUEUED,))):
            if run.backend != self.kind:
                continue
            try:
                submitted = cluster.submit(run.pipeline, validate(run.config, where="submitted config"), self.host,
                                           run_name=f"{run.pipeline} ({run.preset}) {run.id[:8]}")
            except Exception as e:  # noqa: BLE001 - the run records why the cluster refused it
                self.store.update(run.id, only_if=(QUEUED,), status=FAILED, finished=time.time(),
                                  error=f"submitting to {self.host}: {_line(e)}")
                continue
            self.store.update(run.id, only_if=(QUEUED,), status=RUNNING, started=time.time(),
                              remote_id=submitted.run_id, remote_url=submitted.url)
        if time.time() - self._last_poll < self.poll_s:
            return
        self._last_poll = time.time()
        for run in self.store.list(status=(RUNNING,)):
            if run.backend == self.kind and run.remote_id:
                self._poll(run)

    def _poll(self, run: Run) -> None:
        from dsaforge import cluster

        try:
            info = cluster.get_run(self.host, run.remote_id)
        except Exception as e:  # noqa: BLE001 - an unreachable cluster leaves the run as it was; shown as a note
            self.store.update(run.id, note=f"KFP at {self.host} did not answer: {_line(e)}")
            return
        self._tasks[run.id] = {name: _TASKS.get(state or "", "pending") for name, state in info.get("tasks", {}).items()}
        final = _FINAL.get(info.get("state") or "")
        if final:
            self.store.update(run.id, only_if=(RUNNING,), status=final, finished=time.time(),
                              error=info.get("error") or None)
        elif run.note and run.note.startswith("KFP at"):
            self.store.update(run.id, note=None)

    def cancel(self, run: Run) -> None:
        from dsaforge import cluster

        if run.remote_id:
            cluster.cancel_run(self.host, run.remote_id)
        self.store.update(run.id, only_if=(QUEUED, RUNNING), status=CANCELLED, finished=time.time(),
                          note="cancelled from the console")

    def resume(self, run: Run) -> None:
        raise ConfigError("resuming from the failed step is for local runs; re-submit to run it on the cluster again")

    def recover(self) -> list[Run]:
        return []                                   # the cluster kept running; the next poll catches up

    def log_tail(self, run: Run, lines: int = 60) -> str:
        return f"logs are in the KFP UI: {run.remote_url}\n" if run.remote_url else ""

    def executor_outputs(self, run: Run) -> dict[str, dict]:
        return {}

    def task_states(self, run: Run) -> dict[str, str]:
        return self._tasks.get(run.id, {})
