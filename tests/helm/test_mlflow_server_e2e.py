"""The chart's MLflow server for real: a PostgreSQL server, an S3 endpoint (moto), then `migrate`, `wait` and `serve`
exactly as the migration job, the init container and the server container run them; a client with only the MLflow
login logs a run and an artifact through the proxy. Needs PostgreSQL's server binaries (Debian: postgresql) and the
psycopg, boto3 and moto; skipped, saying which is missing, elsewhere."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PASSWORD = "p@ss:w/rd%41"          # characters that break an unquoted URI and configparser
ADMIN = "Gen3ratedAdminPassw0rd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return (["runuser", "-u", "postgres", "--"] + cmd) if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if not initdb:
        pytest.skip("PostgreSQL server binaries (initdb) not installed")
    bindir = Path(initdb).parent
    # Its own directory (pytest's tmp_path is private to root, and the server runs as postgres when we are root).
    root = Path(tempfile.mkdtemp(prefix="dsaforge-pg-"))
    (root / "pw").write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(root / "data"), "-U", "mlflow",
                                 "--auth=scram-sha-256", f"--pwfile={root / 'pw'}"]), check=True, capture_output=True)
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l", str(root / "log"),
                                 "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password=PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("create database mlflow")
        yield port
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3():
    pytest.importorskip("moto", reason="moto (an S3 endpoint) not installed")
    pytest.importorskip("boto3", reason="boto3  not installed")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _request(url, host="localhost", auth=None, body=None):
    req = urllib.request.Request(url, data=body, headers={"Host": host, "Content-Type": "application/json"})
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:       # not listening yet
        return None


def test_migrate_wait_serve_and_log_through_the_proxy(postgres, s3, tmp_path):
    pytest.importorskip("psycopg", reason="psycopg  not installed")
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path),
           "DSAFORGE_DB_HOST": "127.0.0.1", "DSAFORGE_DB_PORT": str(postgres), "DSAFORGE_DB_NAME": "mlflow",
           "DSAFORGE_DB_USER": "mlflow", "DSAFORGE_DB_PASSWORD": PASSWORD,
           "DSAFORGE_ARTIFACTS_BUCKET": "mlflow", "DSAFORGE_ARTIFACTS_PROXIED": "true",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": s3,
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "x" * 32, "DSAFORGE_MLFLOW_PORT": str(port),
           "DSAFORGE_MLFLOW_WORKERS": "1",
           "DSAFORGE_MLFLOW_ALLOWED_HOSTS": "localhost,localhost:*,dsaforge-mlflow,dsaforge-mlflow:*",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    module = [sys.executable, "-m", "dsaforge.deploy.mlflow_server"]
    waiter = subprocess.Popen(module + ["wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    migrate = subprocess.run(module + ["migrate"], env={**env, "DSAFORGE_CREATE_BUCKET": "true"},
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    assert "created bucket mlflow" in migrate.stdout
    assert waiter.wait(timeout=120) == 0                      # the init container lets the server start
    out = waiter.stdout.read()
    assert "waiting for the migration job" in out or "MLflow store is at" in out

    server = subprocess.Popen(module + ["serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while _request(f"{url}/health") != 200:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        search = f"{url}/api/2.0/mlflow/experiments/search"
        body = b'{"max_results": 1}'
        assert _request(search, body=body) == 401                                    # no login
        assert _request(search, auth="admin:password1234", body=body) == 401        # MLflow's old default
        assert _request(search, auth=f"admin:{ADMIN}", body=body) == 200
        assert _request(search, host="dsaforge-mlflow:5000", auth=f"admin:{ADMIN}", body=body) == 200
        assert _request(search, host="evil.example.com", auth=f"admin:{ADMIN}", body=body) == 403
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:                          # exec'd mlflow server
            assert PASSWORD.encode() not in f.read()

        # A stage pod: the MLflow login only, no S3 keys; the artifact reaches the bucket through the server.
        client_env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3", "DSAFORGE_DB"))}
        client_env.update(MLFLOW_TRACKING_URI=f"http://localhost:{port}", MLFLOW_TRACKING_USERNAME="admin",
                          MLFLOW_TRACKING_PASSWORD=ADMIN)
        (tmp_path / "a.txt").write_text("hello")
        code = ("import mlflow, sys\n"
                "mlflow.set_experiment('dsaforge')\n"
                "with mlflow.start_run() as r:\n"
                "    mlflow.log_metric('loss', 1.5, step=1)\n"
                f"    mlflow.log_artifact({str(tmp_path / 'a.txt')!r})\n"
                "print(r.info.run_id)\n")
        run = subprocess.run([sys.executable, "-c", code], env=client_env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        run_id = run.stdout.strip().splitlines()[-1]
        import boto3

        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3, region_name="us-east-1",
                                               aws_access_key_id="k", aws_secret_access_key="s")
                .list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run_id}/artifacts/a.txt") for k in keys), keys
    finally:
        server.terminate()
        server.wait(timeout=30)
