"""Every route of the console over real HTTP: pages, the JSON API, bad input, CSRF, and runs that really execute
(a failing one, a cancelled one) in worker processes on KFP's local runner.

Run: python -m pytest tests/console/test_api.py -q
"""
import json
import time
from pathlib import Path

import pytest
import requests

from dsaforge import tracking_query
from dsaforge.pipelines import PIPELINES, builder, get_pipeline
from tests.console.conftest import csrf_of, error_line


def post_submit(served, session, **fields):
    # No task retries: a failure here is meant, not transient (KFP's local runner honours retries and backoff).
    data = {"csrf": csrf_of(session), "pipeline_name": "end-to-end", "preset": "tiny", "pipeline.retries": "0",
            **fields}
    return session.post(served.url + "/submit", data=data, allow_redirects=False, timeout=60)


def wait_for(served, run_id, predicate, timeout_s=240):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        run = requests.get(f"{served.url}/api/runs/{run_id}", timeout=60).json()
        if predicate(run):
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} never got there: {json.dumps(run)[:2000]}")


def live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies, which an init that never reaps keeps, do not count)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_healthz(served):
    r = requests.get(served.url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "backends": ["local"]}


def test_pages_render_with_security_headers(served):
    s = served.session()
    for path in ("/runs", "/pipelines", "/submit", "/submit?preset=small", "/login"):
        r = s.get(served.url + path, timeout=60)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert s.get(served.url + "/", allow_redirects=False, timeout=30).headers["location"] == "/runs"


def test_pipelines_page_shows_the_stage_graph(served):
    page = requests.get(served.url + "/pipelines", timeout=60).text
    assert all(f'id="pipeline-{name}"' in page for name in PIPELINES)
    html = page.split('id="pipeline-end-to-end"')[1].split("</section>")[0]
    assert "DeepSeek-V3.2 recipe end to end" in html
    stages = builder.available(get_pipeline("end-to-end").STAGES)
    for task in ("open-run", *stages, "close-run"):
        assert f'data-task="{task}"' in html
    from dsaforge.console.graph import pipeline_graph

    graph = pipeline_graph("end-to-end")
    assert html.count('class="edge"') == len(graph.edges)
    assert {("prepare-data", "pretrain"), ("pretrain", "warmup"), ("warmup", "sparse")} <= set(graph.edges)
    assert [e for e in graph.edges if e[0] == "open-run"] == [("open-run", "prepare-data")]   # implied edges dropped
    assert "close-run" in graph.always


def test_submit_form_is_generated_from_the_schema(served):
    html = requests.get(served.url + "/submit?preset=small", timeout=60).text
    assert 'name="train.sparse.lr" value="7.3e-06"' in html
    assert 'name="model.n_layers" value="12"' in html
    assert '<option selected>bfloat16</option>' in html            # train.dtype, a Literal
    assert 'name="pipeline.home"' not in html and 'name="tracking.uri"' not in html    # set by the console
    r = requests.get(served.url + "/submit?preset=huge", timeout=60)
    assert r.status_code == 400 and error_line(r.text).startswith("unknown preset 'huge'")
    assert requests.get(served.url + "/submit?pipeline=nope", timeout=60).status_code == 404


