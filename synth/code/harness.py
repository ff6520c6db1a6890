"""Code-agent machinery (standard library only; the test-running parts run inside the sandbox): procedural bug
injection by AST-located text edits, unified diffs and a strict patch applier, a differential test runner with
per-test time limits, and a baseline repair solver (coverage-localised search over inverse edits).

As a script it reads a job {"op": ..., ...} on stdin and prints one JSON object on stdout.
"""
import ast
import difflib
import json
import random
import shutil
import signal
import sys
import types

SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add,
         ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


# ---- bug injection ------------------------------------------------------------------------------------------
def sites(source):
    """Every single-line edit the injector (and the repair search) can make: (line, col, end_col, new_text, fn)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    out = []

    def seg(n):
        return lines[n.lineno - 1][n.col_offset:n.end_col_offset]

    def add(node, new, fn):
        if node.lineno == node.end_lineno and new != seg(node):
            try:
                ast.parse(new.strip(), mode="eval")
            except SyntaxError:
                return
            out.append((node.lineno, node.col_offset, node.end_col_offset, new, fn))

    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAPS:
                m = ast.Compare(node.left, [SWAPS[type(node.ops[0])]()], node.comparators)
                add(node, ast.unparse(m), fn.name)
            elif isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
                add(node, "(" + ast.unparse(ast.BinOp(node.left, SWAPS[type(node.op)](), node.right)) + ")", fn.name)
            elif isinstance(node, ast.BoolOp) and type(node.op) in SWAPS:
                add(node, "(" + ast.unparse(ast.BoolOp(SWAPS[type(node.op)](), node.values)) + ")", fn.name)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                add(node, "(" + ast.unparse(node.operand) + ")", fn.name)
            elif isinstance(node, (ast.If, ast.While)) and not isinstance(node.test, ast.UnaryOp):
                add(node.test, "not (" + ast.unparse(node.test) + ")", fn.name)
            elif isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= 16:
                add(node, str(node.value + 1), fn.name)
                if node.value > 0:
                    add(node, str(node.value - 1), fn.name)
            elif isinstance(node, ast.Constant) and type(node.value) is bool:
                add(node, str(not node.value), fn.name)
    return out


def apply_sites(source, chosen):
    """Apply non-overlapping single-line edits (right to left within a line, so columns stay valid)."""
    lines = source.splitlines(keepends=True)
    for ln, col, end, new, _ in sorted(chosen, key=lambda s: (s[0], s[1]), reverse=True):
        line = lines[ln - 1]
        lines[ln - 1] = line[:col] + new + line[end:]
    return "".join(lines)


def overlaps(a, b):
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def unified_diff(old, new, path):
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"a/{path}", f"b/{path}"))


def apply_patch(source, patch):
    """A strict unified-diff applier for one file: every context and removed line must match exactly."""
    if not patch.strip():
        return source
    src = source.splitlines(keepends=True)
    out, pos = [], 0
    lines = patch.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("@@"):
            i += 1
            continue
        old_start = int(line.split()[1].split(",")[0][1:])
        start = max(old_start - 1, 0)
        if start < pos:
            raise ValueError("overlapping hunks")
        out.extend(src[pos:start])
        pos = start
        i += 1
        while i < len(lines) and not lines[i].startswith("@@"):
            body = lines[i]
            if body.startswith("\\"):
                i += 1
                continue
            tag, text = body[:1], body[1:]
            if tag in (" ", "-"):
                if pos >= len(src) or src[pos].rstrip("\r\n") != text.rstrip("\r\n"):
                    raise ValueError(f"hunk does not apply at line {pos + 1}")
                if tag == " ":
                    out.append(src[pos])
                pos += 1
            elif tag == "+":
                out.append(text if text.endswith("\n") else text + "\n")
            elif body.startswith(("---", "+++")):
                break
            i += 1
    out.extend(src[pos:])
    return "".join(out)


# ---- differential tests -------------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def load_module(name, source):
    mod = types.ModuleType(name)
    mod.__file__ = f"/tmp/repo/{name}.py"
    sys.modules[name] = mod          # dataclasses and pickling look the module up by name
    try:
        exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    finally:
        sys.modules.pop(name, None)
    return mod


def adapter_fn(src):
    if src.startswith("def "):
        ns = {}
        exec(src, ns)
        return ns["run"]
    return eval(src)


def normalise(x):
    return json.loads(json.dumps(x, default=repr))


def call(mod, fn, args, seconds=0.1):
    # Test inputs are tiny (microseconds on the pristine code), so a tenth of a second means an injected hang.
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return normalise(fn(mod, *args))
    except _Timeout:
        return {"raises": "Timeout"}
    except BaseException as e:   # any failure of the code under test is a recorded outcome
        return {"raises": type(e).__name__}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def outcomes(module, source, tests):
    """{test name: [outcome per case]} (None for tests skipped after a hang); {} when the module fails to import.
    Reads only each case's args, never its expected outcome."""
    try:
        mod = load_module(module, source)
    except BaseException:
        return {}
    out, hangs = {}, 0
    for name, t in sorted(tests.items()):
        if hangs >= 1:          # a variant that hangs fails the rest without burning the CPU budget
            out[name] = None
            continue
        fn = adapter_fn(t["adapter"])
        out[name] = [call(mod, fn, c["args"]) for c in t["cases"]]
        hangs += sum(r == {"raises": "Timeout"} for r in out[name])
    return out


