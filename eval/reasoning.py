"""The reasoning suite: procedurally generated tasks from `reasoning-gym`, each answer scored by its dataset's own
verifier (`score_answer`, a float in [0, 1]), never by string match here.

The prompt asks for the answer between <answer> tags and opens the tag itself, so a base model continues straight
into its answer; the answer is what comes before `</answer>` (or the first line when the tag is never closed).
Only the question is shown: entries' metadata can hold the answer.
"""
from __future__ import annotations

from typing import Optional, Sequence

from dsaforge.config import ConfigError
from dsaforge.eval.extract import extract_answer
from dsaforge.eval.passk import summarize
from dsaforge.eval.results import SuiteResult

PROMPT = "{question}\nGive only the final answer between <answer> and </answer>.\nAnswer: <answer>"


def answer_from_completion(completion: str) -> Optional[str]:
    """The answer in a completion of PROMPT (which already opened <answer>)."""
    if "</answer>" in completion:
        return extract_answer("<answer>" + completion)
    line = completion.strip().splitlines()
    return line[0].strip() if line else None


def load_tasks(names: Sequence[str], per_task: int, seed: int) -> list[tuple[str, object, list[dict]]]:
    """(name, dataset, entries) per configured reasoning-gym dataset."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("the reasoning suite needs the `reasoning-gym` package (pip install reasoning-gym)") from None
    out = []
    for name in names:
        try:
            ds = reasoning_gym.create_dataset(name, size=per_task, seed=seed)
        except Exception as e:   # noqa: BLE001 - reasoning-gym raises bare errors for unknown names and configs
            raise ConfigError(f"eval.reasoning_tasks: reasoning-gym has no usable dataset {name!r} ({e})") from None
        out.append((name, ds, [ds[i] for i in range(len(ds))]))
    return out


def score_completions(ds, entries: Sequence[dict], completions: Sequence[Sequence[str]], task: str) -> list[dict]:
    rows = []
    for i, (entry, samples) in enumerate(zip(entries, completions)):
        for j, c in enumerate(samples):
            answer = answer_from_completion(c)
            s = float(ds.score_answer(answer, entry)) if answer is not None else 0.0
            rows.append({"task": task, "item": i, "sample": j, "question": entry["question"], "completion": c,
                         "answer": answer, "reference": None if entry["answer"] is None else str(entry["answer"]),
                         "score": s, "passed": s >= 1.0})
    return rows


def run(cfg, generator) -> SuiteResult:
    e = cfg.eval
    rows = []
    for name, ds, entries in load_tasks(e.reasoning_tasks, e.max_samples, e.seed):
        completions = generator.generate([PROMPT.format(question=x["question"]) for x in entries], e.samples,
                                         e.max_new_tokens, stop=("</answer>", "\n\n"))
        rows += score_completions(ds, entries, completions, name)
    summary: dict = {"items": len({(r["task"], r["item"]) for r in rows}),
                     "mean_score": _mean(r["score"] for r in rows)}
    for name in e.reasoning_tasks:
        mine = [r for r in rows if r["task"] == name]
        summary[f"{name}/mean_score"] = _mean(r["score"] for r in mine)
        summary.update(summarize(_counts(mine), [1, *e.pass_k], prefix=f"{name}/"))
    summary.update(summarize(_counts(rows), [1, *e.pass_k]))
    return SuiteResult("reasoning", rows, summary, {"tasks": list(e.reasoning_tasks), "samples": e.samples,
                                                    "temperature": e.temperature})


def _counts(rows: list[dict]) -> list[tuple[int, int]]:
    per: dict = {}
    for r in rows:
        per.setdefault((r["task"], r["item"]), []).append(r["passed"])
    return [(len(v), sum(v)) for v in per.values()]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
