"""Shared fixtures. GPU tests carry the `gpu` marker and are deselected by default (see pyproject addopts)."""
import os

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
