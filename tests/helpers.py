"""Small helpers shared by tests: free ports, background servers that are always cleaned up."""
import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True, with every process it spawned."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 over a SQLite store under `root`; use as a context manager."""

    def __init__(self, root) -> None:
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                     "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination",
                     f"{root}/artifacts", "--workers", "1"]

    def __enter__(self) -> str:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        try:
            wait_http(self.url + "/health")
        except BaseException:
            stop(self._proc)
            raise
        return self.url

    def __exit__(self, *exc) -> None:
        stop(self._proc)