def compare(got, tests):
    return {name: got.get(name) is not None and len(got[name]) == len(t["cases"])
            and all(r == c["expect"] for r, c in zip(got[name], t["cases"])) for name, t in tests.items()}


def run_tests(module, source, tests):
    """{test name: passed}; a module that fails to import fails every test."""
    return compare(outcomes(module, source, tests), tests)


def run_tests_blind(module, source, tests):
    """run_tests for code an agent wrote: it runs in a fresh interpreter that is given each case's arguments but
    not its expected outcome (neither in memory nor on disk, where the verify job deleted hidden/ first), so the
    code cannot read the answers it is checked against; the outcomes are compared here."""
    import subprocess

    blind = {n: {"adapter": t["adapter"], "cases": [{"args": c["args"]} for c in t["cases"]]} for n, t in tests.items()}
    job = json.dumps({"op": "outcomes", "module": module, "source": source, "tests": blind})
    proc = subprocess.run([sys.executable, "-I", __file__], input=job, capture_output=True, text=True)
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        got = {}
    return compare(got if isinstance(got, dict) else {}, tests)


def record(module, source, tests):
    mod = load_module(module, source)
    for t in tests.values():
        fn = adapter_fn(t["adapter"])
        for c in t["cases"]:
            c["expect"] = call(mod, fn, c["args"])
    return tests


# ---- baseline repair solver ---------------------------------------------------------------------------------
def covered_lines(module, source, examples):
    lines = set()
    fname = f"/tmp/repo/{module}.py"

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != fname:
            return None
        if event == "line":
            lines.add(frame.f_lineno)
        return tracer

    try:
        mod = load_module(module, source)
    except BaseException:
        return lines
    for ex in examples:
        sys.settrace(tracer)
        try:
            call(mod, adapter_fn(ex["adapter"]), ex["args"])
        finally:
            sys.settrace(None)
    return lines


def example_passes(module, source, examples, seconds=0.1):
    try:
        mod = load_module(module, source)
    except BaseException:
        return [False] * len(examples)
    return [call(mod, adapter_fn(e["adapter"]), e["args"], seconds) == e["expect"] for e in examples]


def repair(module, source, examples, k, seed, budget_s=2.0):
    """Fault-localised search: edits on lines the issue's examples execute, kept when they fix an example
    without breaking another; k attempts combine one random fixer per failing example. The scan visits sites in
    a seeded random order and stops after budget_s seconds, as a bounded solver would."""
    import time

    t0 = time.monotonic()
    base = example_passes(module, source, examples)
    cov = covered_lines(module, source, examples)
    fixers = {i: [] for i, ok in enumerate(base) if not ok}
    candidates = [s for s in sites(source) if s[0] in cov]
    random.Random(seed).shuffle(candidates)
    for s in candidates:
        if time.monotonic() - t0 > budget_s:
            break
        # Examples take microseconds on sound code; an edit that makes one hang is rejected after 20 ms.
        res = example_passes(module, apply_sites(source, [s]), examples, 0.02)
        if any(b and not r for b, r in zip(base, res)):
            continue
        for i in fixers:
            if res[i]:
                fixers[i].append(s)
    rng = random.Random(seed)
    patches = []
    for _ in range(k):
        chosen = []
        for i in sorted(fixers):
            opts = [s for s in fixers[i] if not any(overlaps(s, c) for c in chosen)]
            if opts:
                chosen.append(rng.choice(opts))
        patches.append(unified_diff(source, apply_sites(source, chosen), f"{module}.py"))
    return patches


