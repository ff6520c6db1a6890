"""Runs inside the sandbox (standard library only): serves a general-agent environment's tools, runs reference
solutions with nothing but tool functions in scope, replays submitted tool calls on a fresh copy of the
database and applies the verifier.

Reads a job {"op": "solve" | "verify" | "reset", "items": [...]} on stdin, prints one JSON list on stdout.
"""
import ast
import functools
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import random
import shutil
import sqlite3
import sys
import traceback
import types

SAFE_BUILTINS = {n: __builtins__[n] if isinstance(__builtins__, dict) else getattr(__builtins__, n) for n in (
    "abs", "all", "any", "bool", "dict", "enumerate", "filter", "float", "int", "isinstance", "len", "list", "map",
    "max", "min", "range", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "zip", "ValueError",
    "KeyError", "Exception", "frozenset", "divmod", "print")}
BANNED_NAMES = {"open", "eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "globals",
                "locals", "vars", "sqlite3", "conn", "os", "sys", "shutil", "type", "object", "breakpoint", "input"}


def load_family():
    spec = importlib.util.spec_from_file_location("family", "family.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def solution_functions(fam):
    return {n: getattr(fam, n) for n in dir(fam) if n == "solve" or n.startswith("_sol_")}


def tool_only_problems(fam):
    """The paper's rule: a solution may call tools and compute, but never touch the database or anything else."""
    problems = []
    for name, fn in solution_functions(fam).items():
        tree = ast.parse(inspect.getsource(fn))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
                problems.append(f"{name}: import/global statement")
            elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
                problems.append(f"{name}: uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                problems.append(f"{name}: private attribute {node.attr}")
    return problems


def restricted(fam):
    """Rebind the solution functions to globals holding only safe builtins, pure modules and each other."""
    g = {"__builtins__": SAFE_BUILTINS, "math": math, "itertools": itertools, "functools": functools}
    for name, fn in solution_functions(fam).items():
        g[name] = types.FunctionType(fn.__code__, g, name, fn.__defaults__, fn.__closure__)
    return g["solve"]


class Tools:
    """Attribute access to the allowed tools; records every call as the trajectory would."""

    def __init__(self, funcs, allowed):
        self._funcs, self._allowed, self.calls = funcs, set(allowed), []

    def call(self, name, arguments):
        self.calls.append({"name": name, "arguments": arguments})
        if name not in self._allowed:
            return {"error": f"unknown tool {name}"}
        try:
            return self._funcs[name](**arguments)
        except Exception as e:  # a bad call is the caller's problem, reported as a tool error
            return {"error": f"{type(e).__name__}: {e}"}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda **kw: self.call(name, kw)


def fresh_conn():
    shutil.copyfile("db.sqlite", "work.sqlite")
    return sqlite3.connect("work.sqlite")


def db_hash(path):
    conn = sqlite3.connect(path)
    h = hashlib.sha256()
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
        for row in conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2"):
            h.update(repr(row).encode())
    conn.close()
    return h.hexdigest()


def solve(fam, task, seed):
    conn = fresh_conn()
    tools = Tools(fam.make_tools(conn), task["tools"])
    rng = None if seed is None else random.Random(seed)
    answer = restricted(fam)(tools, task["params"], rng)
    conn.commit()
    conn.close()
    return {"calls": tools.calls, "answer": answer}


def verify(fam, task, submission):
    if not isinstance(submission, dict):
        return {"passed": False, "score": 0.0, "detail": "submission is not an object"}
    conn = fresh_conn()
    tools = Tools(fam.make_tools(conn), task["tools"])
    for call in submission.get("calls") or []:
        if isinstance(call, dict) and isinstance(call.get("arguments", {}), dict):
            tools.call(str(call.get("name")), call.get("arguments") or {})
    conn.commit()
    ok, detail = fam.verify(conn, task["params"], task["hidden"], submission.get("answer"))
    conn.close()
    return {"passed": bool(ok), "score": 1.0 if ok else 0.0, "detail": str(detail)[:500]}


def build(fam, job):
    """Build an environment from a family module inside the sandbox (for model-written families, whose
    generation code is as untrusted as their tools): writes db.sqlite and tasks.json, returns the candidates."""
    rng = random.Random(job["seed"])
    conn = sqlite3.connect("db.sqlite")
    fam.build_db(conn, rng)
    tasks, cands = {}, []
    for level in range(1, job["max_difficulty"] + 1):
        for j in range(job["tasks_per_level"]):
            proposed = None
            for _ in range(5):
                proposed = fam.propose(conn, rng, level)
                if proposed is not None:
                    break
            if proposed is None:
                continue
            params, hidden, prompt = proposed
            key = f"d{level}-{j}"
            tools = [n for n in fam.SCHEMAS if fam.TOOL_LEVEL[n] <= level]
            tasks[key] = {"params": params, "hidden": hidden, "tools": tools}
            cands.append({"key": key, "level": level, "prompt": prompt, "tools": tools,
                          "leaks": [str(x) for x in fam.leaks(hidden)]})
    conn.commit()
    conn.close()
    json.dump(tasks, open("tasks.json", "w"), sort_keys=True)
    return {"candidates": cands, "schemas": fam.SCHEMAS, "tool_only_problems": tool_only_problems(fam)}


def main():
    job = json.load(sys.stdin)
    fam = load_family()
    if job["op"] == "build":
        print(json.dumps(build(fam, job)))
        return
    tasks = json.load(open("tasks.json"))
    out = []
    for item in job["items"]:
        try:
            if job["op"] == "solve":
                problems = tool_only_problems(fam)
                out.append({"error": "; ".join(problems)} if problems else solve(fam, tasks[item["key"]], item.get("seed")))
            elif job["op"] == "verify":
                out.append(verify(fam, tasks[item["key"]], item["submission"]))
            elif job["op"] == "plan":
                # The reference solution's calls (tool-only, so a rollout can replay them through the tools)
                problems = tool_only_problems(fam)
                out.append({"error": "; ".join(problems)} if problems else solve(fam, tasks[item["key"]], None))
            elif job["op"] == "call":
                task = tasks[item["key"]]
                tools = Tools(fam.make_tools(fresh_conn()), task["tools"])
                for call in item.get("history") or []:
                    tools.call(str(call.get("name")), call.get("arguments") or {})
                out.append({"result": tools.call(str(item["call"].get("name")), item["call"].get("arguments") or {})})
            elif job["op"] == "reset":
                before = db_hash("db.sqlite")
                solve(fam, tasks[item["key"]], None)
                changed = db_hash("work.sqlite") != before
                fresh_conn().close()
                out.append({"reset_ok": db_hash("work.sqlite") == before, "solution_changed_state": changed})
        except Exception:
            out.append({"error": traceback.format_exc()[-800:], "passed": False, "score": 0.0})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
