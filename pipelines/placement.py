"""Cluster placement of pipeline tasks, from the config: image, requests, accelerators, node pools, volumes,
secrets, retries, timeouts and caching. KFP's local runner ignores the Kubernetes part; it lands in the compiled IR.

Defaults come from the stage registry (`dsaforge.stages.STAGES`: gpu, cpu, memory); `pipeline.resources.<stage>`
overrides them per stage.
"""
from __future__ import annotations

import hashlib
import json

from kfp import kubernetes

from dsaforge.config import Config, ConfigError
from dsaforge.stages import STAGES, Stage


def stage_resources(cfg: Config, stage: Stage) -> dict:
    """The placement of one stage's task: cpu, memory, gpus, timeout_s, retries (after config overrides)."""
    p = cfg.pipeline
    unknown = sorted(set(p.resources) - set(STAGES))
    if unknown:
        raise ConfigError(f"pipeline.resources: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    over = p.resources.get(stage.name)
    out = {"cpu": stage.cpu, "memory": stage.memory, "gpus": p.gpus_per_stage if stage.gpu else 0,
           "timeout_s": p.timeout_s, "retries": p.retries}
    if over is not None:
        out.update({k: v for k, v in over.model_dump().items() if v is not None})
    return out


def cache_key(cfg: Config, stage: str, upstream: dict[str, str]) -> str:
    """What a task's outputs depend on: the stage, the config (minus where it is tracked and placed), the image,
    and the keys of the tasks it reads. Per-run values (parent run id, KFP job id) stay out, so KFP can reuse."""
    from dsaforge import __version__

    conf = cfg.model_dump(exclude={"tracking": True, "pipeline": True, "preset": True})
    image = cfg.pipeline.image if STAGES[stage].gpu else cfg.pipeline.cpu_image
    text = json.dumps({"stage": stage, "config": conf, "image": image, "version": __version__,
                       "upstream": dict(sorted(upstream.items()))}, sort_keys=True, default=str)
    return f"dsaforge-{stage}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def common_task(task, cfg: Config, image: str, cpu: str = "1", memory: str = "1G", retries: int = 0,
                timeout_s: int = 0):
    """What every task gets: image, requests, secrets and env, the workspace volume, retries, timeout."""
    p = cfg.pipeline
    task.set_container_image(image)
    task.set_cpu_request(cpu).set_memory_request(memory)
    for secret in p.secrets:
        kubernetes.use_secret_as_env(task, secret.name, dict(secret.keys), optional=secret.optional)
    for name, value in sorted(p.env.items()):
        task.set_env_variable(name, value)
    if p.workspace_pvc:
        kubernetes.mount_pvc(task, pvc_name=p.workspace_pvc, mount_path=p.workspace_mount)
        task.set_env_variable("DSAFORGE_WORKSPACE", p.workspace_mount)
    if p.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(p.image_pull_secrets))
    if p.image_pull_policy:
        kubernetes.set_image_pull_policy(task, p.image_pull_policy)
    if retries:
        task.set_retry(retries, backoff_duration=f"{p.retry_backoff_s}s", backoff_factor=2.0,
                       backoff_max_duration="3600s")
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)
    return task


def place(task, cfg: Config, stage: Stage, key: str = ""):
    """Place a stage's task from the config; `key` is its cache key (see `cache_key`)."""
    p = cfg.pipeline
    r = stage_resources(cfg, stage)
    if stage.gpu and cfg.parallel.nnodes > 1:
        # The task only launches a Kubeflow Trainer TrainJob (dsaforge.trainjob), whose pods get the GPUs.
        common_task(task, cfg, p.cpu_image, "1", "2G", r["retries"], r["timeout_s"])
        task.set_caching_options(p.caching, cache_key=key or None)
        kubernetes.use_field_path_as_env(task, "DSAFORGE_NAMESPACE", "metadata.namespace")
        for key_, value in p.cpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key_, label_value=value)
        return task
    common_task(task, cfg, p.image if stage.gpu else p.cpu_image, r["cpu"], r["memory"], r["retries"],
                r["timeout_s"])
    task.set_caching_options(p.caching, cache_key=key or None)
    if r["gpus"]:
        task.set_accelerator_type(p.gpu_type).set_accelerator_limit(r["gpus"])
        if p.gpu_toleration:
            # GKE adds this toleration itself; AKS and others do not, so always emit it.
            kubernetes.add_toleration(task, key=p.gpu_type, operator="Exists", effect="NoSchedule")
        # Collective ops need a large /dev/shm.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=p.shm_size)
    if stage.gpu:
        for t in p.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    for key_, value in (p.node_selector if stage.gpu else p.cpu_node_selector).items():
        kubernetes.add_node_selector(task, label_key=key_, label_value=value)
    return task


def control_task(task, cfg: Config):
    """The small tasks that open and close the pipeline's MLflow run: CPU image, never cached (they are per run)."""
    common_task(task, cfg, cfg.pipeline.cpu_image, "1", "1G", retries=cfg.pipeline.retries, timeout_s=600)
    task.set_caching_options(False)
    return task
