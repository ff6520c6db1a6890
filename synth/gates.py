"""Validation gates: a task is kept only if every gate holds, and the results are stored with it.

- reference_passes: the reference solution's submission passes the verifier;
- empty_fails: an empty / no-op submission fails;
- deterministic: the verifier gives the same verdicts in a second, independent sandbox run;
- prompt_clean: the prompt holds neither the answer nor hidden metadata;
- env_resets: after the reference solution ran, resetting the environment restores its initial state;
- solvable: non-zero pass@k for the configured solver (the paper keeps non-zero pass@100);
plus each agent class's own acceptance checks (Candidate.extra_gates), e.g. the search agent's ground-truth and
distractor checks, the general agent's tool-only solution rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from dsaforge.synth.base import AgentClass, EnvDraft, HarnessError
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import Task

# Words that only internal metadata would put into a prompt.
HIDDEN_MARKERS = ("hidden", "gold", "expected_answer", "ground_truth", "verifier", "FAIL_TO_PASS", "task_id",
                  "difficulty")


class Solver(Protocol):
    name: str

    def attempts(self, cls: AgentClass, draft: EnvDraft, keys: list[str], k: int, seed: int,
                 sandbox: Sandbox) -> list[list[Any]]: ...


class BaselineSolver:
    """Each agent class's built-in randomised solver (the reference solution with mistakes); used for the pass@k
    filter until a policy model exists."""
    name = "baseline"

    def attempts(self, cls, draft, keys, k, seed, sandbox):
        return cls.attempts(draft.dir, keys, k, seed, sandbox)


@dataclass
class GateReport:
    kept: list[Task] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)     # gate -> tasks that failed it (first failing)
    candidates: int = 0


def prompt_leaks(prompt: str, leaks: list[str]) -> Optional[str]:
    low = prompt.lower()
    for s in leaks:
        s = str(s).strip().strip('"')
        # Short values (a bare "3") occur by chance in any prompt; compare them as whole tokens only.
        if s and (re.search(rf"(?<![\w.]){re.escape(s.lower())}(?!\w|\.\d)", low) if len(s) < 6 else s.lower() in low):
            return s
    for m in HIDDEN_MARKERS:
        if m.lower() in low:
            return m
    return None


def validate_env(cls: AgentClass, draft: EnvDraft, sandbox: Sandbox, solver: Solver, k: int, seed: int,
                 split: str = "train") -> GateReport:
    report = GateReport(candidates=len(draft.candidates))
    cands = draft.candidates
    if not cands:
        return report
    keys = [c.key for c in cands]
    try:
        refs = cls.reference(draft.dir, keys, sandbox)
    except HarnessError:
        refs = [None] * len(keys)
    empties = [cls.empty(key) for key in keys]
    subs = [r if r is not None else {} for r in refs] + empties
    first = cls.verify(draft.dir, keys + keys, subs, sandbox)
    second = cls.verify(draft.dir, keys + keys, subs, sandbox)
    try:
        resets = cls.reset_ok(draft.dir, keys, sandbox)
    except HarnessError:
        resets = False
    n = len(keys)
    pre = []
    for i, c in enumerate(cands):
        gates = {
            "reference_passes": refs[i] is not None and first[i].passed,
            "empty_fails": not first[n + i].passed,
            "deterministic": [v.passed for v in (first[i], first[n + i])] == [v.passed for v in (second[i], second[n + i])]
                             and first[i].score == second[i].score,
            "prompt_clean": prompt_leaks(c.prompt, c.leaks) is None,
            "env_resets": bool(resets),
            **c.extra_gates,
        }
        pre.append(gates)
    # The solver only runs on tasks that passed the cheap gates.
    live = [i for i, g in enumerate(pre) if all(g.values())]
    passes = {i: 0 for i in live}
    if live and k > 0:
        try:
            tries = solver.attempts(cls, draft, [keys[i] for i in live], k, seed, sandbox)
            flat = [s for t in tries for s in t]
            verdicts = cls.verify(draft.dir, [keys[i] for i in live for _ in range(k)], flat, sandbox)
            for j, i in enumerate(live):
                passes[i] = sum(v.passed for v in verdicts[j * k:(j + 1) * k])
        except HarnessError:
            pass
    for i, c in enumerate(cands):
        gates = dict(pre[i], solvable=passes.get(i, 0) > 0)
        failed = [g for g in gates if not gates[g]]
        if failed:
            report.rejected[failed[0]] = report.rejected.get(failed[0], 0) + 1
            continue
        report.kept.append(Task(
            task_id=f"{draft.env_id}-{c.key}", env_id=draft.env_id, agent_class=draft.agent_class, family=c.family,
            difficulty=c.difficulty, prompt=c.prompt, tools=c.tools, verifier=f"envs/{draft.env_id}/{draft.verifier_file}::{c.key}",
            seed=c.seed, gates=gates, pass_k=k, pass_c=passes[i], solver=solver.name, split=split, source=draft.source))
    return report
