"""Evaluation: the benchmark suites on a trained model (`--input MODEL_STAGE=URI`)."""
from dsaforge.config import Config
from dsaforge.pipelines import builder

NAME = "evaluation"
DESCRIPTION = "Benchmark evaluation of a trained model."
STAGES = ("evaluate",)


def build(cfg: Config, reuse=None):
    return builder.build(NAME, STAGES, DESCRIPTION, cfg, reuse)
