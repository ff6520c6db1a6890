"""The local queue outlives the console: queued runs start after a restart, a run whose worker died with the
console is marked interrupted (in the queue and in MLflow), and a worker that outlived the console is adopted.

Run: python -m pytest tests/console/test_queue.py -q
"""
import os
import signal
import time

from dsaforge import tracking_query
from dsaforge.config import load_config
from dsaforge.console import Settings
from tests.console.conftest import Served
from tests.helpers import free_port


def wait(predicate, timeout_s=180, what="condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_queue_survives_a_console_restart(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / ".dsaforge"
    settings = dict(home=home, max_parallel=1, poll_s=0.3)
    cfg = load_config("tiny")

    # Console 1 starts run A; run B waits in the queue (one local run at a time).
    with Served(Settings(port=free_port(), **settings), cancel_on_exit=False) as one:
        a = one.console.submit("end-to-end", cfg)
        b = one.console.submit("end-to-end", cfg)
        wait(lambda: one.console.store.get(a.id).status == "running", what="run A to start")
        wait(lambda: tracking_query.find_pipeline_runs(one.console.tracking_uri, "dsaforge", a.id)[0],
             what="A's MLflow run")
        assert one.console.store.get(b.id).status == "queued"
        pid_a = one.console.store.get(a.id).pid
    # ... and dies with A's worker (a crash of the machine or the container takes both).
    os.killpg(pid_a, signal.SIGKILL)

    # Console 2 finds A interrupted, never silently lost, and starts B from the queue.
    with Served(Settings(port=free_port(), **settings), cancel_on_exit=False) as two:
        run_a = two.console.store.get(a.id)
        assert run_a.status == "interrupted"
        assert run_a.note == "the console stopped while this run was running, and its worker is gone"
        parent, _ = tracking_query.find_pipeline_runs(two.console.tracking_uri, "dsaforge", a.id)
        assert parent.status == "KILLED"
        assert parent.tags["dsaforge.error"] == "the console stopped while this run was running"
        wait(lambda: two.console.store.get(b.id).status == "running", what="run B to start after the restart")
        pid_b = two.console.store.get(b.id).pid
    # Console 2 stops on its own: B's worker, in a session of its own, goes on.
    os.kill(pid_b, 0)

    # Console 3 adopts B's live worker and can still cancel it.
    with Served(Settings(port=free_port(), **settings)) as three:
        run_b = three.console.store.get(b.id)
        assert run_b.status == "running"
        assert run_b.note == (f"the console restarted while this run was running; its worker (pid {pid_b}) went on "
                              "and was adopted")
        three.console.cancel(run_b)
        assert three.console.store.get(b.id).status == "cancelled"
        wait(lambda: not os.path.exists(f"/proc/{pid_b}/cmdline") or not open(f"/proc/{pid_b}/cmdline").read(),
             timeout_s=30, what="B's worker to stop")


def test_a_worker_reaped_after_its_run_was_resumed_does_not_fail_the_resumed_run(tmp_path):
    """A worker records its failure and exits; if the run is resumed before the console reaps that exit, the exit
    belongs to the old attempt and must leave the queued (resumed) run alone. A worker that exits without recording
    an outcome still fails its own run."""
    import subprocess
    import sys

    from dsaforge.console.local import LocalBackend
    from dsaforge.console.store import Store

    store = Store(tmp_path / "console.db")
    backend = LocalBackend(store, tmp_path / "home", max_parallel=0)     # nothing is started from the queue here

    def exited_worker(run, records_failure: bool):
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        proc.wait()
        backend._children[run.id] = proc
        store.update(run.id, status="running", pid=proc.pid)
        if records_failure:
            store.update(run.id, only_if=("running",), status="failed", error="DataError: input not found")

    resumed = store.add("end-to-end", "local", "tiny", {})
    backend.submit(resumed)
    exited_worker(resumed, records_failure=True)
    backend.resume(store.get(resumed.id))
    backend.tick()
    run = store.get(resumed.id)
    assert (run.status, run.error) == ("queued", None), run

    crashed = store.add("end-to-end", "local", "tiny", {})
    backend.submit(crashed)
    exited_worker(crashed, records_failure=False)
    backend.tick()
    run = store.get(crashed.id)
    assert (run.status, run.error) == ("failed", "the worker exited with status 1 without recording an outcome")
