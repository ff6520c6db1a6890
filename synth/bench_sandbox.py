"""What a rollout pays the sandbox per tool call and per verdict, each against its baseline in the same run.

    python -m dsaforge.synth.bench_sandbox --out docs/benchmarks/sandbox_cpu      # OUT.json + OUT.md

1. Start-up: an empty script through the sandbox, with the full interpreter (`python -I`: site-packages and their
   .pth hooks) and with `Sandbox.stdlib_python` (`-I -S`, what the general and search harnesses run on).
2. Tool calls and verdicts: G episodes of each of P lookup prompts (the tiny-RL tasks) call their tool and are
   scored, one episode per sandboxed run (`Episode.step`, `Episode.submit`) and one run per environment
   (`step_many`, `submit_many`: what the rollout runner does), with equal outputs and verdicts checked.

CPU is the machine's busy time over the measurement (/proc/stat; the sandboxed processes are not children that
report their time to this process), so run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path


def _busy_s() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _measure(fn) -> dict:
    c0, t0 = _busy_s(), time.perf_counter()
    fn()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _busy_s() - c0}


def startup(box, runs: int) -> dict:
    out = {}
    for name, argv in (("python -I", [box.python, "-I", "/tmp/a.py"]), ("stdlib_python", box.stdlib_python("/tmp/a.py"))):
        m = _measure(lambda: [box.run(argv, files={"a.py": "pass"}) for _ in range(runs)])
        out[name] = {"runs": runs, "wall_ms_per_run": 1e3 * m["wall_s"] / runs, "cpu_ms_per_run": 1e3 * m["cpu_s"] / runs}
    return out


def batched(box, root: Path, prompts: int, group: int) -> dict:
    """G episodes of each of P lookup prompts: their tool calls (one get_code each) and then their verdicts, one
    episode at a time against `step_many` / `submit_many`."""
    from dsaforge.synth.episode import make_episode, step_many, submit_many
    from dsaforge.synth.task import load_tasks

    tasks = load_tasks(root)[:prompts]
    calls = [[{"name": "get_code", "arguments": {"name": re.search(r'"([^"]+)"', t.prompt).group(1)}}]
             for t in tasks for _ in range(group)]
    runs, run = [0], box.run

    def counted(*a, **k):
        runs[0] += 1
        return run(*a, **k)

    box.run = counted
    got, out = {}, {"episodes": len(calls), "environments": len({t.env_id for t in tasks})}
    sides = {}
    for side in ("alone", "batched"):
        eps = [make_episode(t, box) for t in tasks for _ in range(group)]
        for ep in eps:
            ep.reset()
        runs[0] = 0
        if side == "alone":
            m = _measure(lambda: got.__setitem__("obs_" + side, [[ep.step(c) for c in cs] for ep, cs in zip(eps, calls)]))
        else:
            m = _measure(lambda: got.__setitem__("obs_" + side, step_many(eps, calls)))
        sides[side] = {"tool_calls": {"runs": runs[0], **m}}
        subs = [{"answer": json.loads(o[0]).get("code")} for o in got["obs_" + side]]
        runs[0] = 0
        if side == "alone":
            m = _measure(lambda: got.__setitem__("v_" + side, [ep.submit(s) for ep, s in zip(eps, subs)]))
        else:
            m = _measure(lambda: got.__setitem__("v_" + side, submit_many(eps, subs)))
        sides[side]["verdicts"] = {"runs": runs[0], **m}
    box.run = run
    out["equal_outputs"] = got["obs_alone"] == got["obs_batched"]
    out["equal_verdicts"] = ([(v.passed, v.detail) for v in got["v_alone"]]
                             == [(v.passed, v.detail) for v in got["v_batched"]])
    out["passed"] = sum(v.passed for v in got["v_batched"])
    for what in ("tool_calls", "verdicts"):
        a, b = sides["alone"][what], sides["batched"][what]
        out[what] = {"alone": a, "batched": b, "wall_ratio": a["wall_s"] / b["wall_s"],
                     "cpu_ratio": a["cpu_s"] / max(b["cpu_s"], 1e-9)}
    return out


def table(r: dict) -> str:
    s, v = r["startup"], r["batched"]
    lines = [f"Sandbox ({r['backend']}) costs on {r['machine']}, {r['date']}", "",
             "| start-up of an empty script | wall ms / run | CPU ms / run |", "|---|---|---|"]
    lines += [f"| {k} | {x['wall_ms_per_run']:.1f} | {x['cpu_ms_per_run']:.1f} |" for k, x in s.items()]
    lines += ["", f"{v['episodes']} lookup episodes ({v['environments']} environments, {v['passed']} passed); equal "
              f"tool outputs: {v['equal_outputs']}, equal verdicts: {v['equal_verdicts']}", "",
              "| work | one episode per run: runs, wall s, CPU s | one run per environment: runs, wall s, CPU s | "
              "CPU ratio |", "|---|---|---|---|"]
    for what, name in (("tool_calls", "tool calls (`step_many`)"), ("verdicts", "verdicts (`submit_many`)")):
        a, b = v[what]["alone"], v[what]["batched"]
        lines.append(f"| {name} | {a['runs']}, {a['wall_s']:.2f}, {a['cpu_s']:.2f} | {b['runs']}, {b['wall_s']:.2f}, "
                     f"{b['cpu_s']:.2f} | {v[what]['cpu_ratio']:.1f}x |")
    lines += ["", f"stdlib_python start-up: {s['python -I']['cpu_ms_per_run'] / s['stdlib_python']['cpu_ms_per_run']:.1f}x"
              " less CPU than python -I"]
    return "\n".join(lines)


def main() -> None:
    from dsaforge.config import SandboxConfig
    from dsaforge.synth.sandbox import Sandbox
    from dsaforge.synth.tiny_rl import write_tiny_rl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--backend", default="bwrap", choices=["bwrap", "unsafe-subprocess"])
    ap.add_argument("--runs", type=int, default=50, help="start-up runs per interpreter")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_rl(root, envs=max(1, -(-args.prompts // 10)), heldout_envs=0)
        box = Sandbox(SandboxConfig(backend=args.backend), hide=[str(root.resolve())])
        result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "backend": args.backend, "startup": startup(box, args.runs),
                  "batched": batched(box, root, args.prompts, args.group)}
    text = table(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
