"""The product's heartbeat: `dsaforge run end-to-end --preset tiny` on KFP's local runner with a SQLite MLflow store.

Run: python -m pytest tests/test_end_to_end.py -q
"""
import os
import subprocess
import sys

import mlflow
import pytest


def _run(home, *extra):
    return subprocess.run([sys.executable, "-m", "dsaforge", "run", "end-to-end", "--preset", "tiny",
                           "--set", f"pipeline.home={home}", "--set", "tracking.system_metrics_interval_s=1", *extra],
                          capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e") / ".dsaforge"
    proc = _run(home)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home, proc.stdout


def test_demo_prints_where_results_are(demo):
    home, out = demo
    assert "pipeline end-to-end finished" in out
    assert f"mlflow ui --tracking-uri sqlite:///{home / 'mlflow.db'}" in out
    assert "results:" in out and "val/indexer_kl" in out.split("results:")[1]
    assert str(home / "kfp") in out and str(home / "runs") in out


def test_every_stage_is_a_finished_child_run(demo):
    home, _ = demo
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsaforge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["dsaforge.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare-data", "pretrain", "warmup", "sparse", "synthesize", "sft", "grpo", "evaluate"}
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["kfp.pipeline_id"] == "end-to-end"
        assert run.data.tags["kfp.pipeline_run_id"] == parent.data.tags["kfp.pipeline_run_id"]
    data = children["prepare-data"]
    assert data.data.metrics["documents"] == 400 and data.data.metrics["train_sequences"] > 1000
    assert {a.path for a in client.list_artifacts(data.info.run_id)} >= {"manifest.json", "tokenizer.json"}
    # system metrics are sampled in the stage's run
    assert any(k.startswith("system/") for k in data.data.metrics)
    # training stages log per-step metrics; the synthesized tasks passed their gates
    for stage in ("pretrain", "warmup", "sparse"):
        steps = client.get_metric_history(children[stage].info.run_id, "train/lr")
        assert len(steps) >= 10, stage
    assert len(client.get_metric_history(children["sft"].info.run_id, "train/lm_loss")) >= 10
    grpo = children["grpo"].data.metrics
    for key in ("rl/reward_mean", "rl/ratio_mean", "rl/opsm_fraction", "rl/engine_trainer_logp_gap",
                "rl/time/generate_s", "rl/time/train_s", "heldout/pass_rate"):
        assert key in grpo, key
    synth = children["synthesize"].data.metrics
    assert all(synth[f"{cls}.tasks"] > 0 for cls in ("general", "code", "search", "code_interpreter")), synth
    # the evaluation of the final checkpoint (grpo, the newest model stage): every CPU suite, and the report
    ev = children["evaluate"]
    for key in ("eval/lm/dense/loss", "eval/lm/sparse/loss", "eval/long-context/dense/accuracy",
                "eval/long-context/sparse/accuracy", "eval/agentic/pass_at_1", "eval/code/pass_at_1",
                "eval/reasoning/mean_score"):
        assert key in ev.data.metrics, key
    assert ev.data.tags["dsaforge.eval.checkpoint"].startswith("grpo")
    report = {a.path for a in client.list_artifacts(ev.info.run_id, "eval/report")}
    assert "eval/report/index.html" in report and "eval/report/training_curves.png" in report


def test_failed_stage_fails_the_run_and_keeps_earlier_runs(demo, tmp_path):
    home, _ = demo
    proc = _run(home, "--set", f"data.sources=[{tmp_path / 'missing'}]")
    assert proc.returncode != 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsaforge")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id])
                      if "mlflow.parentRunId" not in r.data.tags)
    assert statuses == ["FAILED", "FINISHED"]
