"""Shared fixtures: a small prepared dataset and a randomly initialised tiny checkpoint exported as a training stage's
output (the evaluation mechanics do not need trained weights; the pipeline test evaluates trained ones)."""
from pathlib import Path

import pytest
import torch

from dsaforge.config import load_config
from dsaforge.data.prepare import prepare


@pytest.fixture(scope="session")
def eval_cfg():
    return load_config("tiny", (), ["data.max_documents=80", "eval.max_samples=4"])


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory, eval_cfg) -> Path:
    out = tmp_path_factory.mktemp("eval-data") / "data"
    prepare(eval_cfg, out)
    return out


@pytest.fixture(scope="session")
def eval_stage_dir(tmp_path_factory, eval_cfg) -> Path:
    """A `sparse` stage output holding only its HF export, of a seeded random tiny model."""
    from dsaforge.model import Transformer
    from dsaforge.model.hf import export_hf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval-model") / "sparse"
    export_hf(Transformer(eval_cfg.model), root / "hf")
    return root


@pytest.fixture(scope="session")
def em(eval_data, eval_stage_dir):
    from dsaforge.eval.checkpoint import EvalModel

    return EvalModel.load(eval_stage_dir / "hf", eval_data / "tokenizer.json", torch.device("cpu"))
