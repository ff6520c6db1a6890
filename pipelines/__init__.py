"""dsaforge.pipelines: composition only. Each pipeline module has NAME, STAGES, DESCRIPTION and
build(cfg, reuse=None) -> a @dsl.pipeline (dsaforge.pipelines.builder); they share the stages' components."""
from __future__ import annotations

if __name__ == "pipelines":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
else:
    import importlib

    from dsaforge.config import ConfigError

    _MODULES = {"end-to-end": "dsaforge.pipelines.end_to_end", "pretraining": "dsaforge.pipelines.pretraining",
                "post-training": "dsaforge.pipelines.post_training", "evaluation": "dsaforge.pipelines.evaluation"}

    def _has_stages(module: str) -> bool:
        from dsaforge.pipelines.builder import available

        return bool(available(importlib.import_module(module).STAGES))

    # A pipeline is listed when this installation has at least one of its stages.
    PIPELINES = {name: module for name, module in _MODULES.items() if _has_stages(module)}

    def get_pipeline(name: str):
        if name not in PIPELINES:
            raise ConfigError(f"unknown pipeline {name!r}; available: {', '.join(PIPELINES)}")
        return importlib.import_module(PIPELINES[name])
