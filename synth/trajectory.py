"""Reference trajectories: each task's reference solution replayed through its episode's tools, with the real tool
outputs, as a chat transcript (SFT cold-start data, and a check that every task is solvable through the tools).

    traj = reference_trajectory(task, sandbox)        # {"task_id", "messages", "tools", "passed", ...}
    write_reference_trajectories(tasks, out / "trajectories.parquet", sandbox_cfg)

Plans by class: general, the reference `solve`'s tool calls (tool-only by the solution_tool_only gate) and its
answer; search, the reference multi-hop solver's search/open_document calls and its answer; code, read the file,
apply the gold patch, run the visible tests, submit; code interpreter, run the reference program in the live
kernel and answer the number it prints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from dsaforge.progress import Progress
from dsaforge.synth.base import HarnessError, run_harness
from dsaforge.synth.episode import make_episode
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import Task

TRAJECTORY_SCHEMA = pa.schema([
    ("task_id", pa.string()),
    ("agent_class", pa.string()),
    ("split", pa.string()),
    ("messages", pa.string()),       # JSON list of chat messages (dsaforge.data.chat's dicts)
    ("tools", pa.string()),          # JSON list of the episode's function schemas
    ("n_calls", pa.int32()),
    ("passed", pa.bool_()),
    ("score", pa.float64()),
    ("detail", pa.string()),
])


def _plan(task: Task, sandbox: Sandbox) -> tuple[list[dict], Optional[Callable[[list[str]], Any]]]:
    """(tool calls, final(observations) -> submission) for the task's reference solution."""
    cls = task.agent_class
    if cls == "general":
        from dsaforge.synth.general import HARNESS

        out = run_harness(sandbox, HARNESS, task.env_dir, {"op": "plan", "items": [{"key": task.key}]},
                          include=["db.sqlite", "family.py", "tasks.json"])[0]
        if "error" in out:
            raise HarnessError(f"{task.task_id}: reference solution: {out['error'][-300:]}")
        return out["calls"], lambda obs, a=out["answer"]: {"answer": a}
    if cls == "search":
        from dsaforge.synth.registry import agent_class

        out = agent_class("search")._run(task.env_dir, {"op": "plan", "items": [{"key": task.key}]}, sandbox)[0]
        return out["calls"], lambda obs, a=out["answer"]: {"answer": a}
    if cls == "code":
        meta = json.loads((task.env_dir / "hidden" / "tasks.json").read_text())[task.key]
        calls = [{"name": "read_file", "arguments": {"path": f"{meta['module']}.py"}},
                 {"name": "apply_patch", "arguments": {"patch": meta["gold_patch"]}},
                 {"name": "run_visible_tests", "arguments": {}}]
        return calls, lambda obs, p=meta["gold_patch"]: {"patch": p}
    if cls == "code_interpreter":
        meta = json.loads((task.env_dir / "tasks.json").read_text())[task.key]
        code = meta["reference"] + "\nimport json as _json\nprint(_json.dumps(float(answer)))"

        def final(obs):
            return {"answer": json.loads(json.loads(obs[-1])["stdout"].strip().splitlines()[-1])}
        return [{"name": "python", "arguments": {"code": code}}], final
    raise ValueError(f"unknown agent class {cls!r}")


def reference_trajectory(task: Task, sandbox: Sandbox) -> dict:
    """Run the reference plan through a fresh episode; the transcript holds the tools' real outputs."""
    calls, final = _plan(task, sandbox)
    with make_episode(task, sandbox) as ep:
        messages = ep.reset()
        observations = []
        for call in calls:
            obs = ep.step(call)
            observations.append(obs)
            messages.append({"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]})
            messages.append({"role": "tool", "content": obs})
        submission = final(observations)
        messages.append({"role": "assistant", "content": json.dumps(submission), "reasoning_content": ""})
        verdict = ep.submit(ep.submission_from_text(messages[-1]["content"]))
        tools = ep.tools
    return {"task_id": task.task_id, "agent_class": task.agent_class, "split": task.split,
            "messages": messages, "tools": tools, "n_calls": len(calls), "passed": verdict.passed,
            "score": verdict.score, "detail": verdict.detail}


def _row(t: dict) -> dict:
    return dict(t, messages=json.dumps(t["messages"], ensure_ascii=False), tools=json.dumps(t["tools"]))


def write_trajectories(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist([_row(r) for r in rows], schema=TRAJECTORY_SCHEMA) if rows \
        else TRAJECTORY_SCHEMA.empty_table()
    tmp = Path(path).with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_trajectories(path: Path) -> list[dict]:
    """Rows of trajectories.parquet (a file or the synthesize output directory) with messages/tools decoded."""
    path = Path(path)
    if path.is_dir():
        path = path / "trajectories.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no reference trajectories at {path}")
    out = []
    for r in pq.read_table(path).to_pylist():
        r["messages"], r["tools"] = json.loads(r["messages"]), json.loads(r["tools"])
        out.append(r)
    return out


def _safe_trajectory(task: Task, sandbox: Sandbox) -> dict:
    try:
        return reference_trajectory(task, sandbox)
    except Exception as e:   # one broken task must not lose the others; it is recorded as failing
        return {"task_id": task.task_id, "agent_class": task.agent_class, "split": task.split, "messages": [],
                "tools": task.tools, "n_calls": 0, "passed": False, "score": 0.0,
                "detail": f"{type(e).__name__}: {e}"[:500]}


def write_reference_trajectories(tasks: list[Task], path: Path, sandbox: Sandbox,
                                 map_fn: Callable = map) -> dict:
    """Write every task's reference trajectory to `path` (Parquet); `map_fn` may be a process pool's map over
    (task, sandbox) pairs. Returns per-class counts of trajectories and of those that passed."""
    rows, passed = [], 0
    with Progress("synthesize trajectories", total=len(tasks), unit="task") as progress:
        for row in map_fn(_safe_trajectory, tasks, [sandbox] * len(tasks)):
            rows.append(row)
            passed += int(row["passed"])
            progress.update(1, cls=row["agent_class"], passed=passed)
    write_trajectories(rows, path)
    stats: dict[str, dict] = {}
    for r in rows:
        s = stats.setdefault(r["agent_class"], {"trajectories": 0, "passed": 0, "tool_calls": 0})
        s["trajectories"] += 1
        s["passed"] += int(r["passed"])
        s["tool_calls"] += r["n_calls"]
    return stats
