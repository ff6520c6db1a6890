"""Submit pipelines to a Kubeflow Pipelines cluster and manage their runs, through kfp.Client (KFP's v2beta1 REST
API): `dsaforge submit PIPELINE --host URL`, `dsaforge runs list|get|cancel`.

The host comes from --host, else $KFP_HOST, else `pipeline.host`. Credentials come from the environment:
$KFP_TOKEN (a bearer token, e.g. a service-account token or an OIDC id token) or $KFP_TOKEN_FILE (a file holding
one, re-read on every call), or $KFP_COOKIE (e.g. `authservice_session=...` behind Kubeflow's dex/oauth2-proxy).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from dsaforge.config import Config, ConfigError


@dataclass
class Submitted:
    run_id: str
    experiment_id: str
    url: str                    # the run's page in the KFP UI


def kfp_host(cfg: Optional[Config], host: Optional[str]) -> str:
    url = host or os.environ.get("KFP_HOST") or (cfg.pipeline.host if cfg else None)
    if not url:
        raise ConfigError("no Kubeflow Pipelines host: pass --host URL, set $KFP_HOST or pipeline.host")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"KFP host {url!r} must start with http:// or https://")
    return url.rstrip("/")


def _auth() -> dict[str, Optional[str]]:
    token = os.environ.get("KFP_TOKEN")
    if not token and os.environ.get("KFP_TOKEN_FILE"):
        path = Path(os.environ["KFP_TOKEN_FILE"])
        if not path.is_file():
            raise ConfigError(f"KFP_TOKEN_FILE={path} does not exist")
        token = path.read_text().strip()
    return {"existing_token": token or None, "cookies": os.environ.get("KFP_COOKIE") or None}


def _check_reachable(host: str, auth: Mapping[str, Optional[str]], timeout_s: float = 10.0) -> None:
    """One clear line when the API server is not there or refuses the credentials (kfp.Client would retry the
    health check for half a minute and then raise a long traceback)."""
    req = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if auth["existing_token"]:
        req.add_header("Authorization", f"Bearer {auth['existing_token']}")
    if auth["cookies"]:
        req.add_header("Cookie", auth["cookies"])
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(f"Kubeflow Pipelines at {host} refused the credentials (HTTP {e.code}); "
                              "set KFP_TOKEN, KFP_TOKEN_FILE or KFP_COOKIE") from None
        if e.code >= 500 or e.code == 404:
            raise ConfigError(f"Kubeflow Pipelines at {host} answered HTTP {e.code} on /apis/v2beta1/healthz "
                              "(is this the KFP API address?)") from None
    except OSError as e:
        raise ConfigError(f"Kubeflow Pipelines at {host} is unreachable ({getattr(e, 'reason', e)})") from None


def connect(host: str):
    """A kfp.Client for `host` with the environment's credentials, after a quick reachability check."""
    auth = _auth()
    _check_reachable(host, auth)
    import kfp

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, **auth)


def ui_url(host: str, run_id: str) -> str:
    ui = os.environ.get("KF_PIPELINES_UI_ENDPOINT") or host
    return f"{ui.rstrip('/')}/#/runs/details/{run_id}"


def check_submittable(cfg: Config) -> None:
    """What a cluster run needs that a laptop run does not: a tracking server every pod can reach."""
    uri = cfg.tracking.uri
    if uri and not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(f"tracking.uri={uri} is a local store that pods cannot share; use an MLflow server "
                          "(http://...) or leave it unset and provide MLFLOW_TRACKING_URI in a Secret")
    if not uri and not any("MLFLOW_TRACKING_URI" in s.keys.values() for s in cfg.pipeline.secrets):
        raise ConfigError("pods would have no MLflow server: set tracking.uri or map MLFLOW_TRACKING_URI in "
                          "pipeline.secrets")


def submit(name: str, cfg: Config, host: str, experiment: Optional[str] = None,
           reuse: Optional[Mapping[str, str]] = None, run_name: Optional[str] = None,
           namespace: Optional[str] = None) -> Submitted:
    """Compile `name` from `cfg` (placement recompiled from the submitted config) and start a run."""
    from dsaforge.runner import compile_pipeline

    check_submittable(cfg)
    client = connect(host)
    with tempfile.TemporaryDirectory(prefix="dsaforge-submit-") as tmp:
        package = compile_pipeline(name, cfg, Path(tmp) / f"{name}.yaml", reuse=reuse)
        with contextlib.redirect_stdout(io.StringIO()):
            result = client.create_run_from_pipeline_package(
                str(package), arguments={"config_json": json.dumps(cfg.model_dump())},
                run_name=run_name or f"{name} ({cfg.preset})", experiment_name=experiment or cfg.pipeline.kfp_experiment,
                namespace=namespace)
    run = result.run_info
    return Submitted(run.run_id, run.experiment_id or "", ui_url(host, run.run_id))


def _run_row(run: Any) -> dict[str, Any]:
    err = getattr(run, "error", None)
    return {"run_id": run.run_id, "name": run.display_name, "state": run.state or "PENDING",
            "created": str(run.created_at or ""), "finished": str(run.finished_at or ""),
            "experiment_id": run.experiment_id, "error": (getattr(err, "message", None) or "") if err else ""}


def list_runs(host: str, experiment: Optional[str] = None, limit: int = 20,
              namespace: Optional[str] = None) -> list[dict[str, Any]]:
    client = connect(host)
    exp_id = None
    if experiment:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exp_id = client.get_experiment(experiment_name=experiment, namespace=namespace).experiment_id
            except ValueError as e:
                raise ConfigError(f"KFP experiment {experiment!r}: {e}") from None
    resp = client.list_runs(page_size=limit, sort_by="created_at desc", experiment_id=exp_id, namespace=namespace)
    return [_run_row(r) for r in resp.runs or []]


def _api_call(fn, run_id: str):
    from kfp_server_api import ApiException

    try:
        return fn(run_id)
    except ApiException as e:
        if e.status == 404:
            raise ConfigError(f"no KFP run {run_id!r}") from None
        raise


def get_run(host: str, run_id: str) -> dict[str, Any]:
    client = connect(host)
    run = _api_call(client.get_run, run_id)
    row = _run_row(run)
    tasks = getattr(getattr(run, "run_details", None), "task_details", None) or []
    row["tasks"] = {t.display_name: t.state for t in tasks if t.display_name}
    row["url"] = ui_url(host, run_id)
    return row


def cancel_run(host: str, run_id: str) -> None:
    client = connect(host)
    _api_call(client.terminate_run, run_id)
