"""Fault injection: kills at random points of every stage, a tracking server that dies or answers 500s, and
concurrent runs in one home. Each case checks that no work is lost, nothing half-written looks complete, the
next attempt succeeds, and the store stays usable.

Run: python -m pytest tests/test_faults.py -q                 (CI: one kill per stage, a few minutes on 2 cores)
     DSAFORGE_FAULTS_LONG=1 python -m pytest tests/test_faults.py -q -m slow    (outside CI: more kill points,
                                                  more concurrent runs, the default retry budget; ~20 minutes)
"""
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dsaforge.config import load_config

TINY_TRAIN = ["train.pretrain.steps=16", "train.pretrain.batch_size=2", "train.pretrain.micro_batch_size=2",
              "train.pretrain.seq_len=64", "train.pretrain.ckpt_every=3", "train.pretrain.eval_every=4",
              "train.pretrain.eval_batches=1", "train.deterministic=true"]
TINY_SYNTH = ["synth.agent_classes=[general]", "synth.tasks_per_class=2", "synth.envs_per_class=1",
              "synth.workers=1", "synth.pass_k=2"]
SMALL_DATA = ["data.max_documents=120"]

# The long version runs only when asked for: `make test` runs every non-GPU test, slow ones included.
long = pytest.mark.skipif(not os.environ.get("DSAFORGE_FAULTS_LONG"),
                          reason="the long fault-injection run (DSAFORGE_FAULTS_LONG=1)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _cli(*args, home, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "dsaforge", *args, "--set", f"pipeline.home={home}",
                           "--set", "tracking.system_metrics=false"], capture_output=True, text=True,
                          timeout=timeout, env=_env(), **kw)


def _popen(*args, home):
    return subprocess.Popen([sys.executable, "-m", "dsaforge", *args, "--set", f"pipeline.home={home}",
                             "--set", "tracking.system_metrics=false"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)


def _client(home):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(home).resolve() / 'mlflow.db'}")


