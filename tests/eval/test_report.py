"""The report's curves come from the pipeline's sibling stage runs by metric name; `run_record` resolves a pipeline
run to its evaluate stage (what `dsaforge eval compare` takes)."""
from dsaforge.config import load_config
from dsaforge.eval import report
from dsaforge.tracking import start_pipeline_run, start_stage_run
from dsaforge.tracking_query import metric_histories, run_record


def test_curves_and_records_from_a_pipeline_run(tmp_path):
    cfg = load_config("tiny", (), [f"pipeline.home={tmp_path}", "tracking.system_metrics=false"])
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_pipeline_run(cfg, "end-to-end", "run-0001", "")
    pre = start_stage_run(cfg, "pretrain", parent_run_id=parent.run_id)
    for step in range(5):
        pre.log_metrics({"train/lm_loss": 7.0 - step, "val/lm_loss": 7.5 - step}, step=step)
    pre.finish()
    ev = start_stage_run(cfg, "evaluate", parent_run_id=parent.run_id)
    ev.log_metrics({"eval/lm/dense/loss": 3.25})
    ev.finish()

    hist = metric_histories(cfg.tracking.uri, ev.run_id, ["train/lm_loss", "rl/reward"])
    assert hist == {"pretrain": {"train/lm_loss": [(s, 7.0 - s) for s in range(5)]}}
    (png,) = report.curves(hist, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rec = run_record(cfg.tracking.uri, parent.run_id)          # the pipeline run -> its evaluate stage
    assert rec["run_id"] == ev.run_id and rec["metrics"] == {"eval/lm/dense/loss": 3.25}
