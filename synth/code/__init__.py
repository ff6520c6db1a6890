"""Code agent: repair tasks built from real offline Python code (pure-Python standard-library modules).

A bug is injected procedurally (AST-located single-line edits, combined for higher difficulty); a task is kept
only when the gold patch gives > 0 FAIL_TO_PASS and 0 PASS_TO_PASS failures, measured by running the hidden
differential tests in the sandbox. Each task's bundle holds only the buggy file for the agent; the tests, the gold
patch and the SWE-smith-style instance record live under `hidden/`, and the pristine module is hidden from every
sandbox that runs agent code (see `agent_sandbox`), so the fix cannot be read from the environment.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

from dsaforge.synth.base import AgentClass, Candidate, EnvDraft, HarnessError, run_harness
from dsaforge.synth.code import harness as H
from dsaforge.synth.code.targets import TARGETS, adapter, cases_for
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import Verdict

HARNESS = Path(__file__).with_name("harness.py")
TESTS_PER_FUNC, CASES_PER_TEST = 2, 3


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# The rollout's tools (served by `dsaforge.synth.episode.CodeEpisode`, run by harness.agent_tool in the sandbox).
CODE_TOOLS = [
    _tool("read_file", "Read the repository's file with line numbers.",
          {"path": {"type": "string"}, "start_line": {"type": "integer"}, "end_line": {"type": "integer"}}, ["path"]),
    _tool("apply_patch", "Apply a unified diff to the repository's file (every context line must match).",
          {"patch": {"type": "string"}}, ["patch"]),
    _tool("run_visible_tests", "Run the calls from the issue against the current file.", {}, []),
]


def pristine_paths(module: str) -> list[str]:
    """The installed module and its bytecode caches: hidden from sandboxes that run agent code."""
    origin = importlib.util.find_spec(module).origin
    cache = Path(origin).parent / "__pycache__"
    return [origin] + [str(p) for p in cache.glob(f"{Path(origin).stem}.*.pyc")]


def agent_sandbox(module: str, base: Sandbox) -> Sandbox:
    return Sandbox(base.cfg, hide=list(base.hide) + pristine_paths(module), uid_base=base.uid_base)


def _call_text(module: str, label: str, args: list) -> str:
    return f"{module} {label}{tuple(args)!r}" if len(args) != 1 else f"{module} {label}({args[0]!r})"


class CodeAgent(AgentClass):
    name = "code"
    families = tuple(TARGETS)

    def build_env(self, env_id, family, seed, max_difficulty, env_dir, resources):
        module, rng = family, random.Random(seed)
        sandbox: Sandbox = resources["sandbox"]
        source = Path(importlib.util.find_spec(module).origin).read_text()
        tests = {}
        for label in TARGETS[module]:
            for j in range(TESTS_PER_FUNC):
                tests[f"test_{label}_{j}"] = {"adapter": adapter(module, label), "label": label,
                                               "cases": [{"args": a} for a in cases_for(module, label, rng, CASES_PER_TEST)]}
        tests = _harness_json(sandbox, {"op": "record", "module": module, "source": source, "tests": tests})
        # Tests whose outcome depends on the run (none expected from these modules) would make F2P meaningless.
        again = _harness_json(sandbox, {"op": "evaluate", "module": module, "sources": [source], "tests": tests})[0]
        tests = {n: t for n, t in tests.items() if again[n]}
        # Single edits that some test notices are the bug pool; harder tasks combine several.
        pool = [s for s in H.sites(source)]
        rng.shuffle(pool)
        pool = pool[:resources.get("mutation_pool", 48)]
        results = _harness_json(sandbox, {"op": "evaluate", "module": module, "tests": tests,
                                          "sources": [H.apply_sites(source, [s]) for s in pool]})
        caught = [(s, {n for n, ok in r.items() if not ok}) for s, r in zip(pool, results) if not all(r.values())]
        # Drop edits that break every test (import-time crashes): they make trivial, unrealistic issues.
        caught = [(s, f) for s, f in caught if len(f) < len(tests)]
        combos, levels = [], []
        for level in range(1, max_difficulty + 1):
            for j in range(resources.get("tasks_per_level", 1)):
                pick = []
                for s, f in rng.sample(caught, len(caught)):
                    if len(pick) == level:
                        break
                    if all(s[4] != p[4] and not H.overlaps(s, p) for p, _ in pick):
                        pick.append((s, f))
                if len(pick) == level:
                    combos.append([s for s, _ in pick])
                    levels.append((level, j))
        if not combos:
            return EnvDraft(env_id, self.name, family, env_dir, "hidden/tasks.json", [])
        buggy_sources = [H.apply_sites(source, c) for c in combos]
        runs = _harness_json(sandbox, {"op": "evaluate", "module": module, "tests": tests,
                                       "sources": buggy_sources + [source]})
        gold_run = runs[-1]
        hidden_ok = self._fix_hidden(module, source, sandbox)
        selected = []
        for combo, buggy, run, (level, j) in zip(combos, buggy_sources, runs[:-1], levels):
            f2p = sorted(n for n in tests if not run[n] and gold_run[n])
            p2p = sorted(n for n in tests if run[n] and gold_run[n])
            p2f = [n for n in tests if run[n] and not gold_run[n]]
            if f2p and not p2f:
                selected.append((combo, buggy, f2p, p2p, p2f, level, j))
        all_examples = self._examples(module, tests, source, [(c, f) for c, _, f, *_ in selected], sandbox)
        tasks, cands = {}, []
        for (combo, buggy, f2p, p2p, p2f, level, j), examples in zip(selected, all_examples):
            key = f"d{level}-{j}"
            if examples is None:
                continue
            (env_dir / key / "repo").mkdir(parents=True, exist_ok=True)
            (env_dir / key / "repo" / f"{module}.py").write_text(buggy)
            gold = H.unified_diff(buggy, source, f"{module}.py")
            tasks[key] = {"module": module, "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "gold_patch": gold,
                          "examples": examples, "repo_sha256": hashlib.sha256(buggy.encode()).hexdigest(),
                          "instance": {"instance_id": f"{env_id}-{key}", "repo": f"cpython-stdlib/{module}",
                                       "patch": H.unified_diff(source, buggy, f"{module}.py"),
                                       "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "base_commit": _python_version(),
                                       "image_name": None}}
            prompt = self._issue(module, level, examples)
            leaks = [gold] + [source.splitlines()[s[0] - 1].strip() for s in combo]
            cands.append(Candidate(key, family, level, prompt, CODE_TOOLS, leaks=leaks, seed=seed,
                                   extra_gates={"fail_to_pass_gt0": bool(f2p), "pass_to_fail_eq0": not p2f,
                                                "fix_hidden": hidden_ok}))
        (env_dir / "hidden").mkdir(parents=True, exist_ok=True)
        (env_dir / "hidden" / "tests.json").write_text(json.dumps(tests, sort_keys=True))
        (env_dir / "hidden" / "tasks.json").write_text(json.dumps(tasks, sort_keys=True))
        with open(env_dir / "hidden" / "instances.jsonl", "w") as f:
            for t in tasks.values():
                f.write(json.dumps(t["instance"], sort_keys=True) + "\n")
        return EnvDraft(env_id, self.name, family, env_dir, "hidden/tasks.json", cands)

    def _fix_hidden(self, module, source, sandbox):
        """From where agent code runs, the pristine module must be unreadable: its source file and bytecode."""
        probe = (f"import importlib.util, pathlib\nspec = importlib.util.find_spec({module!r})\n"
                 "p = pathlib.Path(spec.origin)\nfound = p.read_text() if p.exists() else ''\n"
                 "caches = list((p.parent / '__pycache__').glob(p.stem + '.*.pyc'))\n"
                 "print(len(found), sum(c.stat().st_size for c in caches))")
        r = agent_sandbox(module, sandbox).run_python(probe)
        return r.ok and r.stdout.split() == ["0", "0"]

    def _examples(self, module, tests, source, combos, sandbox):
        """One visible failing call per injected bug: the first F2P case that the single-bug variant gets wrong.
        All variants of the environment are run in one sandbox call."""
        cases = {f"{n}#{i}": {"adapter": tests[n]["adapter"], "label": tests[n]["label"], "cases": [c]}
                 for n in tests for i, c in enumerate(tests[n]["cases"])}
        singles = [H.apply_sites(source, [s]) for combo, _ in combos for s in combo]
        runs = iter(_harness_json(sandbox, {"op": "evaluate", "module": module, "sources": singles, "tests": cases})
                    if singles else [])
        out = []
        for combo, f2p in combos:
            examples = []
            for _ in combo:
                run = next(runs)
                bad = [n for n in cases if n.split("#")[0] in f2p and not run[n]]
                if not bad:
                    examples = None
                    continue
                c = cases[bad[0]]
                if examples is not None:
                    examples.append({"adapter": c["adapter"], "label": c["label"], "args": c["cases"][0]["args"],
                                     "expect": c["cases"][0]["expect"]})
            out.append(examples)
        return out

    @staticmethod
    def _issue(module: str, level: int, examples: list[dict]) -> str:
        lines = [f"The repository holds `{module}.py`, a copy of the Python standard-library module `{module}`, "
                 f"with {'a bug' if level == 1 else 'bugs'} introduced. Calls that misbehave:"]
        for e in examples:
            want = json.dumps(e["expect"])
            lines.append(f"- `{_call_text(module, e['label'], e['args'])}` should give {want}")
        lines.append(f"Fix `{module}.py` without changing its public behaviour elsewhere. Submit a unified diff "
                     f'against `{module}.py` as {{"patch": "..."}}; tests you cannot see decide.')
        return "\n".join(lines)

    # -- gates and scoring --------------------------------------------------------------------------------------
    def _tasks(self, env_dir):
        return json.loads((env_dir / "hidden" / "tasks.json").read_text())

    def reference(self, env_dir, keys, sandbox):
        tasks = self._tasks(env_dir)
        return [{"patch": tasks[k]["gold_patch"]} for k in keys]

    def empty(self, key):
        return {"patch": ""}

    def verify(self, env_dir, keys, submissions, sandbox):
        items = [{"key": k, "submission": s} for k, s in zip(keys, submissions)]
        try:
            out = run_harness(sandbox, HARNESS, env_dir, {"op": "verify", "items": items},
                              include=["hidden", *sorted(set(keys))], wall_seconds=sandbox.cfg.wall_seconds * 3, site=True)
        except HarnessError as e:
            return [Verdict(False, 0.0, str(e)[:500], harness_failed=True) for _ in keys]
        return [Verdict.from_dict(o) for o in out]

    def reset_ok(self, env_dir, keys, sandbox):
        """The bundle is read-only input: after verification ran the gold patch, each repository still hashes
        to the recorded value, and verification copies it fresh every time."""
        tasks = self._tasks(env_dir)
        return all(hashlib.sha256((env_dir / k / "repo" / f"{tasks[k]['module']}.py").read_bytes()).hexdigest()
                   == tasks[k]["repo_sha256"] for k in keys)

    def attempts(self, env_dir, keys, k, seed, sandbox):
        tasks = self._tasks(env_dir)
        items = [{"key": key, "module": tasks[key]["module"], "examples": tasks[key]["examples"], "seed": seed + i}
                 for i, key in enumerate(keys)]
        box = agent_sandbox(tasks[keys[0]]["module"], sandbox)
        out = []
        for item in items:      # one sandbox per task: each repair search gets its own CPU allowance
            try:
                out += run_harness(box, HARNESS, env_dir, {"op": "repair", "items": [item], "k": k},
                                   include=[item["key"]], wall_seconds=sandbox.cfg.wall_seconds, site=True)
            except HarnessError:
                out.append([""] * k)
        return [[{"patch": p} for p in patches] for patches in out]


def _harness_json(sandbox: Sandbox, job: dict):
    res = sandbox.run([sandbox.python, "-I", "/tmp/harness.py"], files={"harness.py": HARNESS.read_text()},
                      stdin=json.dumps(job), wall_seconds=sandbox.cfg.wall_seconds * 3)
    if not res.ok:
        raise HarnessError(f"code harness: {res.describe()}: {res.stderr[-1500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _python_version() -> str:
    import sys
    return f"cpython-{sys.version.split()[0]}"
