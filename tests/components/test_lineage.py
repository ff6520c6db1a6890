"""Lineage in MLflow: a training run records the prepared dataset as its input and logs a LoggedModel with its
validation metrics; `tracking.register_as` registers the pipeline's final model, and the version leads back to
the run, the config and the dataset that produced it.

Run: python -m pytest tests/components/test_lineage.py -q
"""
import json

import mlflow

from dsaforge.components.runtime import close_pipeline_run, open_pipeline_run, run_component
from dsaforge.config import config_hash, load_config


def test_registered_version_resolves_to_run_config_and_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", overrides=[f"pipeline.home={tmp_path}", f"tracking.uri={uri}",
                                         "tracking.system_metrics=false", "tracking.register_as=dsaforge-tiny",
                                         "data.max_documents=60", "data.tokenizer_train_bytes=200000",
                                         "train.pretrain.steps=2", "train.pretrain.eval_batches=1"])
    config_json = json.dumps(cfg.model_dump())
    parent = open_pipeline_run(config_json, "", "pretraining", "kfp-lineage", "")
    data, model = tmp_path / "data", tmp_path / "pretrain"
    run_component("prepare-data", config_json, "", parent, str(data))
    run_component("pretrain", config_json, "", parent, str(model), inputs={"prepare-data": str(data)})
    close_pipeline_run(config_json, "", parent, "kfp-lineage", "SUCCEEDED")

    client = mlflow.MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name = 'dsaforge-tiny'")
    # version -> LoggedModel (its models:/ source) -> the stage run
    assert version.source == f"models:/{version.tags['dsaforge.model_id']}"
    logged = client.get_logged_model(version.tags["dsaforge.model_id"])
    assert logged.tags["dsaforge.registered_as"] == "dsaforge-tiny/1"
    assert logged.tags["dsaforge.stage"] == "pretrain" and version.run_id == logged.source_run_id
    assert {a.path for a in client.list_logged_model_artifacts(logged.model_id)} >= {"config.json"}
    assert any(m.key.startswith("end.val/") for m in logged.metrics or [])      # validation metrics linked
    run = client.get_run(version.run_id)
    # -> the config: the run's params and tags, and the pipeline's config.json on the parent run
    assert run.data.tags["dsaforge.config_hash"] == config_hash(cfg) == version.tags["dsaforge.config_hash"]
    assert run.data.params["train.pretrain.steps"] == "2"
    assert version.tags["kfp.pipeline_run_id"] == "kfp-lineage"
    assert "config.json" in [a.path for a in client.list_artifacts(run.data.tags["mlflow.parentRunId"])]
    # -> the dataset: the same MLflow dataset (name + digest) that prepare-data logged
    manifest = json.loads((data / "manifest.json").read_text())
    (ds,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert (ds.name, ds.digest) == ("corpus", manifest["documents_sha256"][:16])
    prep = [r for r in client.search_runs([run.info.experiment_id]) if r.data.tags.get("dsaforge.stage") == "prepare-data"]
    assert [d.dataset.digest for d in prep[0].inputs.dataset_inputs] == [ds.digest]
    assert client.get_run(parent).data.tags["dsaforge.registered_model"] == "dsaforge-tiny/1"


def test_large_exports_are_referenced_not_copied(tmp_path):
    from dsaforge.tracking import MlflowTracker, _client

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = _client(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri()))
    export = tmp_path / "hf"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"\0" * 4096)
    model_id = MlflowTracker(uri, run.info.run_id).log_model("sparse", export, {"end.val/lm_loss": 2.5},
                                                             reference_uri="s3://ckpt/sparse/hf", max_mb=0.001)
    logged = client.get_logged_model(model_id)
    assert logged.tags["dsaforge.checkpoint_uri"] == "s3://ckpt/sparse/hf"
    assert list(client.list_logged_model_artifacts(model_id)) == []
