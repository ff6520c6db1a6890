"""Deployment: the MLflow server as the Helm chart runs it, and the chart's own tooling (helm binary, presets, checks)."""
