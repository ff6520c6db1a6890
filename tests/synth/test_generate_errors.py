"""Run: python -m pytest tests/synth/test_generate_errors.py -q

A class that cannot produce tasks must stop the stage with a reason, never yield an empty share silently."""
import importlib.util

import pytest

from dsaforge.config import load_config
from dsaforge.synth import generate
from dsaforge.synth.registry import agent_class

from .conftest import requires_bwrap

pytestmark = requires_bwrap


def test_missing_jupyter_is_named_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipykernel" else real(name, *a))
    cfg = load_config("tiny").synth
    with pytest.raises(generate.SynthesisError, match="code_interpreter agent class needs ipykernel"):
        generate.synthesize(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "tasks.parquet").exists()


def test_a_class_with_no_valid_task_stops_the_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("database disk image is malformed")

    # The worker pool forks, so the patched method reaches the workers.
    monkeypatch.setattr(agent_class("general"), "build_env", broken)
    cfg = load_config("tiny", overrides=["synth.agent_classes=[general]"]).synth
    with pytest.raises(generate.SynthesisError, match=r"agent class 'general': no task passed its gates .*"
                                                     r"first build error: OSError: database disk image is malformed"):
        generate.synthesize(cfg, tmp_path / "out")