# ---- the agent's tools (a rollout's read_file / apply_patch / run_visible_tests) --------------------------------
def agent_tool(job):
    """One tool call against the episode's current file (job["source"]), which the host keeps between calls.
    Returns {"output": <what the model sees>, "source": <the file after the call>}."""
    import os

    module, source, args = job["module"], job["source"], job.get("arguments") or {}
    name = f"{module}.py"
    if job["tool"] == "read_file":
        path = str(args.get("path", name))
        if os.path.normpath(path) not in (name, f"repo/{name}", f"/tmp/repo/{name}"):
            return {"output": {"error": f"no such file {path!r}; the repository holds {name}"}, "source": source}
        lines = source.splitlines()
        start = max(1, int(args.get("start_line", 1)))
        end = min(len(lines), int(args.get("end_line", len(lines))))
        text = "\n".join(f"{i:5d}  {lines[i - 1]}" for i in range(start, end + 1))
        return {"output": {"path": name, "lines": f"{start}-{end} of {len(lines)}", "text": text}, "source": source}
    if job["tool"] == "apply_patch":
        try:
            new = apply_patch(source, str(args.get("patch", "")))
        except (ValueError, IndexError) as e:
            return {"output": {"error": f"patch does not apply: {e}"}, "source": source}
        try:
            compile(new, name, "exec")
        except SyntaxError as e:
            return {"output": {"applied": True, "warning": f"the file no longer compiles: {e}"}, "source": new}
        return {"output": {"applied": True}, "source": new}
    if job["tool"] == "run_visible_tests":
        results = []
        try:
            mod = load_module(module, source)
        except BaseException as e:
            return {"output": {"error": f"importing {name} failed: {type(e).__name__}: {e}"}, "source": source}
        for ex in job["examples"]:
            got = call(mod, adapter_fn(ex["adapter"]), ex["args"])
            results.append({"call": f"{ex['label']}{tuple(ex['args'])!r}", "expected": ex["expect"], "got": got,
                            "passed": got == ex["expect"]})
        return {"output": {"passed": sum(r["passed"] for r in results), "total": len(results), "results": results},
                "source": source}
    return {"output": {"error": f"unknown tool {job['tool']!r}"}, "source": source}


def main():
    job = json.load(sys.stdin)
    op = job["op"]
    if op == "record":
        print(json.dumps(record(job["module"], job["source"], job["tests"])))
    elif op == "evaluate":
        print(json.dumps([run_tests(job["module"], s, job["tests"]) for s in job["sources"]]))
    elif op == "verify":
        tasks = json.load(open("hidden/tasks.json"))
        tests = json.load(open("hidden/tests.json"))
        shutil.rmtree("hidden")     # the gold patch and expected outcomes never share a disk with agent code
        out = []
        for item in job["items"]:
            t = tasks[item["key"]]
            buggy = open(f"{item['key']}/repo/{t['module']}.py").read()
            sub = item["submission"]
            try:
                patched = apply_patch(buggy, sub.get("patch") or "" if isinstance(sub, dict) else "")
            except (ValueError, IndexError) as e:
                out.append({"passed": False, "score": 0.0, "detail": f"patch does not apply: {e}"})
                continue
            res = run_tests_blind(t["module"], patched, {n: tests[n] for n in t["FAIL_TO_PASS"] + t["PASS_TO_PASS"]})
            f2p = sum(res[n] for n in t["FAIL_TO_PASS"])
            p2p = sum(res[n] for n in t["PASS_TO_PASS"])
            ok = f2p == len(t["FAIL_TO_PASS"]) and p2p == len(t["PASS_TO_PASS"])
            out.append({"passed": ok, "score": 1.0 if ok else 0.0,
                        "detail": f"FAIL_TO_PASS {f2p}/{len(t['FAIL_TO_PASS'])}, PASS_TO_PASS {p2p}/{len(t['PASS_TO_PASS'])}"})
        print(json.dumps(out))
    elif op == "outcomes":
        print(json.dumps(outcomes(job["module"], job["source"], job["tests"])))
    elif op == "tool":
        print(json.dumps(agent_tool(job)))
    elif op == "repair":
        out = []
        for item in job["items"]:
            src = open(f"{item['key']}/repo/{item['module']}.py").read()
            out.append(repair(item["module"], src, item["examples"], job["k"], item["seed"]))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
