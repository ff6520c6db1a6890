"""Multi-node stages as Kubeflow Trainer TrainJobs: manifests validated against Kubeflow Trainer's published API
models (kubeflow-trainer-api), the launcher's create/wait/collect cycle, and the launcher task in the IR.

Run: python -m pytest tests/train/test_trainjob.py -q
"""
import json

import pytest
import yaml

from dsaforge.config import ConfigError, load_config
from dsaforge.runner import compile_pipeline
from dsaforge.stages import StageContext
from dsaforge.tracking import NullTracker
from dsaforge.trainjob import job_name, manifest, node_command, run_trainjob, state

models = pytest.importorskip("kubeflow_trainer_api.models")


def _cfg(nnodes, *sets):
    # 512 sequences divide over 256 replicas in micro-batches of one
    batches = [f"train.{s}.{k}" for s in ("pretrain", "warmup", "sparse")
               for k in ("batch_size=512", "micro_batch_size=1")]
    return load_config("small", overrides=[f"parallel.nnodes={nnodes}", "parallel.nproc_per_node=8", *batches,
                                           "parallel.tp=8", "parallel.ep=8", "pipeline.gpus_per_stage=8",
                                           "pipeline.workspace_pvc=dsaforge-rwx", "pipeline.shm_size=256Gi",
                                           "pipeline.node_selector={nvidia.com/gpu.product: NVIDIA-H200}",
                                           "pipeline.timeout_s=172800", *sets])


def _validated(body):
    """The manifest, parsed by the published models and written back, must come back unchanged: an unknown or
    mistyped field is dropped or rejected by the models and fails here."""
    job = models.TrainerV1alpha1TrainJob.from_dict(body)
    assert job.to_dict() == body
    return job


@pytest.mark.parametrize("nnodes", [1, 2, 256])
def test_manifest_matches_the_trainer_api(nnodes):
    cfg = _cfg(nnodes)
    name = job_name("sparse", "0123456789abcdef")
    cmd = node_command("sparse", "/workspace/j/config.json", "/workspace/j/out",
                       {"prepare-data": "/workspace/j/inputs/prepare-data", "warmup": "/workspace/j/inputs/warmup"},
                       "http://mlflow.mlflow:5000", "run123")
    job = _validated(manifest(cfg, "sparse", name, "team-a", cmd))
    trainer = job.spec.trainer
    assert job.kind == "TrainJob" and job.api_version == "trainer.kubeflow.org/v1alpha1"
    assert job.spec.runtime_ref.name == "torch-distributed" and len(job.metadata.name) <= 40
    assert trainer.num_nodes == nnodes and trainer.num_proc_per_node == 8
    assert trainer.resources_per_node.to_dict()["limits"] == {"nvidia.com/gpu": "8"}
    assert trainer.command[:5] == ["python", "-m", "torch.distributed.run", "-m", "dsaforge.model.train.launch"]
    assert "--nnodes" not in " ".join(trainer.command)          # torchrun takes it from PET_NNODES
    env = {e.name: e for e in trainer.env}
    assert env["DSAFORGE_WORKSPACE"].value == "/workspace"
    assert env["MLFLOW_TRACKING_URI"].value_from.secret_key_ref.name == "dsaforge-mlflow"
    pod = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
    assert {v.name for v in pod.volumes} == {"workspace", "dshm"}
    assert [v.empty_dir.medium for v in pod.volumes if v.name == "dshm"] == ["Memory"]
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod.tolerations[0].key == "nvidia.com/gpu"
    assert job.spec.active_deadline_seconds == 172800


def test_validation_catches_a_misspelled_field():
    body = manifest(_cfg(2), "pretrain", "x", "ns", ["true"])
    body["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(AssertionError):
        _validated(body)


def test_manifest_rejects_what_cannot_work():
    with pytest.raises(ConfigError, match="needs pipeline.workspace_pvc"):
        manifest(_cfg(2, "pipeline.workspace_pvc=null"), "pretrain", "x", "ns", ["true"])
    with pytest.raises(ConfigError, match="nproc_per_node=8 but each node gets 4 GPUs"):
        manifest(_cfg(2, "pipeline.gpus_per_stage=4"), "pretrain", "x", "ns", ["true"])


class FakeKube:
    """The launcher's Kubernetes calls, answered from a script of TrainJob states; `finish` plays the nodes."""

    def __init__(self, states, finish):
        self.states, self.finish, self.created = list(states), finish, []

    def create(self, body):
        self.created.append(body)

    def get(self, namespace, name):
        kind = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if kind == "Complete":
            self.finish(self.created[-1])
        conditions = [{"type": kind, "status": "True", "message": "node 3 OOMKilled"}] if kind in (
            "Complete", "Failed") else []
        return {"status": {"conditions": conditions, "jobsStatus": [{"name": "node", "active": kind == "Running"}]}}

    def rank0_pod(self, namespace, name):
        return None


def _nodes_write_outputs(body):
    out = body["spec"]["trainer"]["command"][body["spec"]["trainer"]["command"].index("--out") + 1]
    from pathlib import Path
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "metrics.json").write_text(json.dumps({"steps": 4, "end": {"val/lm_loss": 3.5}}))


def test_launcher_stages_inputs_waits_and_collects(tmp_path, monkeypatch):
    monkeypatch.setenv("DSAFORGE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("DSAFORGE_NAMESPACE", "team-a")
    monkeypatch.setattr("dsaforge.trainjob.time.sleep", lambda s: None)
    data = tmp_path / "artifacts" / "dataset"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    tracker = NullTracker()
    ctx = StageContext(_cfg(2), tmp_path / "artifacts" / "model", {"prepare-data": data}, tracker)
    kube = FakeKube(["Pending", "Running", "Running", "Complete"], _nodes_write_outputs)
    summary = run_trainjob(ctx, "pretrain", kube=kube)
    (body,) = kube.created
    _validated(body)
    assert body["metadata"]["namespace"] == "team-a" and body["spec"]["trainer"]["numNodes"] == 2
    staged = tmp_path / "ws" / "trainjobs" / body["metadata"]["name"] / "inputs" / "prepare-data" / "manifest.json"
    assert staged.is_file()                                       # the nodes read inputs from the shared volume
    assert summary["steps"] == 4 and (ctx.out_dir / "metrics.json").is_file()
    assert tracker.tags["dsaforge.trainjob"] == f"team-a/{body['metadata']['name']}"

    failing = FakeKube(["Pending", "Failed"], _nodes_write_outputs)
    ctx2 = StageContext(_cfg(2), tmp_path / "artifacts" / "model2", {"prepare-data": data}, NullTracker())
    with pytest.raises(RuntimeError, match="TrainJob team-a/.* failed: node 3 OOMKilled"):
        run_trainjob(ctx2, "pretrain", kube=failing)


def test_state_reads_conditions():
    assert state({}) == ("Pending", "")
    assert state({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}) \
        == ("Failed", "DeadlineExceeded")


def test_multi_node_stage_task_is_a_cpu_launcher_in_the_ir(tmp_path):
    out = compile_pipeline("pretraining", _cfg(2), tmp_path / "p.yaml")
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in ("pretrain", "warmup", "sparse"):
        container = executors[f"exec-{stage}"]["container"]
        assert container["image"] == "dsaforge-cpu:0.1.0" and "accelerator" not in container["resources"]
        assert k8s[f"exec-{stage}"]["fieldPathAsEnv"] == [{"fieldPath": "metadata.namespace",
                                                           "name": "DSAFORGE_NAMESPACE"}]
        assert k8s[f"exec-{stage}"]["pvcMount"][0]["constant"] == "dsaforge-rwx"
