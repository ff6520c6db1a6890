"""`dsaforge submit` and `dsaforge runs` through kfp.Client against a local server speaking KFP's v2beta1 API.

Run: python -m pytest tests/core/test_submit.py -q
"""
import json

import pytest

from dsaforge.cli import main
from tests.fake_kfp import FakeKfp
from tests.helpers import free_port

TOKEN = "sa-token-123"


@pytest.fixture
def kfp(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.config/kfp context file from the machine
    with FakeKfp(token=TOKEN) as server:
        yield server


def _submit(kfp, *extra):
    return main(["submit", "end-to-end", "--host", kfp.url, "--preset", "small",
                 "--set", "pipeline.image=registry.example/dsaforge:9", "--set", "tracking.uri=http://mlflow:5000",
                 *extra])


def test_submit_compiles_from_the_config_and_prints_the_link(kfp, capsys):
    assert _submit(kfp, "--experiment", "v32-recipe", "--set", "train.sparse.lr=1e-5") == 0
    out = capsys.readouterr().out
    (run_id,) = kfp.runs
    assert f"link: {kfp.url}/#/runs/details/{run_id}" in out
    posts = [r for r in kfp.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts] == ["/apis/v2beta1/experiments", "/apis/v2beta1/runs"]
    assert posts[0]["body"]["display_name"] == "v32-recipe"
    run = posts[1]["body"]
    assert run["experiment_id"] == next(iter(kfp.experiments))
    config = json.loads(run["runtime_config"]["parameters"]["config_json"])
    assert config["train"]["sparse"]["lr"] == 1e-5 and config["preset"] == "small"
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "end-to-end"
    images = {e["container"]["image"] for e in spec["pipeline_spec"]["deploymentSpec"]["executors"].values()
              if "container" in e}
    assert "registry.example/dsaforge:9" in images           # placement recompiled from the submitted config
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in kfp.requests)


def test_runs_list_get_cancel(kfp, capsys):
    assert _submit(kfp) == 0
    (run_id,) = kfp.runs
    capsys.readouterr()
    assert main(["runs", "list", "--host", kfp.url]) == 0
    assert run_id in capsys.readouterr().out
    assert main(["runs", "list", "--host", kfp.url, "--experiment", "dsaforge", "--format", "json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [run_id]
    assert main(["runs", "get", run_id, "--host", kfp.url, "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["state"] == "PENDING" and row["url"].endswith(run_id)
    assert main(["runs", "cancel", run_id, "--host", kfp.url]) == 0
    assert kfp.runs[run_id]["state"] == "CANCELING"
    assert kfp.requests[-1]["path"] == f"/apis/v2beta1/runs/{run_id}:terminate"


def test_bad_input_is_one_line_and_exit_2(kfp, capsys, monkeypatch):
    assert main(["runs", "get", "nope", "--host", kfp.url]) == 2
    assert "no KFP run 'nope'" in capsys.readouterr().err
    assert _submit(kfp, "--set", "tracking.uri=sqlite:///x.db") == 2
    assert "local store that pods cannot share" in capsys.readouterr().err
    monkeypatch.setenv("KFP_TOKEN", "wrong")
    assert main(["runs", "list", "--host", kfp.url]) == 2
    assert "refused the credentials (HTTP 401)" in capsys.readouterr().err
    assert main(["runs", "list", "--host", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "is unreachable" in err and len(err.strip().splitlines()) == 1
    assert not kfp.runs
