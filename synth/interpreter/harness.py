"""Runs inside the sandbox: executes code cells in a real Jupyter kernel (jupyter-client + ipykernel) and
reads each cell's `answer` variable; also checks submitted answers numerically.

Job on stdin: {"op": "execute", "cells": [{"cwd": dir, "code": code}, ...]} -> [{"answer": ..., "error": ...}, ...]
              {"op": "verify", "items": [{"expect": x, "answer": y}, ...]} -> [{"passed", "score", "detail"}]
"""
import json
import math
import os
import sys


def close(answer, expect, rel=1e-6):
    try:
        a = float(answer)
    except (TypeError, ValueError):
        return False
    return math.isfinite(a) and abs(a - float(expect)) <= rel * max(1.0, abs(float(expect)))


def execute(cells, timeout):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    out = []
    try:
        for cell in cells:
            # A fresh namespace and working directory per task, in one kernel process: a kernel start costs
            # about a second, a reset a millisecond.
            code = cell["code"]
            os.makedirs(cell["cwd"], exist_ok=True)
            kc.execute_interactive(f"%reset -f\nimport os as _os\n_os.chdir({os.path.abspath(cell['cwd'])!r})\ndel _os",
                                   timeout=timeout)
            errors = []

            def hook(msg):
                if msg["msg_type"] == "error":
                    errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

            try:
                reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
            except TimeoutError:
                km.interrupt_kernel()
                out.append({"answer": None, "error": "timeout"})
                continue
            if reply["content"]["status"] != "ok":
                out.append({"answer": None, "error": "; ".join(errors) or reply["content"]["status"]})
                continue
            got = {}

            def grab(msg):
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    got.setdefault("text", "")
                    got["text"] += msg["content"]["text"]

            kc.execute_interactive("import json as _j\nprint(_j.dumps(float(answer)) if 'answer' in dir() else 'null')",
                                   timeout=timeout, output_hook=grab)
            try:
                out.append({"answer": json.loads(got.get("text", "null").strip().splitlines()[-1]), "error": None})
            except (ValueError, IndexError):
                out.append({"answer": None, "error": "answer is not a number"})
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def serve(cwd, timeout):
    """One live kernel for one episode: each stdin line {"code": ...} runs as the next cell of the same namespace
    (state persists, as the python tool promises) and gets one stdout line {"stdout", "result", "error"}."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        kc.execute_interactive(f"import os as _os\n_os.chdir({os.path.abspath(cwd)!r})\ndel _os", timeout=timeout)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            code = json.loads(line).get("code", "")
            got = {"stdout": "", "result": None, "error": None}

            def hook(msg):
                t, c = msg["msg_type"], msg["content"]
                if t == "stream":
                    got["stdout"] += c["text"]
                elif t == "execute_result":
                    got["result"] = c["data"].get("text/plain")
                elif t == "error":
                    got["error"] = f"{c['ename']}: {c['evalue']}"

            try:
                kc.execute_interactive(code, timeout=timeout, output_hook=hook)
            except TimeoutError:
                km.interrupt_kernel()
                got["error"] = f"timeout after {timeout}s (interrupted; the kernel keeps its state)"
            got["stdout"] = got["stdout"][-8000:]
            print(json.dumps(got), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], float(sys.argv[3]))
        return
    job = json.load(sys.stdin)
    if job["op"] == "execute":
        print(json.dumps(execute(job["cells"], job.get("timeout", 10))))
    elif job["op"] == "verify":
        res = []
        for it in job["items"]:
            ok = close(it.get("answer"), it["expect"])
            res.append({"passed": ok, "score": 1.0 if ok else 0.0,
                        "detail": "matches" if ok else f"{it.get('answer')!r} is not within 1e-6 of the expected value"})
        print(json.dumps(res))


if __name__ == "__main__":
    main()
