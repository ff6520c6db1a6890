"""dsaforge.pipelines: composition only. Each pipeline module has NAME and build(cfg) -> a @dsl.pipeline."""
from __future__ import annotations

import importlib

from dsaforge.config import ConfigError

PIPELINES = {"end-to-end": "dsaforge.pipelines.end_to_end"}


def get_pipeline(name: str):
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINES)}")
    return importlib.import_module(PIPELINES[name])
