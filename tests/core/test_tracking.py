"""Run: python -m pytest tests/core/test_tracking.py -q  (starts a real `mlflow server` on 127.0.0.1)"""
import subprocess
import sys
import time

import mlflow
import pytest

from dsaforge.config import ConfigError, config_hash, load_config
from dsaforge.tracking import check_reachable, start_pipeline_run, start_stage_run
from tests.helpers import free_port, stop, wait_http


def _cfg(tmp_path, uri=None):
    sets = [f"pipeline.home={tmp_path / 'home'}", "tracking.system_metrics=false"]
    if uri:
        sets.append(f"tracking.uri={uri}")
    return load_config("tiny", overrides=sets)


def _exercise(cfg, tmp_path):
    parent = start_pipeline_run(cfg, "end-to-end", "run-123", "file:///runs/123")
    child = start_stage_run(cfg, "prepare-data", parent_run_id=parent.run_id)
    for step in range(3):
        child.log_metrics({"loss": 3.0 - step, "lr": 0.1}, step=step)
    art = tmp_path / "manifest.json"
    art.write_text('{"rows": 3}')
    child.log_artifact(art)
    child.log_dataset("corpus", "python-stdlib", "abc123", profile={"documents": 3})
    child.finish()
    parent.finish()
    return parent.run_id, child.run_id


def _check(uri, cfg, parent_id, child_id):
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent, child = client.get_run(parent_id), client.get_run(child_id)
    for key, value in {"kfp.pipeline_run_id": "run-123", "kfp.pipeline_run_url": "file:///runs/123",
                       "kfp.pipeline_id": "end-to-end", "dsaforge.preset": "tiny",
                       "dsaforge.config_hash": config_hash(cfg)}.items():
        assert parent.data.tags[key] == value and child.data.tags[key] == value
    assert "mlflow.source.git.commit" in parent.data.tags
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.tags["dsaforge.stage"] == "prepare-data"
    assert child.data.params["model.dim"] == "64" and child.data.params["train.sparse.lr"] == "0.0003"
    history = client.get_metric_history(child_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(child_id)] == ["manifest.json"]
    assert child.inputs.dataset_inputs[0].dataset.digest == "abc123"
    assert parent.info.status == child.info.status == "FINISHED"
    found = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [r.info.run_id for r in found] == [child_id]


def test_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    parent_id, child_id = _exercise(cfg, tmp_path)
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert (tmp_path / "home" / "mlflow.db").exists()
    _check(uri, cfg, parent_id, child_id)
    # artifacts sit under the home directory, not in the working directory
    assert list((tmp_path / "home" / "mlartifacts").rglob("manifest.json"))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
        yield url
    finally:
        stop(proc)


def test_real_server(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = _cfg(tmp_path)                         # no tracking.uri: the environment variable decides
    parent_id, child_id = _exercise(cfg, tmp_path)
    _check(mlflow_server, cfg, parent_id, child_id)


def test_unreachable_server_fails_fast_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(tmp_path, uri)
    t0 = time.time()
    with pytest.raises(ConfigError, match=rf"MLflow server at {uri} is unreachable"):
        start_pipeline_run(cfg, "end-to-end", "x", "")
    assert time.time() - t0 < 5
    check_reachable(f"sqlite:///{tmp_path}/x.db", 1.0)   # non-HTTP stores are not probed
