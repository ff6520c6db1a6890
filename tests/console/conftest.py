"""A console served on 127.0.0.1 from a thread of the test process; runs still execute in worker processes."""
import contextlib
import html
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import uvicorn

from dsaforge.console import Settings, create_app
from tests.helpers import free_port, stop, wait_http


class Served:
    def __init__(self, settings: Settings, cancel_on_exit: bool = True) -> None:
        self.cancel_on_exit = cancel_on_exit
        self.app = create_app(settings)
        self.console = self.app.state.console
        self.url = f"http://127.0.0.1:{settings.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "Served":
        self._thread.start()
        wait_http(self.url + "/healthz", timeout_s=120)
        return self

    def __exit__(self, *exc) -> None:
        for run in self.console.store.list(status=("queued", "running")) if self.cancel_on_exit else []:
            self.console.cancel(run)
        self._server.should_exit = True
        self._thread.join(30)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.get(self.url + "/submit", timeout=60)          # sets the CSRF cookie
        return s


def csrf_of(session: requests.Session) -> str:
    return session.cookies.get("dsaforge_csrf")


def error_line(page: str) -> str:
    m = re.search(r'id="error">([^<]*)<', page)
    return html.unescape(m.group(1)) if m else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("console") / ".dsaforge"
    with Served(Settings(home=home, port=free_port(), max_parallel=2, poll_s=0.3)) as s:
        yield s


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield mp
    mp.undo()


@contextlib.contextmanager
def mlflow_server(root: Path):
    """A real `mlflow server` on 127.0.0.1 over a SQLite store under `root`; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=root, env=env, stdout=open(root / "mlflow.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
