"""One local run in its own process: `python -m dsaforge.console.worker RUN_DIR`.

KFP's local runner is process-global and blocking, so the console starts one of these per run, in a new process
session (cancel stops the whole group, components included). RUN_DIR is a folder the console made for the run:
`job.json` (run id, pipeline, validated config, the queue's database) in it, the KFP pipeline root `kfp/` and the
log beside it. The worker records its own start and outcome in the queue, so a run finishes and is recorded even
while the console is down.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from dsaforge.console.store import FAILED, QUEUED, RUNNING, SUCCEEDED, Store


def main(run_dir: str) -> int:
    run_dir = Path(run_dir)
    job = json.loads((run_dir / "job.json").read_text())
    store = Store(job["db"])
    if not store.update(job["id"], only_if=(QUEUED, RUNNING), status=RUNNING, started=time.time(), pid=os.getpid()):
        print(f"run {job['id']} is no longer queued; nothing to do", flush=True)
        return 0
    try:
        from dsaforge.config import validate
        from dsaforge.runner import run_local

        cfg = validate(job["config"], where="submitted config")
        print(f"run {job['id']}: pipeline {job['pipeline']}, preset {cfg.preset}", flush=True)
        resume = {"resume": job["id"]} if job.get("resume") else {}     # the same run, from its failed step
        result = run_local(job["pipeline"], cfg, run_id=job["id"], kfp_root=run_dir / "kfp", **resume)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the run's one-line error
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        store.update(job["id"], only_if=(RUNNING,), status=FAILED, finished=time.time(), error=msg[:2000])
        return 1
    print(f"pipeline {result.name} finished in {result.seconds:.0f}s; MLflow run {result.mlflow_run_id}", flush=True)
    store.update(job["id"], only_if=(RUNNING,), status=SUCCEEDED, finished=time.time(),
                 mlflow_run_id=result.mlflow_run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
