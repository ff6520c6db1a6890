"""The task contract shared by synthesis, RL and evaluation.

A `Task` is the paper's <environment, tools, task, verifier> tuple as one manifest row: the prompt and tool
schemas a policy sees, plus a reference to the environment bundle that holds the state, the tools' code and the
verifier. `Task.evaluate(submission)` and `Task.reward(submission)` are the only way to score an answer, so
evaluation and RL share one code path (and one sandbox).

Submissions, by agent class:
- general: {"answer": <json>, "calls": [{"name": tool, "arguments": {...}}, ...]} - the calls are replayed on a
  fresh copy of the environment's database, and the verifier checks the answer and the final state.
- code: {"patch": "<unified diff>"} against the repository snapshot in the bundle.
- search, code_interpreter: {"answer": <str | number>}.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

GENERATOR_VERSION = "dsaforge-synth/1"
AGENT_CLASSES = ("general", "code", "search", "code_interpreter")
GATES = ("reference_passes", "empty_fails", "deterministic", "prompt_clean", "env_resets", "solvable")

MANIFEST_SCHEMA = pa.schema([
    ("task_id", pa.string()),
    ("env_id", pa.string()),
    ("agent_class", pa.string()),
    ("family", pa.string()),
    ("difficulty", pa.int32()),
    ("prompt", pa.string()),
    ("tools", pa.string()),            # JSON list of OpenAI-style function schemas
    ("verifier", pa.string()),         # "envs/<env_id>/<file>::<task key>", relative to the manifest
    ("seed", pa.int64()),
    ("generator_version", pa.string()),
    ("gates", pa.string()),            # JSON {gate: bool}; every row in a manifest has all gates true
    ("pass_k", pa.int32()),            # solver samples drawn for the pass@k filter
    ("pass_c", pa.int32()),            # of which passed
    ("solver", pa.string()),
    ("split", pa.string()),            # "train" | "heldout" (held out by environment)
    ("source", pa.string()),           # "procedural" | "llm"
])


@dataclass
class Verdict:
    passed: bool
    score: float
    detail: str = ""
    harness_failed: bool = False    # the verifier's run failed as a whole (timeout, crash), not this submission

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(bool(d["passed"]), float(d.get("score", 1.0 if d["passed"] else 0.0)), str(d.get("detail", "")))


@dataclass
class Task:
    task_id: str
    env_id: str
    agent_class: str
    family: str
    difficulty: int
    prompt: str
    tools: list[dict]
    verifier: str
    seed: int
    generator_version: str = GENERATOR_VERSION
    gates: dict[str, bool] = field(default_factory=dict)
    pass_k: int = 0
    pass_c: int = 0
    solver: str = ""
    split: str = "train"
    source: str = "procedural"
    root: Optional[Path] = field(default=None, repr=False, compare=False)   # manifest directory

    @property
    def key(self) -> str:
        return self.verifier.split("::", 1)[1]

    @property
    def env_dir(self) -> Path:
        if self.root is None:
            raise ValueError(f"task {self.task_id} is not attached to a manifest directory (load it with load_tasks)")
        return self.root / "envs" / self.env_id

    def evaluate(self, submission: Any, sandbox=None) -> Verdict:
        """Score one submission in a sandbox built from the default SandboxConfig unless one is given."""
        return self.evaluate_many([submission], sandbox)[0]

    def evaluate_many(self, submissions: list[Any], sandbox=None) -> list[Verdict]:
        return evaluate_tasks([self] * len(submissions), submissions, sandbox)

    def reward(self, submission: Any, sandbox=None) -> float:
        """The rule-based outcome reward of the paper's agent tasks: the verifier's score in [0, 1]."""
        return self.evaluate(submission, sandbox).score

    def row(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d["tools"], d["gates"] = json.dumps(self.tools, sort_keys=True), json.dumps(self.gates, sort_keys=True)
        return d


def write_manifest(tasks: list[Task], path: Path) -> None:
    rows = [t.row() for t in tasks]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA) if rows else MANIFEST_SCHEMA.empty_table()
    pq.write_table(table, path)


def evaluate_tasks(tasks: list[Task], submissions: list[Any], sandbox=None, batch: int = 16) -> list[Verdict]:
    """The verdicts of (task, submission) pairs, with one verifier run per environment (up to `batch` items each)
    instead of one per pair: a GRPO group's samples of one prompt, or an evaluation's prompts from one environment,
    are checked in one sandboxed process. Each item is scored on its own (a general replay starts from a fresh copy
    of the database), so the verdicts are those of scoring each pair alone. If a shared run fails as a whole (a
    submission that makes the harness time out or crash), its items are scored one by one, so one submission cannot
    fail the others."""
    from dsaforge.synth.registry import agent_class
    from dsaforge.synth.sandbox import Sandbox

    if len(tasks) != len(submissions):
        raise ValueError(f"{len(tasks)} tasks but {len(submissions)} submissions")
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault((t.agent_class, t.env_dir), []).append(i)
    out: list[Optional[Verdict]] = [None] * len(tasks)
    for (cls_name, env_dir), members in groups.items():
        cls, root = agent_class(cls_name), tasks[members[0]].root
        box = sandbox or Sandbox(hide=[str(root)] if root else ())
        for lo in range(0, len(members), batch):
            idx = members[lo:lo + batch]
            verdicts = cls.verify(env_dir, [tasks[i].key for i in idx], [submissions[i] for i in idx], box)
            if len(idx) > 1 and any(v.harness_failed for v in verdicts):
                verdicts = [cls.verify(env_dir, [tasks[i].key], [submissions[i]], box)[0] for i in idx]
            for i, v in zip(idx, verdicts):
                out[i] = v
    return out   # type: ignore[return-value]


def load_tasks(path: Path, split: Optional[str] = None) -> list[Task]:
    """Tasks from a manifest (a file, or the synthesize stage's output directory holding tasks.parquet)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tasks.parquet"
    out = []
    for r in pq.read_table(path).to_pylist():
        if split and r["split"] != split:
            continue
        r["tools"], r["gates"] = json.loads(r["tools"]), json.loads(r["gates"])
        out.append(Task(**r, root=path.parent))
    return out
