"""The agentic suite: the synthesize stage's held-out tasks (split "heldout", held out by environment), per agent
class, rolled out by the checkpoint through the rollout engine and the tasks' own tools (episode interface, every
tool call in the sandbox), each trajectory scored by the task's verifier: pass@1, unbiased pass@k and pass^k over
`eval.samples` rollouts per task.

The policy writes DeepSeek-V3.2's chat format (thinking on), with `eval.max_turns` tool-calling segments per
episode and the discard-all context strategy when the window fills.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dsaforge.config import ConfigError
from dsaforge.eval.passk import summarize
from dsaforge.eval.results import SuiteResult
from dsaforge.progress import Progress


def heldout_tasks(tasks_dir: Path, per_class: int) -> list:
    from dsaforge.synth.task import load_tasks

    manifest = Path(tasks_dir) / "tasks.parquet"
    if not manifest.is_file():
        raise ConfigError(f"agentic suite: {tasks_dir} has no tasks.parquet (not a synthesize output)")
    by_class: dict[str, list] = defaultdict(list)
    for t in load_tasks(manifest, split="heldout"):
        if len(by_class[t.agent_class]) < per_class:
            by_class[t.agent_class].append(t)
    tasks = [t for cls in sorted(by_class) for t in by_class[cls]]
    if not tasks:
        raise ConfigError(f"agentic suite: {manifest} holds no held-out tasks (raise synth.holdout_fraction)")
    return tasks


def run(em, cfg, tasks_dir: Path) -> SuiteResult:
    from dsaforge.data.chat import ChatTemplate
    from dsaforge.model.engine import Engine
    from dsaforge.model.sampling import SamplingParams
    from dsaforge.rollout import EnginePolicy, RolloutConfig, run_episodes
    from dsaforge.synth.episode import make_episode

    e = cfg.eval
    tasks = heldout_tasks(tasks_dir, e.max_samples)
    episodes = [make_episode(t, cfg.synth.sandbox) for t in tasks for _ in range(e.samples)]
    engine = Engine(em.model, "sparse", max_batch=min(64, len(episodes)), max_len=em.max_len, seed=e.seed)
    policy = EnginePolicy(engine, ChatTemplate(em.tokenizer),
                          SamplingParams(temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens))
    with Progress("eval agentic", total=len(episodes), unit="episode") as bar:
        trajs = run_episodes(policy, episodes, RolloutConfig(max_turns=e.max_turns, tool_workers=cfg.synth.workers),
                             on_done=lambda tr: bar.update(1, cls=tr.agent_class))
    rows = []
    for i, tr in enumerate(trajs):
        task = tasks[i // e.samples]
        rows.append({"task_id": tr.task_id, "agent_class": tr.agent_class, "family": task.family,
                     "difficulty": task.difficulty, "sample": i % e.samples, "passed": tr.passed,
                     "reward": tr.reward, "turns": tr.turns, "invalid_calls": tr.invalid_calls,
                     "finish_reason": tr.finish_reason, "tokens": sum(len(w.tokens) for w in tr.windows),
                     "wall_s": tr.wall_s, "detail": tr.detail[:500]})
    ks = [1, *e.pass_k]
    summary: dict = {"tasks": len(tasks), "episodes": len(rows), **summarize(_counts(rows), ks)}
    for cls in sorted({r["agent_class"] for r in rows}):
        mine = [r for r in rows if r["agent_class"] == cls]
        summary[f"{cls}/tasks"] = len({r["task_id"] for r in mine})
        summary[f"{cls}/mean_reward"] = sum(r["reward"] for r in mine) / len(mine)
        summary[f"{cls}/invalid_calls_per_episode"] = sum(r["invalid_calls"] for r in mine) / len(mine)
        # episodes the context window ended (on small models, a task and its tools may not even fit)
        summary[f"{cls}/context_ended"] = sum(r["finish_reason"] == "context" for r in mine) / len(mine)
        summary.update(summarize(_counts(mine), ks, prefix=f"{cls}/"))
    return SuiteResult("agentic", rows, summary, {"samples": e.samples, "temperature": e.temperature,
                                                  "max_turns": e.max_turns, "policy": "engine (sparse)"})


def _counts(rows: list[dict]) -> list[tuple[int, int]]:
    per: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per[r["task_id"]].append(r["passed"])
    return [(len(v), sum(v)) for v in per.values()]
