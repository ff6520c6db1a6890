"""The kfp backend: runs submitted from the form go through dsaforge.cluster (the real kfp.Client) to a local server
speaking KFP's v2beta1 API; their steps come from MLflow (a real `mlflow server`), where the cluster's open-run task
tags the parent run with the KFP run id, and from KFP's task states.

Run: python -m pytest tests/console/test_remote.py -q
"""
import json
import time

import pytest
import requests

from dsaforge import tracking
from dsaforge.config import load_config
from dsaforge.console import Settings
from tests.console.conftest import Served, csrf_of, error_line, mlflow_server
from tests.fake_kfp import FakeKfp
from tests.helpers import free_port

TOKEN = "kfp-sa-token"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    mp = pytest.MonkeyPatch()
    mp.setenv("KFP_TOKEN", TOKEN)
    mp.setenv("HOME", str(root))                       # no ~/.config/kfp context file from the machine
    mp.delenv("KFP_HOST", raising=False)
    with mlflow_server(root) as mlflow, FakeKfp(token=TOKEN) as kfp:
        settings = Settings(home=root / ".dsaforge", port=free_port(), tracking_uri=mlflow, kfp_host=kfp.url,
                            poll_s=0.3, remote_poll_s=0.3)
        with Served(settings, cancel_on_exit=False) as served:
            yield served, kfp, mlflow
    mp.undo()


def wait_run(served, run_id, predicate, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        run = requests.get(f"{served.url}/api/runs/{run_id}", timeout=60).json()
        if predicate(run):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id}: {json.dumps(run)[:2000]}")


def submit(served, **fields):
    s = served.session()
    data = {"csrf": csrf_of(s), "pipeline_name": "end-to-end", "preset": "small", "backend": "kfp", **fields}
    return s.post(served.url + "/submit", data=data, allow_redirects=False, timeout=120)


def test_a_run_goes_to_the_cluster_and_its_steps_come_from_mlflow_and_kfp(cluster):
    served, kfp, mlflow = cluster
    assert '<option value="kfp"' in requests.get(served.url + "/submit", timeout=60).text
    r = submit(served, **{"train.sparse.lr": "1e-5"})
    assert r.status_code == 303, error_line(r.text)
    run_id = r.headers["location"].rsplit("/", 1)[1]
    run = wait_run(served, run_id, lambda r: r["status"] == "running")
    (kfp_id,) = kfp.runs
    assert run["remote_url"] == f"{kfp.url}/#/runs/details/{kfp_id}"
    body = next(r["body"] for r in kfp.requests if r["method"] == "POST" and r["path"].endswith("/runs"))
    config = json.loads(body["runtime_config"]["parameters"]["config_json"])
    assert config["train"]["sparse"]["lr"] == 1e-5 and config["tracking"]["uri"] == mlflow
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in kfp.requests)

    # What the cluster's open-run and prepare-data tasks do: the parent tagged with the KFP run id, a child run.
    cfg = load_config("small", overrides=[f"tracking.uri={mlflow}"])
    parent = tracking.start_pipeline_run(cfg, "end-to-end", kfp_id, pipeline_run_url="")
    child = tracking.start_stage_run(cfg, "prepare-data", parent_run_id=parent.run_id)
    child.finish("FINISHED")
    kfp.runs[kfp_id].update(state="RUNNING", run_details={"task_details": [
        {"display_name": "prepare-data", "state": "SUCCEEDED"}, {"display_name": "pretrain", "state": "RUNNING"}]})
    run = wait_run(served, run_id, lambda r: [s["state"] for s in r["steps"]][:2] == ["succeeded", "running"])
    assert run["mlflow_run_id"] == parent.run_id
    assert {s["name"]: s["mlflow_run_id"] for s in run["steps"]}["prepare-data"] == child.run_id
    assert run["log_tail"] == f"logs are in the KFP UI: {run['remote_url']}\n"

    kfp.runs[kfp_id]["state"] = "SUCCEEDED"
    wait_run(served, run_id, lambda r: r["status"] == "succeeded")
    page = requests.get(f"{served.url}/runs/{run_id}", timeout=60).text
    assert f'href="{mlflow}/#/experiments/' in page and "resume" not in page.lower().split("<h2>steps")[0]


def test_cancel_terminates_the_kfp_run(cluster):
    served, kfp, _ = cluster
    before = set(kfp.runs)
    run_id = submit(served).headers["location"].rsplit("/", 1)[1]
    wait_run(served, run_id, lambda r: r["status"] == "running")
    (kfp_id,) = set(kfp.runs) - before
    s = served.session()
    r = s.post(f"{served.url}/runs/{run_id}/cancel", data={"csrf": csrf_of(s)}, allow_redirects=False, timeout=60)
    assert r.status_code == 303
    assert kfp.runs[kfp_id]["state"] == "CANCELING"
    assert served.console.store.get(run_id).status == "cancelled"


def test_a_failed_cluster_run_shows_kfp_error(cluster):
    served, kfp, _ = cluster
    before = set(kfp.runs)
    run_id = submit(served).headers["location"].rsplit("/", 1)[1]
    wait_run(served, run_id, lambda r: r["status"] == "running")
    (kfp_id,) = set(kfp.runs) - before
    kfp.runs[kfp_id].update(state="FAILED", error={"message": "pod prepare-data OOMKilled"})
    run = wait_run(served, run_id, lambda r: r["status"] == "failed")
    assert run["error"] == "pod prepare-data OOMKilled"
    r = served.session().post(f"{served.url}/runs/{run_id}/resume", timeout=60)
    assert r.status_code == 403                                       # no CSRF
    s = served.session()
    r = s.post(f"{served.url}/runs/{run_id}/resume", data={"csrf": csrf_of(s)}, timeout=60)
    assert r.status_code == 409 and "re-submit to run it on the cluster again" in error_line(r.text)


def test_cluster_runs_need_a_tracking_server(tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with FakeKfp(token=TOKEN) as kfp:
        with Served(Settings(home=tmp_path / ".dsaforge", port=free_port(), kfp_host=kfp.url)) as served:
            r = submit(served)
            assert r.status_code == 400
            assert error_line(r.text).startswith(f"tracking.uri=sqlite:///{served.console.home}/mlflow.db is a "
                                                 "local store that pods cannot share")
            assert served.console.store.list() == [] and kfp.runs == {}
            s = served.session()
            r = s.post(served.url + "/submit", data={"csrf": csrf_of(s), "pipeline_name": "end-to-end",
                                                      "backend": "slurm"}, timeout=60)
            assert error_line(r.text) == "backend 'slurm' is not configured; available: local, kfp"