@pytest.mark.parametrize("fields, message", [
    ({"train.sparse.lr": "-1"}, "config: train.sparse.lr: Input should be greater than 0 (got -1)"),
    ({"model.n_layers": "two"}, "config: model.n_layers: Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    ({"train.dtype": "float8"}, "config: train.dtype: Input should be 'float32' or 'bfloat16' (got 'float8')"),
    ({"data.sources": "[unclosed"}, "config: data.sources: Input should be a valid list (got '[unclosed')"),
    ({"model.no_such_field": "1"}, "model.no_such_field: unknown key"),
    ({"pipeline.home": "/etc"}, "pipeline.home: set by the console, not by a submitted form"),
    ({"tracking.uri": "sqlite:////tmp/elsewhere.db"}, "tracking.uri: set by the console, not by a submitted form"),
    ({"preset": "huge"}, "unknown preset 'huge'; available: tiny, small, h200, v32, base"),
    ({"pipeline_name": "nope"}, f"unknown pipeline 'nope'; available: {', '.join(PIPELINES)}"),
])
def test_bad_config_is_one_line_naming_the_field(served, fields, message):
    s = served.session()
    before = len(served.console.store.list())
    r = post_submit(served, s, **fields)
    assert r.status_code == 400
    assert error_line(r.text) == message
    assert len(served.console.store.list()) == before          # nothing was queued


def test_a_sub_pipeline_takes_its_inputs_from_an_earlier_run_named_by_id(served):
    s = served.session()
    form = s.get(served.url + "/submit?pipeline=post-training", timeout=60).text
    assert 'name="inputs_from"' in form
    needs = "pipeline post-training needs the outputs of prepare-data, sparse: choose the run to take them from"
    for given in ({}, {"inputs_from": "../../etc"}, {"inputs_from": "f" * 32}):
        r = post_submit(served, s, pipeline_name="post-training", **given)
        assert r.status_code == 400 and error_line(r.text) == needs


def test_a_rejected_form_keeps_what_was_typed_and_marks_the_field(served):
    s = served.session()
    r = post_submit(served, s, **{"train.sparse.lr": "-1", "model.n_layers": "3"})
    assert 'name="train.sparse.lr" value="-1"' in r.text and 'name="model.n_layers" value="3"' in r.text
    assert 'class="field bad" title' in r.text


@pytest.mark.parametrize("how", ["no cookie", "no field", "wrong field", "other origin", "json body"])
def test_forms_need_csrf(served, how):
    s = served.session()
    data = {"csrf": csrf_of(s), "pipeline_name": "end-to-end", "preset": "tiny"}
    headers = {}
    if how == "no cookie":
        s = requests.Session()
    elif how == "no field":
        del data["csrf"]
    elif how == "wrong field":
        data["csrf"] = "x" * 43
    elif how == "other origin":
        headers["Origin"] = "http://evil.example"
    before = len(served.console.store.list())
    if how == "json body":
        r = s.post(served.url + "/submit", json=data, allow_redirects=False, timeout=30)
    else:
        r = s.post(served.url + "/submit", data=data, headers=headers, allow_redirects=False, timeout=30)
    assert r.status_code == 403, how
    assert len(served.console.store.list()) == before
    some = served.console.store.list()
    if some:    # cancel and resume are forms too
        for action in ("cancel", "resume"):
            r = requests.post(f"{served.url}/runs/{some[0].id}/{action}", data={"csrf": "x"}, timeout=30)
            assert r.status_code == 403


def test_unknown_runs_and_artifacts_are_404(served):
    s = served.session()
    for path in ("/runs/0123", "/runs/../../etc/passwd", "/api/runs/" + "f" * 32, "/runs/" + "0" * 32 + "/artifacts/x/y",
                 "/submit?from=" + "a" * 32, "/nowhere"):
        assert s.get(served.url + path, timeout=30).status_code == 404, path
    r = s.post(f"{served.url}/runs/{'0' * 32}/cancel", data={"csrf": csrf_of(s)}, timeout=30)
    assert r.status_code == 404


def test_compare_needs_two_known_runs(served):
    assert requests.get(served.url + "/compare?run=" + "a" * 32, timeout=30).status_code == 400
    assert requests.get(served.url + f"/compare?run={'a' * 32}&run={'b' * 32}", timeout=30).status_code == 404


def test_failed_run_shows_the_failed_step_and_can_be_resubmitted_and_compared(served, tmp_path):
    s = served.session()
    missing = tmp_path / "no-such-corpus"
    r = post_submit(served, s, **{"data.sources": f"[{missing}]"})
    assert r.status_code == 303
    run_id = r.headers["location"].rsplit("/", 1)[1]
    run = wait_for(served, run_id, lambda r: r["status"] not in ("queued", "running"))
    assert run["status"] == "failed"
    assert f"prepare-data: DataError: input not found: {missing}" in run["error"]
    steps = {st["name"]: st for st in run["steps"]}
    assert steps["prepare-data"]["state"] == "failed"
    assert steps["prepare-data"]["error"] == f"DataError: input not found: {missing}"
    assert {steps[n]["state"] for n in ("pretrain", "warmup", "sparse", "synthesize")} == {"skipped"}
    assert "DataError: input not found" in run["log_tail"] and "\x1b[" not in run["log_tail"]
    assert run["config"]["pipeline"]["home"] == str(served.console.home)
    # its own pipeline root, under the console's run folder
    assert list((served.console.home / "console" / "runs" / run_id / "kfp").glob("*/end-to-end-*/prepare-data"))
    # the MLflow parent run is linked and FAILED
    page = s.get(f"{served.url}/runs/{run_id}", timeout=60).text
    assert f'href="http://127.0.0.1:5000/#/experiments/{run["mlflow_experiment_id"]}/runs/{run["mlflow_run_id"]}"' in page
    parent, children = tracking_query.find_pipeline_runs(served.console.tracking_uri, "dsaforge", run_id)
    assert parent.status == "FAILED" and [c.status for c in children] == ["FAILED"]
    # artifacts: listed ones are served, with a safe content type; anything else is 404
    art = s.get(f"{served.url}/runs/{run_id}/artifacts/{parent.run_id}/config.json", timeout=60)
    assert art.status_code == 200 and art.json()["data"]["sources"] == [str(missing)]
    assert "sandbox" in art.headers["content-security-policy"]
    for bad in ("../config.json", "config.yaml/../../x", "/etc/passwd"):
        assert s.get(f"{served.url}/runs/{run_id}/artifacts/{parent.run_id}/{bad}", timeout=60).status_code == 404
    assert s.get(f"{served.url}/runs/{run_id}/artifacts/{'1' * 32}/config.json", timeout=60).status_code == 404
    # re-submit with edits: the form comes back filled with this run's values
    form = s.get(f"{served.url}/submit?from={run_id}", timeout=60).text
    assert f'name="resubmit_of" value="{run_id}"' in form and str(missing) in form
    r = post_submit(served, s, resubmit_of=run_id, **{"data.sources": f"[{missing}-2]"})
    second = r.headers["location"].rsplit("/", 1)[1]
    second_run = wait_for(served, second, lambda r: r["mlflow_run_id"] is not None)
    assert served.console.store.get(second).resubmit_of == run_id
    # both in the runs list; the compare view is MLflow's, with both parent runs
    listing = requests.get(served.url + "/api/runs", timeout=60).json()["runs"]
    assert {run_id, second} <= {r["id"] for r in listing}
    r = requests.get(f"{served.url}/compare?run={run_id}&run={second}", allow_redirects=False, timeout=60)
    assert r.status_code == 303
    assert r.headers["location"].startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    assert run["mlflow_run_id"] in r.headers["location"] and second_run["mlflow_run_id"] in r.headers["location"]
    wait_for(served, second, lambda r: r["status"] == "failed")


def test_cancel_stops_the_worker_and_marks_mlflow(served):
    s = served.session()
    r = post_submit(served, s)
    run_id = r.headers["location"].rsplit("/", 1)[1]
    wait_for(served, run_id, lambda r: any(st["state"] == "running" for st in r["steps"]))
    pid = served.console.store.get(run_id).pid
    r = s.post(f"{served.url}/runs/{run_id}/cancel", data={"csrf": csrf_of(s)}, allow_redirects=False, timeout=60)
    assert r.status_code == 303
    run = requests.get(f"{served.url}/api/runs/{run_id}", timeout=60).json()
    assert run["status"] == "cancelled" and run["note"] == "cancelled from the console"
    assert live_in_group(pid) == []                       # the worker and its task processes are gone
    parent, children = tracking_query.find_pipeline_runs(served.console.tracking_uri, "dsaforge", run_id)
    assert parent.status == "KILLED" and parent.tags["dsaforge.error"] == "cancelled from the console"
    assert all(c.status != "RUNNING" for c in children)
    # a finished run cannot be cancelled again
    r = s.post(f"{served.url}/runs/{run_id}/cancel", data={"csrf": csrf_of(s)}, timeout=60)
    assert r.status_code == 409 and "only queued or running runs can be cancelled" in error_line(r.text)


def test_a_failed_run_resumes_as_the_same_run_from_its_failed_step(served, tmp_path):
    import email
    import shutil

    s = served.session()
    corpus = tmp_path / "corpus"
    r = post_submit(served, s, **{"data.sources": f"[{corpus}]"})
    run_id = r.headers["location"].rsplit("/", 1)[1]
    failed = wait_for(served, run_id, lambda r: r["status"] not in ("queued", "running"))
    assert failed["status"] == "failed" and 'id="resume"' in s.get(f"{served.url}/runs/{run_id}", timeout=60).text
    shutil.copytree(Path(email.__file__).parent, corpus)          # the cause fixed: the corpus is there now
    r = s.post(f"{served.url}/runs/{run_id}/resume", data={"csrf": csrf_of(s)}, allow_redirects=False, timeout=60)
    assert r.status_code == 303 and r.headers["location"] == f"/runs/{run_id}"
    run = wait_for(served, run_id, lambda r: r["steps"][0]["state"] == "succeeded")
    assert run["status"] == "running" and run["error"] is None
    assert run["note"] == f"resumed from the failed step; it had failed with: {failed['error']}"
    assert run["mlflow_run_id"] == failed["mlflow_run_id"]          # the same MLflow parent run continues
    assert len(list((served.console.home / "console" / "runs" / run_id / "kfp").iterdir())) == 2   # two attempts
    r = s.post(f"{served.url}/runs/{run_id}/resume", data={"csrf": csrf_of(s)}, timeout=60)
    assert r.status_code == 409 and "only a failed run resumes" in error_line(r.text)
    served.console.cancel(served.console.store.get(run_id))
