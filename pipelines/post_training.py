"""Post-training: agentic task synthesis, then SFT and GRPO on the synthesized tasks where installed.

Starts from a pretraining run's outputs: `dsaforge run post-training --input sparse=URI --input prepare-data=URI`.
"""
from dsaforge.config import Config
from dsaforge.pipelines import builder

NAME = "post-training"
DESCRIPTION = "Agentic task synthesis and RL post-training (SFT, GRPO) of a sparse-adapted model."
STAGES = ("synthesize", "sft", "grpo")


def build(cfg: Config, reuse=None):
    return builder.build(NAME, STAGES, DESCRIPTION, cfg, reuse)
