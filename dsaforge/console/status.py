"""Per-step status of a run: the pipeline's tasks, each matched with its MLflow child run and (local runs) the
executor output KFP writes when a task succeeds. MLflow says running/failed and carries metrics and errors; the
executor output is the runner's own word that a task finished, even where tracking lagged."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from dsaforge.console.graph import Graph
from dsaforge.console.store import ACTIVE, Run
from dsaforge.stages import STAGES

PENDING, RUNNING, SUCCEEDED, FAILED, SKIPPED = "pending", "running", "succeeded", "failed", "skipped"
_MLFLOW = {"RUNNING": RUNNING, "SCHEDULED": RUNNING, "FINISHED": SUCCEEDED, "FAILED": FAILED, "KILLED": FAILED}
# A running training stage's progress: its last logged step of this metric over the configured steps.
_STEP_METRIC = "train/lr"


@dataclass
class Step:
    name: str
    state: str = PENDING
    mlflow_run_id: Optional[str] = None
    start: Optional[float] = None
    end: Optional[float] = None
    error: str = ""
    progress: Optional[float] = None               # 0..1 while running, when the stage reports steps
    highlights: dict = field(default_factory=dict)

    @property
    def seconds(self) -> Optional[float]:
        return None if self.start is None else (self.end or time.time()) - self.start


@dataclass
class RunStatus:
    steps: list[Step]
    parent_run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    parent_status: Optional[str] = None
    error: str = ""

    @property
    def progress(self) -> float:
        if not self.steps:
            return 0.0
        done = sum(s.state in (SUCCEEDED, SKIPPED) for s in self.steps)
        partial = sum(s.progress or 0.0 for s in self.steps if s.state == RUNNING)
        return (done + partial) / len(self.steps)

    def states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.steps}


def stage_tasks(graph: Graph) -> list[str]:
    """The tasks a user follows: the stages (open-run and close-run are bookkeeping)."""
    order = list(STAGES)
    return sorted((n for n in graph.nodes if n in STAGES), key=order.index) or list(graph.nodes)


def _metadata(executor_output: dict) -> dict:
    """The numbers a reader checks first, from the output artifacts' metadata (per-layer detail stays in MLflow)."""
    meta = {}
    for output in executor_output.get("artifacts", {}).values():
        for artifact in output.get("artifacts", []):
            for key, value in artifact.get("metadata", {}).items():
                if key in ("mlflow_run_id", "stage", "mode") or "layer" in key or not isinstance(value, (int, float)):
                    continue
                meta[key] = float(f"{value:.4g}") if isinstance(value, float) else value
    return meta


def run_status(run: Run, graph: Graph, uri: str, executor_outputs: dict[str, dict],
               task_states: Optional[dict[str, str]] = None) -> RunStatus:
    """`executor_outputs`: local tasks that finished, by name; `task_states`: a cluster's own word on each task."""
    from dsaforge.tracking_query import find_pipeline_runs

    pipeline_run_id = run.remote_id if run.backend != "local" and run.remote_id else run.id
    experiment = run.config.get("tracking", {}).get("experiment", "dsaforge")
    try:
        parent, children = find_pipeline_runs(uri, experiment, pipeline_run_id)
        tracking_error = ""
    except Exception as e:  # noqa: BLE001 - an unreachable store shows on the page; the run itself is unaffected
        parent, children, tracking_error = None, [], f"MLflow store {uri}: {str(e).strip().splitlines()[0]}"
    by_stage = {c.tags.get("dsaforge.stage", c.name): c for c in children}
    steps = []
    for name in stage_tasks(graph):
        step = Step(name)
        child = by_stage.get(name)
        if child is not None:
            step.state, step.mlflow_run_id = _MLFLOW.get(child.status, PENDING), child.run_id
            step.start, step.end = child.start, child.end if child.status != "RUNNING" else None
            step.error = child.tags.get("dsaforge.error", "")
        if step.state == PENDING and task_states and name in task_states:
            step.state = task_states[name]
        if name in executor_outputs:
            step.state = SUCCEEDED
            step.highlights = _metadata(executor_outputs[name])
        if step.state == RUNNING:
            if run.status not in ACTIVE:
                step.state = FAILED                   # a run that ended cannot still have a running step
            else:
                step.progress = _step_progress(run, name, uri, child.run_id if child else None)
        if step.state == PENDING and run.status not in ACTIVE:
            step.state = SKIPPED
        steps.append(step)
    status = RunStatus(steps, error=tracking_error)
    if parent is not None:
        status.parent_run_id, status.experiment_id, status.parent_status = (parent.run_id, parent.experiment_id,
                                                                            parent.status)
    return status


def _step_progress(run: Run, stage: str, uri: str, child_run_id: Optional[str]) -> Optional[float]:
    total = run.config.get("train", {}).get(stage, {}).get("steps") if stage in ("pretrain", "warmup", "sparse") else None
    if not total or not child_run_id:
        return None
    from dsaforge.tracking_query import last_step

    try:
        step = last_step(uri, child_run_id, _STEP_METRIC)
    except Exception:  # noqa: BLE001 - progress is a nicety; the step's state stands without it
        return None
    return None if step is None else min(1.0, step / total)       # logged after the step, numbered from 1
