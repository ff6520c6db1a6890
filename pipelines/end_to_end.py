"""End to end: pretraining, then post-training and evaluation, all tracked under one MLflow run.

prepare-data -> pretrain -> warmup -> sparse, synthesis from the same data, then the post-training and evaluation
stages this installation has; each stage is one component (the union of the three sub-pipelines' stages).

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