def _kill_at_random(proc, low, high, rng, ready=lambda: True):
    """SIGKILL the process group at a random moment in [low, high] s after `ready()` first holds."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > 300:
            raise AssertionError("the stage never reached the point where it is killed")
        time.sleep(0.05)
    time.sleep(rng.uniform(low, high))
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults-data")
    proc = _cli("stage", "prepare-data", "--no-track", "--out", str(home / "data"), *sum((["--set", s] for s in SMALL_DATA), []),
                home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return home / "data"


# -- kills at random points --------------------------------------------------------------------------------------

def _check_prepare_output(out: Path):
    """After a kill: nothing, or the complete dataset (verified against its manifest); never a partial one."""
    from dsaforge.data.prepare import verify_dataset

    if out.exists() and any(out.iterdir()):
        verify_dataset(out)


def _check_synth_output(out: Path):
    from dsaforge.synth.task import load_tasks

    if out.exists() and any(out.iterdir()):
        tasks = load_tasks(out)
        assert tasks and all(t.env_dir.is_dir() for t in tasks)


def _kill_then_rerun(stage, extra, home, rng, window, check, inputs=()):
    out = home / stage
    sets = sum((["--set", s] for s in extra), [])
    ins = sum((["--input", i] for i in inputs), [])
    proc = _popen("stage", stage, "--out", str(out), *ins, *sets, home=home)
    killed = _kill_at_random(proc, *window, rng)
    if not killed:                       # it finished before the kill (a fast machine): a clean run
        assert proc.returncode == 0, proc.stdout.read()[-3000:]
    check(out)
    if out.exists() and any(out.iterdir()):
        return out                       # finished, or killed after the atomic publish: already complete
    again = _cli("stage", stage, "--out", str(out), *ins, *sets, home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    check(out)
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a killed run's temporary folder was left behind"
    return out


@pytest.mark.parametrize("seed", range(1))
def test_prepare_data_killed_anywhere_is_all_or_nothing(tmp_path, seed):
    _kill_then_rerun("prepare-data", SMALL_DATA, tmp_path, random.Random(seed), (0.5, 6.0), _check_prepare_output)


@pytest.mark.parametrize("seed", range(1))
def test_synthesize_killed_anywhere_is_all_or_nothing(tmp_path, data, seed):
    _kill_then_rerun("synthesize", TINY_SYNTH, tmp_path, random.Random(seed), (1.0, 8.0), _check_synth_output,
                     inputs=[f"prepare-data={data}"])


def _training_kill_and_resume(tmp_path, data, seed):
    """Kill pretrain at a random step (before or after a checkpoint), resume: one MLflow run, FINISHED, with each
    step's metrics in metrics.jsonl exactly once."""
    rng = random.Random(seed)
    home, out = tmp_path, tmp_path / "pretrain"
    sets = sum((["--set", s] for s in TINY_TRAIN), [])
    args = ("stage", "pretrain", "--out", str(out), "--input", f"prepare-data={data}", *sets)
    proc = _popen(*args, home=home)
    # A random step rather than a random time: on a fast machine 16 tiny steps finish within any fixed window, and a
    # kill after the output is complete is no kill mid-run (the rerun then rightly refuses the finished --out).
    at_step = rng.randint(1, 12)
    log = out / "metrics.jsonl"
    killed = _kill_at_random(proc, 0.0, 0.02, rng,
                             ready=lambda: log.exists() and len(log.read_text().splitlines()) >= at_step)
    if killed:
        again = _cli(*args, home=home)
        assert again.returncode == 0, again.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stdout.read()[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16, steps
    client = _client(home)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert killed is False or run.data.tags.get("dsaforge.resumed") == "true"
    history = client.get_metric_history(run.info.run_id, "train/lr")
    assert {m.step for m in history} == set(range(1, 17))


@pytest.mark.parametrize("seed", range(1))
def test_training_killed_anywhere_resumes_into_its_own_run(tmp_path, data, seed):
    _training_kill_and_resume(tmp_path, data, seed)


@pytest.mark.slow
@long
@pytest.mark.parametrize("seed", range(1, 6))
def test_training_killed_anywhere_resumes_into_its_own_run_long(tmp_path, data, seed):
    _training_kill_and_resume(tmp_path, data, seed)


@pytest.mark.slow
@long
@pytest.mark.parametrize("seed", range(1, 6))
def test_prepare_and_synthesize_killed_anywhere_long(tmp_path, data, seed):
    rng = random.Random(seed)
    _kill_then_rerun("prepare-data", SMALL_DATA, tmp_path / "p", rng, (0.2, 10.0), _check_prepare_output)
    _kill_then_rerun("synthesize", TINY_SYNTH, tmp_path / "s", rng, (0.5, 20.0), _check_synth_output,
                     inputs=[f"prepare-data={data}"])


# -- tracking server outages ---------------------------------------------------------------------------------------

class FlakyServer:
    """An HTTP server that answers /health with 200 and every API call with 500 (a server whose database died),
    or, once `kill()`ed, refuses connections."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self):
                code = 200 if self.path.rstrip("/").endswith("/health") else 500
                body = b"OK" if code == 200 else b'{"error_code": "INTERNAL_ERROR", "message": "db down"}'
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _reply

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def kill(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_server_failing_every_call_fails_fast_with_one_line(tmp_path):
    srv = FlakyServer()
    try:
        t0 = time.time()
        proc = _cli("stage", "prepare-data", "--out", str(tmp_path / "o"), "--set", f"tracking.uri={srv.uri}",
                    "--set", "tracking.retries=1", "--set", "tracking.backoff_s=0", *sum((["--set", s] for s in SMALL_DATA), []),
                    home=tmp_path)
        took = time.time() - t0
    finally:
        srv.kill()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and srv.uri in lines[0], proc.stderr
    assert took < 60
    assert not (tmp_path / "o").exists()        # nothing was started


def test_the_default_retry_budget_is_about_a_minute():
    """The defaults bound one dead-server call: 1 + retries attempts of connect_timeout_s plus the backoff waits."""
    t = load_config("tiny").tracking
    waits = sum(t.backoff_s * 2 ** i for i in range(1, t.retries))      # urllib3: no wait before the first retry
    assert (1 + t.retries) * t.connect_timeout_s + waits <= 75


@pytest.mark.slow
@long
def test_a_server_failing_every_call_with_default_settings(tmp_path):
    srv = FlakyServer()
    try:
        t0 = time.time()
        proc = _cli("stage", "prepare-data", "--out", str(tmp_path / "o"), "--set", f"tracking.uri={srv.uri}",
                    home=tmp_path)
        took = time.time() - t0
    finally:
        srv.kill()
    assert proc.returncode == 2 and srv.uri in proc.stderr and took < 90, (took, proc.stderr[-2000:])


def _dead_server_uri():
    srv = FlakyServer()
    srv.kill()
    return srv.uri


def test_a_server_lost_mid_stage_loses_no_work_and_replays(tmp_path, capsys):
    """The tracking server goes away after prepare-data opened its run: the dataset is complete, the stage
    succeeds, the calls it could not log are kept on disk and replayed later into the same run. (Starting a real
    MLflow server costs CI too much; a run opened in the real store and then addressed at a dead server is what
    a lost server looks like to the client.)"""
    from dsaforge.stages import run_stage
    from dsaforge.tracking import MlflowTracker, replay, start_stage_run

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = load_config("tiny", overrides=SMALL_DATA + [f"pipeline.home={tmp_path}", f"tracking.uri={uri}",
                                                      "tracking.system_metrics=false", "tracking.retries=1",
                                                      "tracking.backoff_s=0", "tracking.connect_timeout_s=2"])
    run_id = start_stage_run(cfg, "prepare-data").run_id
    dead = _dead_server_uri()
    tracker = MlflowTracker(dead, run_id, spool_dir=tmp_path / "spool")
    summary = run_stage("prepare-data", cfg, tmp_path / "out", {}, tracker)
    tracker.finish("FINISHED")
    err = capsys.readouterr().err
    assert summary["documents"] == 120 and (tmp_path / "out" / "manifest.json").is_file()
    assert dead in err and "not logged" in err and tracker.spool.exists()
    assert len([ln for ln in err.splitlines() if ln.startswith("dsaforge:")]) == 2   # offline; what was not logged
    assert replay(tracker.spool, uri) == tracker.spooled > 0
    run = _client_for(uri).get_run(run_id)
    assert run.data.metrics["documents"] == 120 and run.data.tags["dsaforge.stage"] == "prepare-data"
    assert not tracker.spool.exists()


def _client_for(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.slow
@long
def test_a_server_killed_mid_stage_does_not_block_or_fail_it(tmp_path, data):
    """A tracking server that dies after the run was opened: the stage finishes its work with a bounded delay,
    exits 0 and says what was not logged."""
    from dsaforge.tracking import MlflowTracker, start_stage_run

    cfg = load_config("tiny", overrides=TINY_TRAIN + [f"pipeline.home={tmp_path}", "tracking.system_metrics=false",
                                                      "tracking.retries=1", "tracking.backoff_s=0",
                                                      "tracking.connect_timeout_s=2"])
    live = start_stage_run(cfg, "pretrain")
    tracker = MlflowTracker(_dead_server_uri(), live.run_id, spool_dir=tmp_path / "spool")
    from dsaforge.stages import run_stage

    t0 = time.time()
    summary = run_stage("pretrain", cfg, tmp_path / "pre", {"prepare-data": data}, tracker)
    tracker.finish("FINISHED")
    assert summary["steps"] == 16 and (tmp_path / "pre" / "hf" / "config.json").is_file()
    assert time.time() - t0 < 120
    lines = (tracker.spool).read_text().splitlines()
    assert sum(json.loads(x)["op"] == "metrics" for x in lines) >= 16      # every step kept for replay


# -- concurrent runs in one home -------------------------------------------------------------------------------------

BARRIER = textwrap.dedent("""
    import os, time
    def wait_all(folder, me):
        # Start together once every process has paid its imports (a fixed delay would wait for the slowest guess).
        open(os.path.join(folder, me), "w").close()
        n = int(os.path.basename(folder).split("-")[-1])
        while len(os.listdir(folder)) < n:
            time.sleep(0.01)
""")

OPEN_RUNS = BARRIER + textwrap.dedent("""
    import sys, time
    from dsaforge.config import load_config
    from dsaforge.tracking import start_pipeline_run, start_stage_run
    home, barrier = sys.argv[1], sys.argv[2]
    cfg = load_config("tiny", overrides=[f"pipeline.home={home}", "tracking.system_metrics=false"])
    wait_all(barrier, sys.argv[3])                     # every process opens the fresh store at the same moment
    parent = start_pipeline_run(cfg, "probe", f"run-{sys.argv[3]}", "")
    child = start_stage_run(cfg, "prepare-data", parent_run_id=parent.run_id)
    child.log_metrics({"x": 1.0}, step=0)
    child.finish(); parent.finish()
""")


def _open_concurrently(home, n):
    barrier = home / f"barrier-{n}"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_RUNS, str(home), str(barrier), str(i)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), [o[-1500:] for rc, o in outs if rc]
    client = _client(home)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 * n and all(r.info.status == "FINISHED" for r in runs)


def test_concurrent_first_use_of_a_store_is_safe(tmp_path):
    _open_concurrently(tmp_path, 3)


PROBE_PIPELINE = textwrap.dedent('''
    from kfp import dsl

    NAME = "probe"


    @dsl.component
    def write_id(parent_run_id: str, out: dsl.Output[dsl.Dataset]):
        import os, time
        os.makedirs(out.path, exist_ok=True)
        open(os.path.join(out.path, "owner"), "w").write(parent_run_id)
        # A long run keeps writing into its folder while the others finish (PROBE_BUSY_S): its folder is the
        # newest one whenever another run looks for its own.
        run_folder, end = os.path.dirname(os.path.dirname(out.path)), time.time() + float(os.environ["PROBE_BUSY_S"])
        while time.time() < end:
            os.utime(run_folder)
            time.sleep(0.2)


    @dsl.component
    def close(config_json: str, tracking_uri: str, parent_run_id: str):
        from dsaforge.tracking import MlflowTracker
        MlflowTracker(tracking_uri, parent_run_id).finish("FINISHED")


    def build(cfg, reuse=None):
        @dsl.pipeline(name=NAME)
        def probe(config_json: str, tracking_uri: str = "", parent_run_id: str = ""):
            w = write_id(parent_run_id=parent_run_id)
            close(config_json=config_json, tracking_uri=tracking_uri, parent_run_id=parent_run_id).after(w)
        return probe
''')

RUN_PROBE = BARRIER + textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[3])
    from dsaforge import pipelines
    pipelines.PIPELINES["probe"] = "probe_pipeline"
    from dsaforge.config import load_config
    from dsaforge.runner import run_local
    cfg = load_config("tiny", overrides=[f"pipeline.home={sys.argv[1]}", "tracking.system_metrics=false"])
    wait_all(sys.argv[2], sys.argv[4])
    r = run_local("probe", cfg)
    print(json.dumps({"mlflow_run_id": r.mlflow_run_id, "run_dir": str(r.run_dir), "outputs": r.outputs}))
""")


