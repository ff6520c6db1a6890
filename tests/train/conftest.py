"""Shared fixtures: the tiny preset's prepared dataset, built once per test session."""
from pathlib import Path

import pytest

from dsaforge.config import load_config
from dsaforge.data.prepare import prepare


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "data"
    prepare(load_config("tiny"), out)
    return out


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, tiny_data) -> dict:
    """pretrain -> warmup -> sparse with the tiny preset's own settings, through the stage entry points."""
    from dsaforge.model.train import stages
    from dsaforge.stages import StageContext
    from dsaforge.tracking import NullTracker

    cfg = load_config("tiny")
    root = tmp_path_factory.mktemp("chain")
    out = {"data": tiny_data, "cfg": cfg}
    inputs = {"prepare-data": tiny_data}
    for stage in ("pretrain", "warmup", "sparse"):
        tracker = NullTracker()
        summary = getattr(stages, stage)(StageContext(cfg, root / stage, dict(inputs), tracker))
        out[stage] = {"dir": root / stage, "summary": summary, "tracker": tracker}
        inputs = {"prepare-data": tiny_data, stage: root / stage}
    return out
