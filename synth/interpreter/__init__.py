"""Code interpreter: math and data problems whose answers need executed Python, run in a real Jupyter kernel
(jupyter-client + ipykernel) inside the sandbox and verified numerically (relative tolerance 1e-6)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from dsaforge.synth.base import AgentClass, Candidate, EnvDraft, HarnessError, run_harness
from dsaforge.synth.interpreter.families import FAMILIES, GENERATORS
from dsaforge.synth.task import Verdict

HARNESS = Path(__file__).with_name("harness.py")


def _fmt(x: float) -> list[str]:
    """Renderings of the expected value that must not appear in a prompt."""
    out = {repr(x), f"{x:.6g}", f"{x:.2f}"}
    if float(x).is_integer():
        out.add(str(int(x)))
    return sorted(out)


class CodeInterpreterAgent(AgentClass):
    name = "code_interpreter"
    families = FAMILIES

    def build_env(self, env_id, family, seed, max_difficulty, env_dir, resources):
        rng = random.Random(seed)
        tasks, cands = {}, []
        for level in range(1, max_difficulty + 1):
            for j in range(resources.get("tasks_per_level", 1)):
                key = f"d{level}-{j}"
                p = GENERATORS[family](rng, level)
                for name, text in p["files"].items():
                    (env_dir / key / "data").mkdir(parents=True, exist_ok=True)
                    (env_dir / key / "data" / name).write_text(text)
                tasks[key] = {"expect": p["expect"], "reference": p["reference"], "mistakes": p["mistakes"]}
                files = f" Files: {', '.join(sorted(p['files']))} in the working directory." if p["files"] else ""
                prompt = (p["prompt"] + files + " Use the Python interpreter (a Jupyter kernel); answer "
                          '{"answer": <number>}.')
                cands.append(Candidate(key, family, level, prompt, [_PYTHON_TOOL], leaks=_fmt(p["expect"]), seed=seed))
        env_dir.mkdir(parents=True, exist_ok=True)
        (env_dir / "tasks.json").write_text(json.dumps(tasks, sort_keys=True))
        return EnvDraft(env_id, self.name, family, env_dir, "tasks.json", cands)

    def _tasks(self, env_dir):
        return json.loads((env_dir / "tasks.json").read_text())

    def run_cells(self, env_dir, keys, cells, sandbox) -> list[dict]:
        """Execute one cell per (task key, code) in one kernel; each cell runs in a fresh namespace in the
        directory holding its task's data files."""
        extra = {}
        for k in sorted(set(keys)):
            data = env_dir / k / "data"
            if data.is_dir():
                extra.update({f"{k}/{p.name}": p.read_bytes() for p in data.iterdir()})
        job = {"op": "execute", "cells": [{"cwd": k, "code": c} for k, c in zip(keys, cells)]}
        try:
            return run_harness(sandbox, HARNESS, env_dir, job, include=[], extra=extra,
                               wall_seconds=sandbox.cfg.wall_seconds * 3, site=True)     # jupyter, numpy
        except HarnessError as e:
            return [{"answer": None, "error": str(e)[:300]}] * len(keys)

    def reference(self, env_dir, keys, sandbox):
        tasks = self._tasks(env_dir)
        res = self.run_cells(env_dir, keys, [tasks[k]["reference"] for k in keys], sandbox)
        return [None if r.get("error") else {"answer": r["answer"]} for r in res]

    def verify(self, env_dir, keys, submissions, sandbox):
        tasks = self._tasks(env_dir)
        items = [{"expect": tasks[k]["expect"], "answer": (s or {}).get("answer") if isinstance(s, dict) else None}
                 for k, s in zip(keys, submissions)]
        try:
            out = run_harness(sandbox, HARNESS, env_dir, {"op": "verify", "items": items}, include=[])
        except HarnessError as e:
            return [Verdict(False, 0.0, str(e)[:500], harness_failed=True) for _ in keys]
        return [Verdict.from_dict(o) for o in out]

    def reset_ok(self, env_dir, keys, sandbox):
        """Each task's data must be unchanged after the reference ran (it ran on a private copy), and a fresh
        kernel namespace must not see the previous cell's variables."""
        tasks = self._tasks(env_dir)
        before = {p: p.read_bytes() for p in env_dir.rglob("*") if p.is_file()}
        res = self.run_cells(env_dir, [keys[0], keys[0]], [tasks[keys[0]]["reference"] + "\nleft_behind = 1",
                                                          "answer = float('left_behind' in dir())"], sandbox)
        after = {p: p.read_bytes() for p in env_dir.rglob("*") if p.is_file()}
        return before == after and res[1].get("answer") == 0.0

    def attempts(self, env_dir, keys, k, seed, sandbox):
        """Baseline: the reference program, or with some probability one of the family's typical mistakes."""
        tasks, rng = self._tasks(env_dir), random.Random(seed)
        cells, owners = [], []
        for key in keys:
            for _ in range(k):
                t = tasks[key]
                wrong = rng.random() < 0.15 + 0.1 * int(key[1])
                cells.append(rng.choice(t["mistakes"]) if wrong else t["reference"])
                owners.append(key)
        res = self.run_cells(env_dir, owners, cells, sandbox)
        subs = [{"answer": r.get("answer")} for r in res]
        return [subs[i * k:(i + 1) * k] for i in range(len(keys))]


_PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Run code in a Jupyter kernel; state persists between calls.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
