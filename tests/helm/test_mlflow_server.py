"""The MLflow server as the chart runs it: URIs and the auth config built from env, and real store migrations."""
from __future__ import annotations

import configparser
import sqlite3

import pytest

from dsaforge.deploy import mlflow_server as server
from dsaforge.tracking_query import store_schema, upgrade_store

ENV = {"DSAFORGE_DB_HOST": "db.ml.svc", "DSAFORGE_DB_PORT": "5432", "DSAFORGE_DB_NAME": "mlflow",
       "DSAFORGE_DB_USER": "mlflow", "DSAFORGE_DB_PASSWORD": "p@ss:w/rd%41", "DSAFORGE_ARTIFACTS_BUCKET": "mlflow"}


def test_database_uri_quotes_the_password():
    uri = server.database_uri({**ENV, "DSAFORGE_DB_SSLMODE": "verify-full"})
    assert uri == "postgresql+psycopg://mlflow:p%40ss%3Aw%2Frd%2541@db.ml.svc:5432/mlflow?sslmode=verify-full"
    import sqlalchemy

    assert sqlalchemy.engine.make_url(uri).password == ENV["DSAFORGE_DB_PASSWORD"]


def test_missing_env_names_the_variable():
    with pytest.raises(server.DeployError, match="DSAFORGE_DB_PASSWORD is not set"):
        server.database_uri({k: v for k, v in ENV.items() if k != "DSAFORGE_DB_PASSWORD"})


def test_auth_config_survives_configparser():
    uri = server.database_uri(ENV)
    parser = configparser.ConfigParser()
    parser.read_string(server.auth_config({**ENV, "DSAFORGE_AUTH_DEFAULT_PERMISSION": "NO_PERMISSIONS"}, uri))
    assert parser["mlflow"]["database_uri"] == uri           # '%' survives interpolation
    assert parser["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert "admin_password" not in parser["mlflow"]          # the password stays in MLFLOW_AUTH_ADMIN_PASSWORD


def test_server_command_keeps_secrets_off_argv():
    cmd = server.server_command({**ENV, "DSAFORGE_MLFLOW_ALLOWED_HOSTS": "mlflow,mlflow:*"})
    assert cmd[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert "--artifacts-destination" in cmd and "s3://mlflow" in cmd and "--allowed-hosts" in cmd
    assert not any(ENV["DSAFORGE_DB_PASSWORD"] in a or "postgresql" in a for a in cmd)
    direct = server.server_command({**ENV, "DSAFORGE_ARTIFACTS_PROXIED": "false"})
    assert "--no-serve-artifacts" in direct and "--default-artifact-root" in direct


def test_migrate_then_wait_on_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    current, expected = store_schema(uri)
    assert current is None and expected
    assert upgrade_store(uri) == expected
    assert store_schema(uri) == (expected, expected)
    tables = {r[0] for r in sqlite3.connect(tmp_path / "mlflow.db").execute("select name from sqlite_master")}
    assert {"experiments", "runs", "users", "alembic_version", "alembic_version_auth"} <= tables
    assert upgrade_store(uri) == expected                     # idempotent: the job runs on every upgrade


def test_wait_for_port_gives_up_with_a_clear_error():
    with pytest.raises(server.DeployError, match="unreachable after 0 s"):
        server.wait_for_port("127.0.0.1", 9, timeout_s=0)
