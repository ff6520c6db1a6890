"""The DSA training stages as KFP components: pretrain (dense) -> warmup (indexer only) -> sparse (all, top-k), and
sft (the sparse model fine-tuned on the synthesized tasks' reference trajectories).

Each consumes the prepared dataset and the previous stage's Model artifact (checkpoints + HF export) and produces
its own. On a cluster the tasks get GPUs from the pipeline (see dsaforge.pipelines.resources).
"""
from kfp import dsl

from dsaforge.components.image import IMAGE


@dsl.component(base_image=IMAGE)
def pretrain(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
             model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_component

    run_component("pretrain", config_json, tracking_uri, parent_run_id, model.path,
                  inputs={"prepare-data": dataset.path}, metadata=model.metadata)


@dsl.component(base_image=IMAGE)
def warmup(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
           base: dsl.Input[dsl.Model], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_component

    run_component("warmup", config_json, tracking_uri, parent_run_id, model.path,
                  inputs={"prepare-data": dataset.path, "pretrain": base.path}, metadata=model.metadata)


@dsl.component(base_image=IMAGE)
def sparse(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
           base: dsl.Input[dsl.Model], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_component

    run_component("sparse", config_json, tracking_uri, parent_run_id, model.path,
                  inputs={"prepare-data": dataset.path, "warmup": base.path}, metadata=model.metadata)


@dsl.component(base_image=IMAGE)
def sft(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
        base: dsl.Input[dsl.Model], tasks: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_component

    run_component("sft", config_json, tracking_uri, parent_run_id, model.path,
                  inputs={"prepare-data": dataset.path, "sparse": base.path, "synthesize": tasks.path},
                  metadata=model.metadata)
