"""`dsaforge run --resume`: a pipeline that failed in its third step re-runs only that step and the ones after it,
under the same MLflow parent run, with the finished steps' outputs imported rather than recomputed.

Run: python -m pytest tests/test_resume.py -q   (two local runs of the tiny pretraining pipeline)
"""
import json
import os
import subprocess
import sys

import mlflow
import pytest

pytestmark = pytest.mark.slow


def _run(home, *extra):
    return subprocess.run([sys.executable, "-m", "dsaforge", "run", "pretraining", "--set", f"pipeline.home={home}",
                           "--set", "tracking.system_metrics=false", *extra],
                          capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})


def test_resume_reruns_only_the_failed_step_and_after(tmp_path):
    home = tmp_path / ".dsaforge"
    fast = ["--preset", "tiny", "--set", "train.pretrain.steps=4", "--set", "train.warmup.steps=4",
            "--set", "train.sparse.steps=4"]
    # warmup diverges at its first step (an infinite indexer-loss weight: a fault found only at run time; a batch
    # that does not divide into micro-batches is now refused when the config is validated)
    failed = _run(home, *fast, "--set", "train.warmup.indexer_loss_weight=.inf")
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "warmup" in failed.stderr and "--resume" in failed.stderr
    (record,) = (home / "runs").iterdir()
    summary = json.loads((record / "summary.json").read_text())
    assert summary["state"] == "FAILED" and set(summary["finished"]) == {"prepare-data", "pretrain"}
    pretrain_ckpt = sorted((home / "kfp").glob("pretraining-*/pretrain/model/hf/*.safetensors"))
    mtimes = {p: p.stat().st_mtime_ns for p in pretrain_ckpt}

    resumed = _run(home, "--resume", summary["pipeline_run_id"][:8], "--set", "train.warmup.indexer_loss_weight=1.0")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    new = json.loads(max((home / "runs").iterdir(), key=lambda p: p.stat().st_mtime).joinpath("summary.json")
                     .read_text())
    assert new["state"] == "SUCCEEDED" and set(new["reused"]) == {"prepare-data", "pretrain"}
    assert set(new["finished"]) == {"warmup", "sparse"}                     # only these ran
    assert {p: p.stat().st_mtime_ns for p in pretrain_ckpt} == mtimes       # earlier outputs untouched

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsaforge")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_id == summary["mlflow_run_id"] and parent.info.status == "FINISHED"
    children = sorted((r.data.tags["dsaforge.stage"], r.info.status) for r in runs
                      if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == [("prepare-data", "FINISHED"), ("pretrain", "FINISHED"), ("sparse", "FINISHED"),
                        ("warmup", "FAILED"), ("warmup", "FINISHED")]
