"""Shared fixtures. GPU tests carry the `gpu` marker and are deselected by default (see pyproject addopts)."""
import os

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread a worker (and for the stages and servers it starts): `make test` runs as many workers as the
    # machine has cores, and OpenMP pools of two threads a process, spinning on two cores, slow every test several
    # times over. The tiny models' operations gain nothing from a second thread anyway.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Kernel wrappers validate index values (a device sync per call, so off outside tests).
os.environ.setdefault("DSAFORGE_CHECK_INDICES", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run first (otherwise in collection order): with `make test`'s workers (pytest-xdist, one
    test file per worker at a time) the longest files start at once and the short ones fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
