"""Multi-node training stages as Kubeflow Trainer TrainJobs (trainer.kubeflow.org/v1alpha1, torch runtime).

When `parallel.nnodes > 1`, a training stage's KFP task becomes a launcher: it stages the inputs on the shared
workspace volume (`pipeline.workspace_pvc`, ReadWriteMany), creates a TrainJob whose `numNodes` pods each run
`torchrun -m dsaforge.model.train.launch STAGE ...` (the torch runtime gives every node PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads), waits while
reporting the job's status, streams the rank-0 pod's log, and copies the stage's outputs from the workspace into
the task's output artifact. Rank 0 logs to the stage's MLflow run, which the launcher opened.

The manifest is plain data (no Kubernetes client needed to build it); tests validate it against Kubeflow
Trainer's published API models (the `kubeflow-trainer-api` package).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dsaforge.config import Config, ConfigError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"           # the torch runtime's replicated job and container name
DONE = ("Complete", "Failed")


def job_name(stage: str, key: str) -> str:
    """A DNS-1035 name, short enough for the JobSet's pod names (TrainJob names are limited to 63 characters)."""
    return re.sub(r"[^a-z0-9-]", "-", f"dsaforge-{stage}-{key}".lower())[:40].rstrip("-")


def _env(cfg: Config, extra: dict[str, str]) -> list[dict[str, Any]]:
    env = [{"name": k, "value": v} for k, v in sorted({**cfg.pipeline.env, **extra}.items())]
    for secret in cfg.pipeline.secrets:
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key,
                                                              "optional": secret.optional}}}
                for key, var in secret.keys.items()]
    return env


def node_command(stage: str, config: str, out: str, inputs: dict[str, str], tracking_uri: str = "",
                 run_id: str = "") -> list[str]:
    """What every node runs; torchrun takes nnodes, nproc-per-node, node rank and master from the PET_* env."""
    cmd = ["python", "-m", "torch.distributed.run", "-m", "dsaforge.model.train.launch", stage,
           "--config", config, "--out", out]
    for name, path in sorted(inputs.items()):
        cmd += ["--input", f"{name}={path}"]
    if tracking_uri and run_id:
        cmd += ["--tracking-uri", tracking_uri, "--run-id", run_id]
    return cmd


