"""The web console: pick a pipeline and a config, submit it, follow it, and jump to MLflow to compare runs.

  dsaforge ui                                   http://127.0.0.1:8765, runs on this machine (KFP's local runner)
  dsaforge ui --host 0.0.0.0 --token-file F     beyond this machine: every request needs the token
  dsaforge ui --kfp-host URL                    also submit to a Kubeflow Pipelines cluster
"""
from __future__ import annotations

import os
import secrets
import sys

from dsaforge.console.core import Console, Settings
from dsaforge.console.security import is_loopback

__all__ = ["Console", "Settings", "create_app", "serve"]


def create_app(settings: Settings):
    from dsaforge.console.app import create_app as _create

    return _create(settings)


def require_token(settings: Settings) -> bool:
    """Bound beyond this machine without a token: make one, so the console is never open to the network.
    Returns whether a token was generated."""
    if settings.token or is_loopback(settings.host):
        return False
    settings.token = secrets.token_urlsafe(24)
    return True


def serve(settings: Settings) -> None:
    import uvicorn

    if require_token(settings):
        print(f"dsaforge ui: bound to {settings.host}, so every request needs a token; this run's token: "
              f"{settings.token}", file=sys.stderr, flush=True)
    app = create_app(settings)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{shown}:{settings.port}/runs"
    print(f"dsaforge console on {url}" + (f"?token={settings.token}" if settings.token else "")
          + f"  (store: {app.state.console.tracking_uri}; MLflow UI: {app.state.console.mlflow_url}); Ctrl-C to stop",
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=os.environ.get("DSAFORGE_UI_LOG", "warning"),
                access_log=False)