def _concurrent_pipelines(tmp_path, n):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "probe_pipeline.py").write_text(PROBE_PIPELINE)
    home = tmp_path / "home"
    barrier = tmp_path / f"barrier-{n}"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RUN_PROBE, str(home), str(barrier), str(tmp_path / "mod"),
                               str(i)],
                              env=_env(PYTHONPATH=str(tmp_path / "mod"), PROBE_BUSY_S="30" if i == n - 1 else "0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["run_dir"] for r in results}) == n          # each run reports its own KFP folder
    for r in results:
        (path,) = [Path(p) for p in r["outputs"].values() if "write-id" in p]
        assert (path / "owner").read_text() == r["mlflow_run_id"]    # ... and the outputs in it are its own
    client = _client(home)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_id for r in runs) == sorted(r["mlflow_run_id"] for r in results)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_concurrent_pipeline_runs_each_report_their_own_outputs(tmp_path):
    _concurrent_pipelines(tmp_path, 2)


@pytest.mark.slow
@long
def test_many_concurrent_pipeline_runs(tmp_path):
    _concurrent_pipelines(tmp_path, 6)


@pytest.mark.slow
@long
def test_concurrent_end_to_end_runs_in_a_fresh_home(tmp_path):
    """The real pipeline, twice at once in a fresh directory: both succeed, the store stays usable."""
    sets = TINY_TRAIN + TINY_SYNTH + SMALL_DATA + [s.replace("pretrain", st) for st in ("warmup", "sparse")
                                                   for s in TINY_TRAIN if s.startswith("train.pretrain")]
    args = ["run", "end-to-end", "--preset", "tiny", *sum((["--set", s] for s in sets), [])]
    procs = [_popen(*args, home=tmp_path) for _ in range(2)]
    outs = [(p.wait(timeout=1800), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in outs), [o[-3000:] for rc, o in outs if rc]
    dirs = [o.split("outputs:")[1].split()[0] for _, o in outs]
    assert len(set(dirs)) == 2
    after = _cli("stage", "prepare-data", "--out", str(tmp_path / "again"), *sum((["--set", s] for s in SMALL_DATA), []),
                 home=tmp_path)
    assert after.returncode == 0, after.stderr[-2000:]


KILL_IN_MIGRATION = textwrap.dedent("""
    import os, signal, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "after_cursor_execute")
    def stop_dead(conn, cursor, statement, *args):      # halfway through MLflow's schema migrations
        if statement.lstrip().upper().startswith("CREATE TABLE SECRETS"):
            os.kill(os.getpid(), signal.SIGKILL)

    from dsaforge.tracking import _client
    _client(sys.argv[1])
""")


def test_a_process_killed_while_creating_the_store_does_not_break_it(tmp_path):
    """MLflow creates a SQLite store's schema in many statements; a process killed among them used to leave a store
    no later run could open ("table secrets already exists"). The store is now built under another name and
    renamed into place."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_MIGRATION, uri], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    from dsaforge.tracking import _client as open_store
    client = open_store(uri)
    assert client.create_experiment("after-the-kill")
    assert not (tmp_path / "mlflow.db.creating").exists()
