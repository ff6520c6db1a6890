"""GRPO as a KFP component: the SFT model's policy trained on the synthesized tasks, rollouts saved to Parquet."""
from kfp import dsl

from dsaforge.components.image import IMAGE


@dsl.component(base_image=IMAGE)
def grpo(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
         base: dsl.Input[dsl.Model], tasks: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_component

    run_component("grpo", config_json, tracking_uri, parent_run_id, model.path,
                  inputs={"prepare-data": dataset.path, "sft": base.path, "synthesize": tasks.path},
                  metadata=model.metadata)
