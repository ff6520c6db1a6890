"""The tiny-RL task set: hundreds of short procedurally generated general-agent tasks (the `lookup` family), in the
synthesize stage's output layout, so the sft and grpo stages read them like any synthesized tasks.

    write_tiny_rl(out_dir, envs=100, heldout_envs=25, seed=0)    # tasks.parquet, envs/, trajectories.parquet

Each environment is a SQLite bundle of 12 items with random codes (10-41); its tasks ask for one item's code, which
only the sandboxed `get_code` tool reveals, so a policy can pass only by calling the tool with the right name and
copying its output into the answer. Held-out tasks come from held-out environments (other codes). The shapes are
chosen for a very small model: the name is quoted in the prompt, so it is the same single token there and in the
call's arguments, and every code is one token of the tiny-RL tokenizer, so each copy is one attention hop.

The tasks are correct by construction (the code is read from the same database the tool and the verifier read), so
they skip synthesize's gates and pass@k filter (their `gates` are empty). Reference trajectories are built from the
same family functions the sandboxed tool runs, with the observation text the episode interface returns; a test
replays them through `make_episode` (real tool calls and verifier in the sandbox) to keep the two identical.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from dsaforge.synth.general import GeneralAgent, family_module
from dsaforge.synth.task import Task, write_manifest

FAMILY = "lookup"


def reference_messages(task: Task) -> list[dict]:
    """The reference solution as a transcript: call get_code with the task's name, answer the code it returns."""
    from dsaforge.synth.episode import SYSTEM, _obs

    fam = family_module(FAMILY)
    meta = json.loads((task.env_dir / "tasks.json").read_text())[task.key]
    conn = sqlite3.connect(f"file:{task.env_dir / 'db.sqlite'}?mode=ro", uri=True)
    try:
        call = {"name": "get_code", "arguments": {"name": meta["params"]["name"]}}
        result = fam.make_tools(conn)["get_code"](**call["arguments"])
    finally:
        conn.close()
    return [{"role": "system", "content": SYSTEM["general"]}, {"role": "user", "content": task.prompt},
            {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]},
            {"role": "tool", "content": _obs(result)},
            {"role": "assistant", "content": json.dumps({"answer": result["code"]}), "reasoning_content": ""}]


def write_tiny_rl(out_dir: Path, envs: int = 100, heldout_envs: int = 25, seed: int = 0) -> dict:
    from dsaforge.synth.trajectory import write_trajectories

    out_dir = Path(out_dir)
    agent = GeneralAgent()
    tasks: list[Task] = []
    for e in range(envs):
        env_id = f"{FAMILY}-{e:04d}"
        draft = agent.build_env(env_id, FAMILY, seed * 100_003 + e, 1, out_dir / "envs" / env_id,
                                {"tasks_per_level": 2 * len(family_module(FAMILY).NAMES)})
        split = "heldout" if e < heldout_envs else "train"
        seen = set()
        for c in draft.candidates:
            if c.prompt in seen:          # the same item asked twice in one environment: keep one
                continue
            seen.add(c.prompt)
            tasks.append(Task(f"{env_id}/{c.key}", env_id, "general", FAMILY, 1, c.prompt, c.tools,
                              f"envs/{env_id}/{draft.verifier_file}::{c.key}", c.seed, split=split, root=out_dir))
    write_manifest(tasks, out_dir / "tasks.parquet")
    rows = []
    for t in tasks:
        messages = reference_messages(t)
        rows.append({"task_id": t.task_id, "agent_class": t.agent_class, "split": t.split, "messages": messages,
                     "tools": t.tools, "n_calls": 1, "passed": True, "score": 1.0, "detail": "by construction"})
    write_trajectories(rows, out_dir / "trajectories.parquet")
    summary = {"tasks": len(tasks), "envs": envs, "heldout_tasks": sum(t.split == "heldout" for t in tasks),
               "heldout_envs": heldout_envs, "family": FAMILY, "seed": seed}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