def manifest(cfg: Config, stage: str, name: str, namespace: str, command: list[str],
             env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The TrainJob of a multi-node stage: torch runtime, numNodes, resources per node, env (plain and from the
    configured Secrets), the shared workspace volume and a memory-backed /dev/shm, GPU-pool placement."""
    from dsaforge.pipelines.placement import stage_resources
    from dsaforge.stages import get_stage

    p, par = cfg.pipeline, cfg.parallel
    if not p.workspace_pvc:
        raise ConfigError(f"parallel.nnodes={par.nnodes} needs pipeline.workspace_pvc (a ReadWriteMany volume "
                          "every node mounts: inputs, checkpoints and outputs go through it)")
    r = stage_resources(cfg, get_stage(stage))
    gpus = r["gpus"]
    if gpus and gpus != par.nproc_per_node:
        raise ConfigError(f"parallel.nproc_per_node={par.nproc_per_node} but each node gets {gpus} GPUs "
                          "(pipeline.gpus_per_stage / pipeline.resources); they must match")
    resources: dict[str, Any] = {"requests": {"cpu": r["cpu"], "memory": r["memory"]}}
    if gpus:
        resources["limits"] = {p.gpu_type: str(gpus)}
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": p.workspace_pvc}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", **({"sizeLimit": p.shm_size} if p.shm_size else {})}}]
    mounts = [{"name": "workspace", "mountPath": p.workspace_mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    tolerations = ([{"key": p.gpu_type, "operator": "Exists", "effect": "NoSchedule"}] if gpus and p.gpu_toleration
                   else [])
    tolerations += [{k: v for k, v in t.model_dump().items() if v is not None} for t in p.tolerations]
    pod: dict[str, Any] = {"volumes": volumes, "containers": [{"name": NODE, "volumeMounts": mounts}]}
    if p.node_selector:
        pod["nodeSelector"] = dict(p.node_selector)
    if tolerations:
        pod["tolerations"] = tolerations
    if p.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in p.image_pull_secrets]
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": p.trainer_runtime},
        "trainer": {"image": p.image, "command": command, "numNodes": par.nnodes,
                    "numProcPerNode": par.nproc_per_node, "resourcesPerNode": resources,
                    "env": _env(cfg, {"DSAFORGE_WORKSPACE": p.workspace_mount, **(env or {})})},
        "runtimePatches": [{"manager": "dsaforge", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}],
    }
    if r["timeout_s"]:
        spec["activeDeadlineSeconds"] = r["timeout_s"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "dsaforge", "dsaforge.stage": stage}},
            "spec": spec}


def state(job: dict[str, Any]) -> tuple[str, str]:
    """(Complete | Failed | Suspended | Running | Pending, message) from a TrainJob's status conditions."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    for kind in (*DONE, "Suspended"):
        c = conditions.get(kind)
        if c and c.get("status") == "True":
            return kind, c.get("message") or c.get("reason") or ""
    jobs = (job.get("status") or {}).get("jobsStatus") or []
    return ("Running" if any(j.get("active") for j in jobs) else "Pending"), ""


class Kube:
    """The few Kubernetes calls a TrainJob launcher makes (in-cluster service account, else kubeconfig)."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError):
                raise ConfigError("parallel.nnodes > 1 runs as a Kubeflow Trainer TrainJob: no Kubernetes "
                                  "cluster here (no in-cluster service account, no kubeconfig)") from None
        self.custom, self.core = client.CustomObjectsApi(), client.CoreV1Api()

    def create(self, body: dict) -> None:
        ns = body["metadata"]["namespace"]
        self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def get(self, namespace: str, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def delete(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def rank0_pod(self, namespace: str, name: str) -> Optional[str]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=(
            f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE},"
            "batch.kubernetes.io/job-completion-index=0")).items
        running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        return running[0].metadata.name if running else None

    def stream_log(self, namespace: str, pod: str, write: Callable[[str], None]) -> None:
        resp = self.core.read_namespaced_pod_log(pod, namespace, container=NODE, follow=True, _preload_content=False)
        for line in resp.stream():
            write(line.decode(errors="replace"))


def wait(kube, namespace: str, name: str, poll_s: float = 10.0, timeout_s: float = 0,
         log: Callable[[str], None] = print) -> tuple[str, str]:
    """Poll until the TrainJob completes or fails, saying each change of state; stream rank 0's log meanwhile."""
    last, streaming, t0 = None, False, time.time()
    while True:
        current, message = state(kube.get(namespace, name))
        if current != last:
            log(f"trainjob {name}: {current}" + (f" ({message})" if message else ""))
            last = current
        if not streaming and current == "Running":
            pod = kube.rank0_pod(namespace, name)
            if pod:
                threading.Thread(target=kube.stream_log, args=(namespace, pod, lambda s: print(s, end="")),
                                 daemon=True).start()
                streaming = True
        if current in DONE:
            return current, message
        if timeout_s and time.time() - t0 > timeout_s:
            return "Failed", f"no result after {timeout_s:.0f} s"
        time.sleep(poll_s)


def run_trainjob(ctx, stage: str, kube=None) -> dict:
    """Run a training stage as a TrainJob from inside its KFP task (see the module docstring)."""
    cfg = ctx.cfg
    root = Path(os.environ.get("DSAFORGE_WORKSPACE") or cfg.pipeline.workspace_mount)
    namespace = os.environ.get("DSAFORGE_NAMESPACE") or cfg.pipeline.namespace
    key = (getattr(ctx.tracker, "run_id", None) or f"{int(time.time())}")[:12]
    name = job_name(stage, key)
    work = root / "trainjobs" / name
    inputs = {}
    for input_name, path in ctx.inputs.items():      # the nodes cannot see the task's artifact paths: stage them
        dest = work / "inputs" / input_name
        if not dest.exists():
            shutil.copytree(path, dest)
        inputs[input_name] = str(dest)
    (work / "config.json").write_text(cfg.model_dump_json())
    out = work / "out"
    command = node_command(stage, str(work / "config.json"), str(out), inputs,
                           getattr(ctx.tracker, "uri", "") or "", ctx.tracker.run_id or "")
    body = manifest(cfg, stage, name, namespace, command)
    (work / "trainjob.json").write_text(json.dumps(body, indent=2))
    kube = kube or Kube()
    kube.create(body)
    ctx.tracker.set_tags({"dsaforge.trainjob": f"{namespace}/{name}"})
    result, message = wait(kube, namespace, name, timeout_s=body["spec"].get("activeDeadlineSeconds", 0))
    if result != "Complete":
        raise RuntimeError(f"{stage}: TrainJob {namespace}/{name} failed: {message or 'no message'}")
    shutil.copytree(out, ctx.out_dir, dirs_exist_ok=True)
    return json.loads((ctx.out_dir / "metrics.json").read_text())
