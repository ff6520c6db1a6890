"""Shared fixtures. GPU tests carry the `gpu` marker and are deselected by default (see pyproject addopts)."""
import os

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# Kernel wrappers validate index values (a device sync per call, so off outside tests).
os.environ.setdefault("DSAFORGE_CHECK_INDICES", "1")
