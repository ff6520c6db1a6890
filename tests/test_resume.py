"""`dsaforge run --resume`: a pipeline whose process was killed during its third step re-runs only that step and
the ones after it, under the same MLflow parent run, with the finished steps' outputs imported, not recomputed.

Run: python -m pytest tests/test_resume.py -q   (two local runs of the tiny pretraining pipeline)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

FAST = ["--preset", "tiny", "--set", "tracking.system_metrics=false", "--set", "data.max_documents=120",
        "--set", "train.pretrain.steps=4", "--set", "train.warmup.steps=4", "--set", "train.sparse.steps=4"]


def _cmd(home, *extra):
    return [sys.executable, "-m", "dsaforge", "run", "pretraining", "--set", f"pipeline.home={home}", *extra]


def _env():
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


@pytest.mark.slow
def test_killed_run_resumes_from_the_interrupted_step(tmp_path):
    home = tmp_path / ".dsaforge"
    # The injected failure: the whole run is killed (SIGKILL to its process group) once warmup's run has started.
    log = tmp_path / "killed-run.log"
    proc = subprocess.Popen(_cmd(home, *FAST), stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"

    def warmup_started():
        # the store is only opened once pretrain has finished (a client opening it while the run creates it would
        # race the run's schema migration)
        if not list((home / "kfp").rglob("pretrain/executor_output.json")):
            return False
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("dsaforge")
        return bool(client.search_runs([exp.experiment_id], "tags.`dsaforge.stage` = 'warmup'"))

    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline and not warmup_started():
        time.sleep(1)
    assert proc.poll() is None, f"the run ended before warmup started: {log.read_text()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    (record,) = (home / "runs").iterdir()
    first = json.loads((record / "summary.json").read_text())
    assert first["state"] == "RUNNING"                          # it never got to write its end
    pretrain_ckpt = sorted((home / "kfp").rglob("pretrain/model/hf/*.safetensors"))
    assert pretrain_ckpt
    mtimes = {p: p.stat().st_mtime_ns for p in pretrain_ckpt}

    resumed = subprocess.run(_cmd(home, "--resume", first["pipeline_run_id"][:8]), capture_output=True, text=True,
                             timeout=1200, env=_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    new = json.loads(max((home / "runs").iterdir(), key=lambda p: p.name).joinpath("summary.json").read_text())
    assert new["state"] == "SUCCEEDED" and set(new["reused"]) == {"prepare-data", "pretrain"}
    assert set(new["finished"]) == {"warmup", "sparse"}                     # only these ran
    resumed_dir = Path(new["kfp_run_dir"])
    assert not (resumed_dir / "pretrain").exists() and (resumed_dir / "warmup").is_dir()
    assert {p: p.stat().st_mtime_ns for p in pretrain_ckpt} == mtimes       # earlier outputs untouched

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dsaforge")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_id == first["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["dsaforge.reused"] == "prepare-data,pretrain"
    children = sorted((r.data.tags["dsaforge.stage"], r.info.status) for r in runs
                      if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == [("prepare-data", "FINISHED"), ("pretrain", "FINISHED"), ("sparse", "FINISHED"),
                        ("warmup", "FINISHED"), ("warmup", "KILLED")]


def test_resume_refuses_a_finished_or_unknown_run(tmp_path):
    from dsaforge.cli import main

    home = tmp_path / ".dsaforge"
    (home / "runs" / "20260101-000000-pretraining-abcdef12").mkdir(parents=True)
    (home / "runs" / "20260101-000000-pretraining-abcdef12" / "summary.json").write_text(json.dumps(
        {"pipeline": "pretraining", "pipeline_run_id": "abcdef12" * 4, "state": "SUCCEEDED"}))
    (home / "runs" / "20260101-000000-pretraining-abcdef12" / "config.yaml").write_text("preset: tiny\n")
    assert main(["run", "pretraining", "--resume", "abcdef12", "--set", f"pipeline.home={home}"]) == 2
    assert main(["run", "pretraining", "--resume", "0000", "--set", f"pipeline.home={home}"]) == 2
