"""The DSA training stages as KFP components: pretrain (dense) -> warmup (indexer only) -> sparse (all, top-k), and
sft (the sparse model fine-tuned on the synthesized tasks' reference trajectories).

Each consumes the prepared dataset and the previous stage's Model artifact (checkpoints + HF export) and produces
its own. On a cluster the tasks get GPUs from the pipeline (see dsaforge.pipelines.placement).
"""
from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def pretrain(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
             model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("pretrain", config_json, tracking_uri, parent_run_id, model, prepare_data=prepare_data)


@dsl.component(**COMPONENT)
def warmup(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
           pretrain: dsl.Input[dsl.Model], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("warmup", config_json, tracking_uri, parent_run_id, model, prepare_data=prepare_data,
                        pretrain=pretrain)


@dsl.component(**COMPONENT)
def sparse(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
           warmup: dsl.Input[dsl.Model], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("sparse", config_json, tracking_uri, parent_run_id, model, prepare_data=prepare_data,
                        warmup=warmup)


@dsl.component(**COMPONENT)
def sft(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
        sparse: dsl.Input[dsl.Model], synthesize: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("sft", config_json, tracking_uri, parent_run_id, model, prepare_data=prepare_data,
                        sparse=sparse, synthesize=synthesize)
