"""Run records of local pipeline runs (`<pipeline.home>/runs/<time>-<pipeline>-<id>/`): the resolved config and a
summary.json written whether the run finished or failed, with the outputs of every task that finished. They are
what `dsaforge run --resume RUN` starts from: the finished stages' outputs are imported, the rest run again."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

from dsaforge.config import ConfigError
from dsaforge.outputs import pid_alive


def finished_outputs(run_dir: Optional[Path]) -> dict[str, str]:
    """stage -> output path for every stage task of a KFP local run folder that finished (it wrote
    executor_output.json; a failed or never-started task did not)."""
    from dsaforge.stages import STAGES

    out: dict[str, str] = {}
    if run_dir is None or not run_dir.is_dir():
        return out
    # KFP names a task after its component: the stage's, or its merge component when it fanned out
    by_task = {s.name: s for s in STAGES.values()}
    by_task.update({s.fan_out[1].split(":")[1].replace("_", "-"): s for s in STAGES.values() if s.fan_out})
    for task in sorted(run_dir.iterdir()):
        stage = by_task.get(task.name)
        if stage is not None and (task / "executor_output.json").is_file() and (task / stage.output).exists():
            out[stage.name] = str(task / stage.output)
    return out


def find_record(home: Path, ref: str) -> Path:
    """A run record by its folder (path or name) or a prefix of its pipeline run id (the newest such record)."""
    path = Path(ref)
    if (path / "summary.json").is_file():
        return path
    runs = home / "runs"
    candidates = sorted(p for p in runs.glob("*") if (p / "summary.json").is_file()
                        and (p.name == ref or json.loads((p / "summary.json").read_text())
                             .get("pipeline_run_id", "").startswith(ref)))
    if not candidates:
        raise ConfigError(f"--resume {ref}: no run record with that name or run id under {runs}")
    return candidates[-1]


def running_record(summary: dict[str, Any], kfp_root: Path) -> dict[str, Any]:
    """The record of a run that has started: enough to resume it if the process dies before it ends."""
    return dict(summary, state="RUNNING", kfp_root=str(kfp_root), pid=os.getpid(), host=socket.gethostname())


def load_record(record: Path) -> dict[str, Any]:
    summary = json.loads((record / "summary.json").read_text())
    if summary.get("state") == "SUCCEEDED":
        raise ConfigError(f"--resume {record.name}: that run finished; nothing to resume")
    if summary.get("state") == "RUNNING":
        if summary.get("host") == socket.gethostname() and pid_alive(int(summary.get("pid", 0))):
            raise ConfigError(f"--resume {record.name}: that run is still running (pid {summary['pid']})")
        # the process died (killed, machine lost): what finished is what its tasks wrote
        root = Path(summary["kfp_root"])
        runs = [p for p in root.glob(f"{summary['pipeline']}-*") if p.is_dir()] if root.is_dir() else []
        summary["finished"] = finished_outputs(runs[0]) if len(runs) == 1 else {}
    return summary
