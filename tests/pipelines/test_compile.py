"""Every pipeline compiles to KFP IR with the placement the config asks for (what a cluster will run).

Run: python -m pytest tests/pipelines/test_compile.py -q
"""
import inspect
import json

import pytest
import yaml

from dsaforge.config import ConfigError, load_config
from dsaforge.pipelines import PIPELINES, builder, get_pipeline
from dsaforge.runner import compile_pipeline
from dsaforge.stages import STAGES, input_param

CLUSTER = ["pipeline.image=registry.example/dsaforge:1.2", "pipeline.cpu_image=registry.example/dsaforge-cpu:1.2",
           "pipeline.gpus_per_stage=8", "pipeline.gpu_type=nvidia.com/gpu",
           "pipeline.node_selector={nvidia.com/gpu.product: NVIDIA-H200}",
           "pipeline.cpu_node_selector={pool: cpu}",
           "pipeline.tolerations=[{key: dedicated, operator: Equal, value: training, effect: NoSchedule}]",
           "pipeline.workspace_pvc=dsaforge-ckpt", "pipeline.shm_size=64Gi",
           "pipeline.secrets=[{name: mlflow-auth, keys: {uri: MLFLOW_TRACKING_URI, pw: MLFLOW_TRACKING_PASSWORD}}]",
           "pipeline.env={HF_HUB_OFFLINE: '1'}", "pipeline.retries=3", "pipeline.timeout_s=86400",
           "pipeline.resources={synthesize: {cpu: '32', memory: 64G, timeout_s: 7200, retries: 1}}",
           "pipeline.caching=true", "pipeline.image_pull_secrets=[regcred]"]


def _upstream(name):
    """A sub-pipeline starts from another's outputs: every input its stages need from outside, as a URI."""
    stages = builder.available(get_pipeline(name).STAGES)
    return {i: f"s3://bucket/{i}" for s in stages for i in STAGES[s].inputs if i not in stages}


def _compile(tmp_path, name, *sets):
    out = compile_pipeline(name, load_config("small", overrides=list(sets)), tmp_path / f"{name}.yaml",
                           reuse=_upstream(name))
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec):
    """task name -> (task spec, executor label) for the tasks inside the exit handler and the exit task."""
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    out = {**inner, "close-run": spec["root"]["dag"]["tasks"]["close-run"]}
    return {name: (task, spec["components"][task["componentRef"]["name"]].get("executorLabel"))
            for name, task in out.items()}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cluster_settings_land_in_the_ir(tmp_path, monkeypatch, name):
    monkeypatch.setenv("DSAFORGE_IMAGE", "somewhere/else:0")     # the config decides, not the environment
    spec, platform = _compile(tmp_path, name, *CLUSTER)
    executors = spec["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    stages = [t for t in tasks if t in STAGES]
    assert stages, name
    for task_name, (task, label) in tasks.items():
        if "importer" in executors[label]:          # an upstream output given by URI: no pod of its own
            continue
        container, k8s = executors[label]["container"], platform[label]
        stage = STAGES.get(task_name)
        gpu = bool(stage and stage.gpu)
        assert container["image"] == ("registry.example/dsaforge:1.2" if gpu else
                                      "registry.example/dsaforge-cpu:1.2"), task_name
        assert "pip install" not in " ".join(container["command"]), task_name     # install_kfp_package=False
        # every pod gets the tracking server and its credentials, the workspace volume and the env
        assert k8s["secretAsEnv"] == [{"keyToEnv": [{"envVar": "MLFLOW_TRACKING_URI", "secretKey": "uri"},
                                                    {"envVar": "MLFLOW_TRACKING_PASSWORD", "secretKey": "pw"}],
                                       "optional": False, "secretName": "mlflow-auth",
                                       "secretNameParameter": {"runtimeValue": {"constant": "mlflow-auth"}}}]
        assert k8s["pvcMount"][0]["mountPath"] == "/workspace" and k8s["pvcMount"][0]["constant"] == "dsaforge-ckpt"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == {"HF_HUB_OFFLINE": "1", "DSAFORGE_WORKSPACE": "/workspace"}
        assert k8s["imagePullSecret"] == [{"secretName": "regcred",
                                           "secretNameParameter": {"runtimeValue": {"constant": "regcred"}}}]
        if stage is None:
            assert task["cachingOptions"] == {} and k8s["activeDeadlineSeconds"] == "600"
            continue
        res = container["resources"]
        want_retries, want_timeout = (1, "7200") if task_name == "synthesize" else (3, "86400")
        assert task["retryPolicy"]["maxRetryCount"] == want_retries and k8s["activeDeadlineSeconds"] == want_timeout
        assert task["cachingOptions"]["enableCache"] is True
        assert task["cachingOptions"]["cacheKey"].startswith(f"dsaforge-{task_name}-")
        if gpu:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "8"
            assert res["resourceCpuRequest"] == "8" and res["resourceMemoryRequest"] == "64G"
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
            assert k8s["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"},
                                          {"effect": "NoSchedule", "key": "dedicated", "operator": "Equal",
                                           "value": "training"}]
            assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi",
                                              "volumeName": "dshm"}]
        else:
            assert "accelerator" not in res and "tolerations" not in k8s and "emptyDirMounts" not in k8s
            assert k8s["nodeSelector"]["labels"] == {"pool": "cpu"}
        if task_name == "synthesize":
            assert res["resourceCpuRequest"] == "32" and res["resourceMemoryRequest"] == "64G"


