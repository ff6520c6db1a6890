"""The stage-run lifecycle as components and the CLI use it, and the cluster path of the pipeline's parent run.

Run: python -m pytest tests/components/test_runtime.py -q  (starts a real `mlflow server` on 127.0.0.1)
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import dsaforge
from dsaforge.components.runtime import close_pipeline_run, open_pipeline_run, run_component
from dsaforge.config import load_config
from tests.helpers import MlflowServer

ROOT = Path(dsaforge.__file__).resolve().parent.parent
SOURCES = ["dsaforge", "components", "pipelines", "model", "synth", "eval", "kernels"]


def test_only_dsaforge_tracking_imports_mlflow():
    importers = []
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            if re.search(r"^\s*(import mlflow|from mlflow)", path.read_text(), re.M):
                importers.append(str(path.relative_to(ROOT)))
    assert sorted(importers) == ["dsaforge/tracking.py", "dsaforge/tracking_query.py"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _config_json(tmp_path, *sets):
    cfg = load_config("tiny", overrides=[f"pipeline.home={tmp_path / 'home'}", "tracking.system_metrics=false",
                                         "data.max_documents=60", "data.tokenizer_train_bytes=200000", *sets])
    assert cfg.tracking.uri is None
    return json.dumps(cfg.model_dump())


def _runs(uri, kfp_run_id):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dsaforge")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`kfp.pipeline_run_id` = '{kfp_run_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_cluster_path_opens_tracks_and_closes_through_mlflow_tracking_uri(tmp_path, server, monkeypatch):
    """On a cluster the URI comes only from MLFLOW_TRACKING_URI (tracking_uri="", tracking.uri=None) and the exit
    task knows only the KFP run id; the parent must still be found and closed, never a stage run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    config_json = _config_json(tmp_path)
    parent = open_pipeline_run(config_json, "", "end-to-end", "kfp-job-ok", "")
    summary = run_component("prepare-data", config_json, "", parent, str(tmp_path / "data"), metadata=(meta := {}))
    assert summary["documents"] == 60 and meta["mlflow_run_id"]
    close_pipeline_run(config_json, "", "", "kfp-job-ok", "SUCCEEDED")
    parents, children = _runs(server, "kfp-job-ok")
    assert [p.info.run_id for p in parents] == [parent] and parents[0].info.status == "FINISHED"
    assert [(c.data.tags["dsaforge.stage"], c.info.status) for c in children] == [("prepare-data", "FINISHED")]
    assert children[0].data.tags["mlflow.parentRunId"] == parent


def test_cluster_path_failure_marks_stage_and_parent(tmp_path, server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    config_json = _config_json(tmp_path, f"data.sources=[{tmp_path / 'missing'}]")
    parent = open_pipeline_run(config_json, "", "end-to-end", "kfp-job-bad", "")
    with pytest.raises(Exception, match="missing"):
        run_component("prepare-data", config_json, "", parent, str(tmp_path / "data"))
    close_pipeline_run(config_json, "", "", "kfp-job-bad", "FAILED", "prepare-data failed")
    parents, children = _runs(server, "kfp-job-bad")
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["dsaforge.error"] == "prepare-data failed"
    child = children[0]
    assert child.info.status == "FAILED" and "missing" in child.data.tags["dsaforge.error"]
    client = mlflow.MlflowClient(tracking_uri=server)
    assert "error.json" in [a.path for a in client.list_artifacts(child.info.run_id)]


def test_cli_stage_records_its_failure_like_a_component(tmp_path):
    """`dsaforge stage` goes through the same lifecycle: a failed stage's run has the error tag and traceback."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "dsaforge", "stage", "prepare-data", "--preset", "tiny",
                           "--out", str(tmp_path / "out"), "--set", f"tracking.uri={uri}",
                           "--set", "tracking.system_metrics=false",
                           "--set", f"data.sources=[{tmp_path / 'missing'}]"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dsaforge").experiment_id])
    assert run.info.status == "FAILED" and "missing" in run.data.tags["dsaforge.error"]
    assert "error.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
