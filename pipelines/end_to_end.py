"""The end-to-end pipeline: prepare-data -> pretrain -> warmup -> sparse, synthesis from the same data, then
post-training and evaluation; each stage is one component, all tracked under one MLflow run.

Run locally: `dsaforge run end-to-end --preset tiny` (KFP local runner). On a cluster:
`dsaforge submit end-to-end --preset small --host URL` (or `dsaforge pipelines compile`).
"""
from dsaforge.config import Config
from dsaforge.pipelines import builder, evaluation, post_training, pretraining

NAME = "end-to-end"
DESCRIPTION = "DeepSeek-V3.2 recipe end to end: data, DSA training, synthesis, RL, eval."
STAGES = pretraining.STAGES + post_training.STAGES + evaluation.STAGES


def build(cfg: Config, reuse=None):
    return builder.build(NAME, STAGES, DESCRIPTION, cfg, reuse)
