"""The evaluate stage end to end from the CLI: every CPU suite on a checkpoint, results on disk, metrics and the
report in MLflow, `dsaforge eval compare` over two runs, and bad input answered with one line and exit status 2."""
import json
import os
import subprocess
import sys

import mlflow
import pyarrow.parquet as pq
import pytest

from dsaforge.config import load_config
from dsaforge.stages import run_stage
from dsaforge.synth import sandbox as sbx

SMALL = ["eval.max_samples=2", "eval.reasoning_tasks=[leg_counting]", "eval.long_context.lengths=[200, 256]",
         "eval.long_context.depths=[0.0, 1.0]", "eval.long_context.samples=1", "eval.max_new_tokens=8",
         "eval.max_turns=1", "data.max_documents=80"]


def _cli(*args, home):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "dsaforge", *args, "--set", f"pipeline.home={home}"],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory, eval_data):
    cfg = load_config("tiny", (), ["synth.agent_classes=[general, search]", "synth.holdout_fraction=0.5",
                                   "synth.targets={general: [4, 2], search: [4, 2]}"])
    out = tmp_path_factory.mktemp("eval-synth") / "synth"
    run_stage("synthesize", cfg, out, {"prepare-data": eval_data})
    return out


@pytest.mark.slow
@pytest.mark.skipif(sbx.bwrap_problem() is not None, reason="the code and agentic suites need bubblewrap")
def test_every_cpu_suite_report_mlflow_and_compare(tmp_path, eval_data, eval_stage_dir, synth_dir):
    home = tmp_path / "home"
    out = tmp_path / "eval"
    inputs = ["--input", f"prepare-data={eval_data}", "--input", f"sparse={eval_stage_dir}",
              "--input", f"synthesize={synth_dir}"]
    sets = [x for s in SMALL for x in ("--set", s)]
    proc = _cli("stage", "evaluate", "--out", str(out), *inputs, *sets, home=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["checkpoint"] == "sparse" and "lm/dense/loss" in summary and "code/pass_at_1" in summary

    suites = ["lm", "long-context", "agentic", "code", "reasoning"]
    for suite in suites:
        rows = pq.read_table(out / suite / "results.parquet").to_pylist()
        assert rows, suite
        assert json.loads((out / suite / "summary.json").read_text())["suite"] == suite
    lc = pq.read_table(out / "long-context" / "results.parquet").to_pylist()
    assert {(r["task"], r["length"], r["depth"], r["mode"]) for r in lc} == {
        (t, n, d, m) for t in ("passkey", "multikey", "variable-tracking") for n in (200, 256) for d in (0.0, 1.0)
        for m in ("dense", "sparse")}
    agentic = pq.read_table(out / "agentic" / "results.parquet").to_pylist()
    assert {r["agent_class"] for r in agentic} == {"general", "search"}
    assert all(r["task_id"].split("-")[0] == r["agent_class"] for r in agentic)
    html = (out / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 6 and "variable-tracking" in html

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dsaforge")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`dsaforge.stage` = 'evaluate'")
    m = run.data.metrics
    assert {"eval/lm/dense/loss", "eval/lm/sparse/loss", "eval/long-context/sparse/accuracy", "eval/code/pass_at_1",
            "eval/reasoning/leg_counting/mean_score", "eval/agentic/general/pass_at_1"} <= set(m)
    assert m["eval/lm/dense/loss"] == pytest.approx(summary["lm/dense/loss"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/report")}
    assert "eval/report/index.html" in arts and "eval/report/longctx_passkey.png" in arts

    # a second run (dense-only suites, another top-k), then the side-by-side table
    proc = _cli("stage", "evaluate", "--out", str(tmp_path / "eval2"), *inputs, *sets, "--set", "eval.suites=[lm]",
                home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run2,) = [r for r in client.search_runs([exp.experiment_id], filter_string="tags.`dsaforge.stage` = 'evaluate'")
               if r.info.run_id != run.info.run_id]
    table = tmp_path / "cmp.md"
    proc = _cli("eval", "compare", run.info.run_id, run2.info.run_id, "--out", str(table), home=home)
    assert proc.returncode == 0, proc.stderr
    assert "eval/lm/dense/loss" in proc.stdout and "B - A" in proc.stdout
    line = next(ln for ln in table.read_text().splitlines() if ln.startswith("| eval/lm/dense/loss"))
    assert line.rstrip(" |").endswith("0")           # same checkpoint, same rows: the difference is zero
    code_line = next(ln for ln in table.read_text().splitlines() if ln.startswith("| eval/code/pass_at_1"))
    assert "| - |" in code_line                      # logged by one run only


def test_bad_input_is_one_line_and_exit_2(tmp_path, eval_data, eval_stage_dir, capsys, monkeypatch):
    from dsaforge.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    cases = [
        (["stage", "evaluate", "--out", str(tmp_path / "a"), "--input", f"prepare-data={eval_data}", "--no-track",
          "--set", "eval.suites=[lm]"], "evaluate needs a model"),
        (["stage", "evaluate", "--out", str(tmp_path / "b"), "--input", f"prepare-data={eval_data}",
          "--input", f"sparse={eval_stage_dir}", "--no-track", "--set", "eval.suites=[lm, agentic]"],
         "needs the synthesize output"),
        (["stage", "evaluate", "--out", str(tmp_path / "c"), "--input", f"prepare-data={eval_data}",
          "--input", f"sparse={tmp_path}", "--no-track", "--set", "eval.suites=[lm]"], "has no HF export"),
        (["stage", "evaluate", "--out", str(tmp_path / "d"), "--no-track", "--set", "eval.suites=[lm, perplexity]"],
         "eval.suites"),
        (["eval", "compare", "0123456789abcdef", "fedcba9876543210"], "no MLflow run"),
        (["eval", "compare", "0123456789abcdef"], "at least two runs"),
    ]
    if not __import__("torch").cuda.is_available():
        cases.append((["stage", "evaluate", "--out", str(tmp_path / "e"), "--input", f"prepare-data={eval_data}",
                       "--input", f"sparse={eval_stage_dir}", "--no-track", "--set", "eval.suites=[efficiency]"],
                      "needs a CUDA device"))
    for args, words in cases:
        assert main([*args, "--set", f"pipeline.home={home}"]) == 2, args
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("dsaforge: error:")]   # MLflow may log INFO lines
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, (args, err)
