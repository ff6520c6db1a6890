"""dsaforge.model.train: the pretrain -> warmup -> sparse training stages (trainer loop, token data, checkpoints).

Entry points: `dsaforge.model.train.stages:pretrain`, `:warmup`, `:sparse` (each `run(ctx) -> summary`).
Parallel layouts go through `dsaforge.model.megatron_bridge`, the only module that imports megatron.
"""
