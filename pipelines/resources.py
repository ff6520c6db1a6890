"""Cluster placement for pipeline tasks, from the config (ignored by KFP's local runner, kept in the compiled IR)."""
from __future__ import annotations

from kfp import kubernetes

from dsaforge.config import Config


def cpu_task(task, cpu: str = "2", memory: str = "8G"):
    task.set_cpu_request(cpu).set_memory_request(memory)
    task.set_caching_options(False)
    return task


def gpu_task(task, cfg: Config, cpu: str = "8", memory: str = "64G"):
    cpu_task(task, cpu, memory)
    p = cfg.pipeline
    if p.gpus_per_stage:
        task.set_accelerator_type(p.gpu_type).set_accelerator_limit(p.gpus_per_stage)
        if p.gpu_toleration:
            # GKE adds this toleration itself; AKS and others do not, so always emit it.
            kubernetes.add_toleration(task, key=p.gpu_type, operator="Exists", effect="NoSchedule")
        # Collective ops need a large /dev/shm.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    for key, value in p.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task
