"""dsaforge.pipelines: composition only. Each pipeline module has NAME and build(cfg) -> a @dsl.pipeline."""
from __future__ import annotations

if __name__ == "pipelines":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
else:
    import importlib

    from dsaforge.config import ConfigError

    PIPELINES = {"end-to-end": "dsaforge.pipelines.end_to_end"}

    def get_pipeline(name: str):
        if name not in PIPELINES:
            raise ConfigError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINES)}")
        return importlib.import_module(PIPELINES[name])
