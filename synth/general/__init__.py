"""General agent: synthesised environments backed by a per-environment SQLite database, tools as Python
functions with JSON-schema specs, constraint-heavy tasks, a verifier over the answer and the final state, and a
reference solution that may only call tools (enforced in the sandbox harness)."""
from __future__ import annotations

import importlib
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

from dsaforge.synth.base import AgentClass, Candidate, EnvDraft, HarnessError, copy_source, run_harness
from dsaforge.synth.general.families import FAMILIES
from dsaforge.synth.general.harness import tool_only_problems
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import Verdict

HARNESS = Path(__file__).with_name("harness.py")


def family_module(name: str):
    return importlib.import_module(f"dsaforge.synth.general.families.{name}")


def tool_schemas(fam, difficulty: int) -> list[dict]:
    """The toolset grows with difficulty: a tool joins at its TOOL_LEVEL."""
    return [{"type": "function", "function": {"name": n, **s}} for n, s in fam.SCHEMAS.items()
            if fam.TOOL_LEVEL[n] <= difficulty]


class GeneralAgent(AgentClass):
    name = "general"
    families = FAMILIES

    def build_env(self, env_id, family, seed, max_difficulty, env_dir, resources):
        if family.startswith("llm:"):
            return self._build_in_sandbox(env_id, family, seed, max_difficulty, env_dir, resources)
        fam = family_module(family)
        rng = random.Random(seed)
        # The paper's rule, checked statically here and enforced at run time by the harness.
        tool_only = not tool_only_problems(fam)
        env_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(env_dir / "db.sqlite")
        fam.build_db(conn, rng)
        tasks, cands = {}, []
        # Difficulty is raised step by step inside one environment: each level adds constraints and tools.
        for level in range(1, max_difficulty + 1):
            for j in range(resources.get("tasks_per_level", 1)):
                # A proposal can be unsatisfiable or ambiguous (ties); draw again a few times.
                proposed = next((p for p in (fam.propose(conn, rng, level) for _ in range(5)) if p is not None), None)
                if proposed is None:
                    continue
                params, hidden, prompt = proposed
                key = f"d{level}-{j}"
                tools = tool_schemas(fam, level)
                tasks[key] = {"params": params, "hidden": hidden, "tools": [t["function"]["name"] for t in tools]}
                leaks = fam.leaks(hidden)
                cands.append(Candidate(key, family, level, prompt, tools, leaks=leaks, seed=seed,
                                       extra_gates={"solution_tool_only": tool_only}))
        conn.close()
        (env_dir / "tasks.json").write_text(json.dumps(tasks, sort_keys=True))
        copy_source(fam.__file__, env_dir / "family.py")
        return EnvDraft(env_id, self.name, family, env_dir, "family.py", cands)

    def _build_in_sandbox(self, env_id, family, seed, max_difficulty, env_dir, resources):
        """Model-written families: even generation (build_db, propose) is untrusted code, so the environment is
        built inside the sandbox, in a private directory that becomes the bundle."""
        sandbox: Sandbox = resources["sandbox"]
        env_dir.mkdir(parents=True, exist_ok=True)
        copy_source(resources["llm_families"][family], env_dir / "family.py")
        (env_dir / "harness.py").write_text(HARNESS.read_text())
        res = sandbox.run(sandbox.stdlib_python("/tmp/harness.py"), workdir=env_dir,
                          stdin=json.dumps({"op": "build", "seed": seed, "max_difficulty": max_difficulty,
                                            "tasks_per_level": resources.get("tasks_per_level", 1)}))
        (env_dir / "harness.py").unlink()
        if not res.ok:
            raise HarnessError(f"building {family} in the sandbox: {res.describe()}: {res.stderr[-800:]}")
        built = json.loads(res.stdout.strip().splitlines()[-1])
        schemas = built["schemas"]
        cands = [Candidate(c["key"], family, c["level"], c["prompt"],
                           [{"type": "function", "function": {"name": n, **schemas[n]}} for n in c["tools"]],
                           leaks=c["leaks"], seed=seed, extra_gates={"solution_tool_only": not built["tool_only_problems"]})
                 for c in built["candidates"]]
        return EnvDraft(env_id, self.name, family, env_dir, "family.py", cands, source="llm")

    def reference(self, env_dir, keys, sandbox):
        out = run_harness(sandbox, HARNESS, env_dir, {"op": "solve", "items": [{"key": k} for k in keys]})
        return [None if "error" in o else o for o in out]

    def verify(self, env_dir, keys, submissions, sandbox):
        items = [{"key": k, "submission": s} for k, s in zip(keys, submissions)]
        try:
            out = run_harness(sandbox, HARNESS, env_dir, {"op": "verify", "items": items})
        except HarnessError as e:
            return [Verdict(False, 0.0, str(e)[:500], harness_failed=True) for _ in keys]
        return [Verdict.from_dict(o) for o in out]

    def reset_ok(self, env_dir, keys, sandbox):
        out = run_harness(sandbox, HARNESS, env_dir, {"op": "reset", "items": [{"key": keys[-1]}]})
        return all(o.get("reset_ok") for o in out)

    def attempts(self, env_dir, keys, k, seed, sandbox):
        items = [{"key": key, "seed": seed * 1000 + i} for key in keys for i in range(k)]
        out = run_harness(sandbox, HARNESS, env_dir, {"op": "solve", "items": items})
        subs = [{"answer": None, "calls": []} if "error" in o else o for o in out]
        return [subs[i * k:(i + 1) * k] for i in range(len(keys))]

    def call_tool(self, env_dir: Path, key: str, history: list[dict], call: dict, sandbox: Sandbox) -> Any:
        """Serve one tool call of a rollout: replay the earlier calls on a fresh database, then run `call`.
        Stateless on purpose, so the policy's tool results and the verifier's replay cannot disagree."""
        return self.call_tools(env_dir, [(key, history, call)], sandbox)[0]

    def call_tools(self, env_dir: Path, items: list[tuple[str, list[dict], dict]], sandbox: Sandbox) -> list[Any]:
        """call_tool for several (task key, history, call) of one environment in one sandboxed run, each replayed on
        its own fresh database. Raises HarnessError if the run fails as a whole."""
        out = run_harness(sandbox, HARNESS, env_dir,
                          {"op": "call", "items": [{"key": k, "history": h, "call": c} for k, h, c in items]},
                          include=["db.sqlite", "family.py", "tasks.json"])
        if len(out) != len(items):
            raise HarnessError(f"the tool harness answered {len(out)} of {len(items)} calls")
        return [o.get("result", o) for o in out]