def test_defaults_give_pods_the_mlflow_secret_and_honor_caching(tmp_path):
    spec, platform = _compile(tmp_path, "pretraining")
    for task_name, (task, label) in _tasks(spec).items():
        names = [s["secretName"] for s in platform[label]["secretAsEnv"]]
        assert names == ["dsaforge-mlflow", "dsaforge-storage"], task_name
        envs = {k["envVar"] for s in platform[label]["secretAsEnv"] for k in s["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= envs
        if task_name in STAGES:
            assert task["cachingOptions"].get("enableCache") is not True       # pipeline.caching=false (default)


def test_cache_keys_follow_config_and_inputs(tmp_path):
    def keys(*sets):
        spec, _ = _compile(tmp_path, "pretraining", *sets)
        return {n: t["cachingOptions"].get("cacheKey") for n, (t, _) in _tasks(spec).items() if n in STAGES}

    base = keys()
    assert base == keys("tracking.experiment=other", "pipeline.retries=5")   # where it is tracked/placed: same
    changed = keys("train.sparse.lr=1e-5")
    assert all(changed[s] != base[s] for s in STAGES if s in base)
    image = keys("pipeline.image=other:2")
    assert image["prepare-data"] == base["prepare-data"] and image["pretrain"] != base["pretrain"]


def test_components_follow_the_stage_registry():
    """Each stage's inputs are declared once (STAGES); its component's parameters must match them."""
    for stage in STAGES.values():
        if stage.component is None:
            continue
        comp = stage.load_component()
        params = inspect.signature(comp.python_func).parameters
        artifacts = {n for n in params if n not in ("config_json", "tracking_uri", "parent_run_id")}
        assert artifacts == {input_param(i) for i in stage.inputs + stage.optional} | {stage.output}, stage.name
        for name in stage.optional:
            assert params[input_param(name)].default is None, (stage.name, name)
        assert comp.component_spec.outputs[stage.output].type == f"system.{stage.artifact}@0.0.1"


def test_sub_pipelines_share_components_and_take_missing_inputs_as_uris(tmp_path):
    assert {"end-to-end", "pretraining", "post-training"} <= set(PIPELINES)
    e2e = set(get_pipeline("end-to-end").STAGES)
    for name in ("pretraining", "post-training", "evaluation"):
        assert set(get_pipeline(name).STAGES if name in PIPELINES else ()) <= e2e
    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match="stage warmup needs the output of pretrain .*--input pretrain=URI"):
        builder.build("adapt", ("warmup", "sparse"), "", cfg, reuse={"prepare-data": "/data"})
    pipeline = get_pipeline("pretraining").build(cfg, reuse={"prepare-data": "s3://b/data", "pretrain": "s3://b/p"})
    tasks = pipeline.pipeline_spec.components["comp-exit-handler-1"].dag.tasks
    assert {"warmup", "sparse"} <= set(tasks) and "prepare-data" not in tasks and "pretrain" not in tasks
    importers = [t for t in tasks if t.startswith("importer")]
    assert len(importers) == 2


def test_pods_without_a_tracking_server_fail_with_one_line(monkeypatch):
    from dsaforge.tracking import resolve_tracking_uri

    cfg = load_config("tiny")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(cfg).startswith("sqlite:///")              # a laptop: the local store
    monkeypatch.setenv("KFP_POD_NAME", "end-to-end-abc-123")               # a KFP pod: never a throwaway file
    with pytest.raises(ConfigError, match="no MLflow tracking server for this pod.*dsaforge-mlflow"):
        resolve_tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlflow:5000")
    assert resolve_tracking_uri(cfg) == "http://mlflow.mlflow:5000"


def test_synthesize_fans_out_into_parallel_shards_and_a_merge(tmp_path):
    spec, platform = _compile(tmp_path, "post-training", "synth.shards=16", "pipeline.caching=true",
                              "pipeline.cpu_image=registry.example/dsaforge-cpu:1.2")
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    (loop_name,) = [t for t in tasks if t.startswith("for-loop")]
    loop = tasks[loop_name]
    assert loop["parameterIterator"]["items"]["raw"] == json.dumps(list(range(16)))
    assert loop["iteratorPolicy"]["parallelismLimit"] == 16
    shard = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]["synthesize-shard"]
    # shards use KFP's own key (their inputs); a static key would be shared by all iterations
    assert shard["cachingOptions"] == {"enableCache": True}
    assert "parent_run_id" not in shard["inputs"].get("parameters", {})
    merge = tasks["synthesize-merge"]
    assert merge["taskInfo"]["name"] == "synthesize" and merge["cachingOptions"]["cacheKey"].startswith("dsaforge-")
    assert merge["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]["producerTask"] == loop_name
    shard_exec = spec["components"]["comp-synthesize-shard"]["executorLabel"]
    assert spec["deploymentSpec"]["executors"][shard_exec]["container"]["image"] == "registry.example/dsaforge-cpu:1.2"
    assert spec["deploymentSpec"]["executors"][shard_exec]["container"]["resources"]["resourceCpuRequest"] == "8"
