"""Pretraining: prepare-data -> pretrain (dense) -> warmup (indexer) -> sparse (DSA), tracked under one MLflow run.

`dsaforge run pretraining --preset tiny`; on a cluster `dsaforge submit pretraining --preset small --host URL`.
"""
from dsaforge.config import Config
from dsaforge.pipelines import builder

NAME = "pretraining"
DESCRIPTION = "Data preparation, dense pretraining, the indexer's dense warm-up and sparse adaptation."
STAGES = ("prepare-data", "pretrain", "warmup", "sparse")


def build(cfg: Config, reuse=None):
    return builder.build(NAME, STAGES, DESCRIPTION, cfg, reuse)
