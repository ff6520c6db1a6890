"""The MLflow tracking server as the Helm chart runs it: `python -m dsaforge.deploy.mlflow_server migrate|wait|serve`.

Everything comes from the environment the chart sets (passwords from Secrets), so no password is ever written into
a ConfigMap, a command line or the image:

  DSAFORGE_DB_HOST, DSAFORGE_DB_PORT, DSAFORGE_DB_NAME, DSAFORGE_DB_USER, DSAFORGE_DB_PASSWORD, DSAFORGE_DB_SSLMODE
  DSAFORGE_ARTIFACTS_BUCKET, DSAFORGE_ARTIFACTS_PROXIED ("true"/"false"), DSAFORGE_CREATE_BUCKET ("true"/"false")
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL      (the artifact store, boto3's names)
  MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, DSAFORGE_AUTH_DEFAULT_PERMISSION
  DSAFORGE_MLFLOW_PORT, DSAFORGE_MLFLOW_WORKERS, DSAFORGE_MLFLOW_ALLOWED_HOSTS (comma-separated fnmatch patterns)

- `migrate` (the chart's migration job): waits for the database, creates or upgrades MLflow's tables and the
  basic-auth tables, and creates the artifact bucket when asked (the bundled MinIO).
- `wait` (the server's init container): waits until the database is at the schema this MLflow expects, so a server
  never starts against a half-migrated store.
- `serve`: writes the basic-auth config (with the database URI) to a private temporary file and execs
  `mlflow server --app-name basic-auth` with the store URI in its environment, never on its command line.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import urllib.parse
from typing import Mapping


class DeployError(RuntimeError):
    pass


def _need(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise DeployError(f"environment variable {name} is not set")
    return value


def database_uri(env: Mapping[str, str]) -> str:
    """PostgreSQL URI with the user, password and database quoted (passwords may hold '@', ':' or '/'). The driver is
    named: a bare postgresql:// means psycopg2 to some SQLAlchemy versions and psycopg 3 to others."""
    quote = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
    uri = (f"postgresql+psycopg://{quote(_need(env, 'DSAFORGE_DB_USER'))}:{quote(_need(env, 'DSAFORGE_DB_PASSWORD'))}"
           f"@{_need(env, 'DSAFORGE_DB_HOST')}:{int(env.get('DSAFORGE_DB_PORT') or 5432)}"
           f"/{quote(_need(env, 'DSAFORGE_DB_NAME'))}")
    if env.get("DSAFORGE_DB_SSLMODE"):
        uri += f"?sslmode={quote(env['DSAFORGE_DB_SSLMODE'])}"
    return uri


def auth_config(env: Mapping[str, str], db_uri: str) -> str:
    """The basic-auth ini. The admin's name and password stay in MLFLOW_AUTH_ADMIN_* (MLflow reads them there)."""
    permission = env.get("DSAFORGE_AUTH_DEFAULT_PERMISSION") or "READ"
    # configparser interpolates '%'; a quoted password may contain '%xx'.
    return ("[mlflow]\n"
            f"default_permission = {permission}\n"
            f"database_uri = {db_uri.replace('%', '%%')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")


def server_command(env: Mapping[str, str]) -> list[str]:
    """The server's arguments; the store URI (with its password) goes in MLFLOW_BACKEND_STORE_URI, not argv."""
    cmd = ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0",
           "--port", str(int(env.get("DSAFORGE_MLFLOW_PORT") or 5000)),
           "--workers", str(int(env.get("DSAFORGE_MLFLOW_WORKERS") or 2))]
    bucket = _need(env, "DSAFORGE_ARTIFACTS_BUCKET")
    if env.get("DSAFORGE_ARTIFACTS_PROXIED", "true") == "true":
        cmd += ["--serve-artifacts", "--artifacts-destination", f"s3://{bucket}"]
    else:
        cmd += ["--no-serve-artifacts", "--default-artifact-root", f"s3://{bucket}"]
    if env.get("DSAFORGE_MLFLOW_ALLOWED_HOSTS"):
        cmd += ["--allowed-hosts", env["DSAFORGE_MLFLOW_ALLOWED_HOSTS"]]
    return cmd


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DeployError(f"database {host}:{port} unreachable after {timeout_s:.0f} s: {e}") from e
            print(f"waiting for the database at {host}:{port} ({e})", flush=True)
            time.sleep(3)


def ensure_bucket(env: Mapping[str, str]) -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=env.get("MLFLOW_S3_ENDPOINT_URL") or None)
    bucket = _need(env, "DSAFORGE_ARTIFACTS_BUCKET")
    deadline = time.monotonic() + 600
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            print(f"bucket {bucket} exists", flush=True)
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                s3.create_bucket(Bucket=bucket)
                print(f"created bucket {bucket}", flush=True)
                return
            raise
        except Exception as e:  # the store is still starting
            if time.monotonic() > deadline:
                raise DeployError(f"artifact store {env.get('MLFLOW_S3_ENDPOINT_URL')} unreachable: {e}") from e
            print(f"waiting for the artifact store ({type(e).__name__})", flush=True)
            time.sleep(3)


def migrate(env: Mapping[str, str]) -> None:
    from dsaforge.tracking_query import upgrade_store

    wait_for_port(_need(env, "DSAFORGE_DB_HOST"), int(env.get("DSAFORGE_DB_PORT") or 5432), timeout_s=600)
    revision = upgrade_store(database_uri(env))
    print(f"MLflow store at schema revision {revision}", flush=True)
    if env.get("DSAFORGE_CREATE_BUCKET") == "true":
        ensure_bucket(env)


def wait(env: Mapping[str, str], timeout_s: float = 1800) -> None:
    from dsaforge.tracking_query import store_schema

    wait_for_port(_need(env, "DSAFORGE_DB_HOST"), int(env.get("DSAFORGE_DB_PORT") or 5432), timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        current, expected = store_schema(database_uri(env))
        if current == expected:
            print(f"MLflow store is at {expected}", flush=True)
            return
        if time.monotonic() > deadline:
            raise DeployError(f"MLflow store at schema {current}, expected {expected}: did the migration job run?")
        print(f"waiting for the migration job: store at {current}, expected {expected}", flush=True)
        time.sleep(5)


def serve(env: Mapping[str, str]) -> None:
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        _need(env, name)
    db_uri = database_uri(env)
    fd, path = tempfile.mkstemp(prefix="basic_auth-", suffix=".ini")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(auth_config(env, db_uri))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = path
    os.environ["MLFLOW_BACKEND_STORE_URI"] = db_uri
    cmd = server_command(env)
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsaforge.deploy.mlflow_server", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["migrate", "wait", "serve"])
    args = p.parse_args(argv)
    try:
        {"migrate": migrate, "wait": wait, "serve": serve}[args.action](os.environ)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
