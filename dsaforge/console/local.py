"""The local backend: each run is a worker process (`dsaforge.console.worker`) with a pipeline root of its own.

The queue is the console's SQLite store; `tick()` (called every second by the console) starts queued runs while
fewer than `max_parallel` run, and notices workers that ended without recording an outcome. On start-up
`recover()` looks at runs the store still calls running: a worker that is still alive is adopted, one that is gone
marks its run `interrupted`, with a note; nothing is silently lost.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from dsaforge.config import ConfigError
from dsaforge.console.store import CANCELLED, FAILED, INTERRUPTED, QUEUED, RUNNING, Run, Store

_ANSI = re.compile(r"\x1b\[[0-9;]*m")       # KFP's local runner colours its log lines


def _alive(pid: int, run_id: str) -> bool:
    """Is `pid` still our worker for this run (and not a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        return "dsaforge.console.worker" in cmdline and run_id in cmdline
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return Path("/proc").exists() is False      # no /proc (macOS): trust the pid


class LocalBackend:
    kind = "local"

    def __init__(self, store: Store, home: Path, max_parallel: int = 1) -> None:
        self.store, self.home, self.max_parallel = store, Path(home), max_parallel
        self.runs_dir = self.home / "console" / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def run_dir(self, run_id: str) -> Path:
        # run ids are the store's own uuid hex strings, never text from a request
        return self.runs_dir / run_id

    def check(self, cfg) -> None:
        pass                                        # a local run needs nothing the validated config lacks

    def submit(self, run: Run, reuse: Optional[dict[str, str]] = None) -> None:
        d = self.run_dir(run.id)
        d.mkdir(parents=True)
        job = {"id": run.id, "pipeline": run.pipeline, "config": run.config, "db": str(self.store.path),
               "reuse": reuse or {}}
        (d / "job.json").write_text(json.dumps(job, indent=2))

    def tick(self) -> None:
        with self._lock:
            for run_id, proc in list(self._children.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self._children[run_id]
                # Only this worker's own attempt: once it recorded its failure the run may have been resumed
                # (queued again, pid cleared, or running under a new worker) before this exit is reaped.
                self.store.update(run_id, only_if=(RUNNING,), only_pid=proc.pid, status=FAILED, finished=time.time(),
                                  error=f"the worker exited with status {code} without recording an outcome")
            running = self.store.list(status=(RUNNING,))
            for run in running:
                if run.backend == self.kind and run.id not in self._children and run.pid and not _alive(run.pid, run.id):
                    self.store.update(run.id, only_if=(RUNNING,), status=FAILED, finished=time.time(),
                                      error="the worker ended without recording an outcome")
            free = self.max_parallel - sum(r.backend == self.kind for r in self.store.list(status=(RUNNING,)))
            queued = [r for r in reversed(self.store.list(status=(QUEUED,))) if r.backend == self.kind]
            for run in queued[:max(free, 0)]:
                self._start(run)

    def _start(self, run: Run) -> None:
        d = self.run_dir(run.id)
        log = open(d / "log.txt", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # argv, no shell: the only arguments are the interpreter and the folder the console made for this run.
        proc = subprocess.Popen([sys.executable, "-m", "dsaforge.console.worker", str(d)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d, env=env,
                                start_new_session=True)
        log.close()
        self._children[run.id] = proc
        # The worker sets started/pid itself; set them here too so that a crash before it does is still noticed.
        self.store.update(run.id, only_if=(QUEUED,), status=RUNNING, started=time.time(), pid=proc.pid)

    def cancel(self, run: Run, grace_s: float = 10.0) -> None:
        """Stop the worker's whole process group (SIGTERM: training stages checkpoint and stop; then SIGKILL)."""
        if not self.store.update(run.id, only_if=(QUEUED, RUNNING), status=CANCELLED, finished=time.time(),
                                 note="cancelled from the console"):
            return
        pid = run.pid
        with self._lock:
            proc = self._children.pop(run.id, None)
        if not pid or not _alive(pid, run.id):
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline:
            if (proc.poll() is not None) if proc else not _alive(pid, run.id):
                break
            time.sleep(0.2)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc:
            proc.wait(10)

    def resume(self, run: Run) -> None:
        """Queue a failed run again; its worker resumes it from the failed step (`run_local(resume=...)`)."""
        job_path = self.run_dir(run.id) / "job.json"
        job = json.loads(job_path.read_text())
        job["resume"] = True
        job_path.write_text(json.dumps(job, indent=2))
        if not self.store.update(run.id, only_if=(FAILED,), status=QUEUED, finished=None, error=None, pid=None,
                                 note=f"resumed from the failed step; it had failed with: {run.error}"[:2000]):
            raise ConfigError(f"run {run.id[:8]} is no longer {run.status}; reload the page")

    def recover(self) -> list[Run]:
        """After a console restart: adopt live workers, mark runs whose worker is gone as interrupted."""
        interrupted = []
        for run in self.store.list(status=(RUNNING,)):
            if run.backend != self.kind:
                continue
            if run.pid and _alive(run.pid, run.id):
                self.store.update(run.id, note="the console restarted while this run was running; its worker "
                                              f"(pid {run.pid}) went on and was adopted")
            else:
                self.store.update(run.id, only_if=(RUNNING,), status=INTERRUPTED, finished=time.time(),
                                  note="the console stopped while this run was running, and its worker is gone")
                interrupted.append(run)
        return interrupted

    def log_tail(self, run: Run, lines: int = 60) -> str:
        path = self.run_dir(run.id) / "log.txt"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = _ANSI.sub("", f.read().decode(errors="replace"))
        return "".join(deque(text.splitlines(keepends=True), maxlen=lines))

    def executor_outputs(self, run: Run) -> dict[str, dict]:
        """Each finished task's executor output (KFP writes it when a task succeeds), by task name."""
        out = {}
        # one pipeline root per attempt (a resumed run has several); the newest attempt's word on a task wins
        paths = self.run_dir(run.id).glob(f"kfp/*/{run.pipeline}-*/*/executor_output.json")
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):
            try:
                out[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return out
