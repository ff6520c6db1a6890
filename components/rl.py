"""GRPO as a KFP component: the SFT model's policy trained on the synthesized tasks, rollouts saved to Parquet."""
from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def grpo(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
         sft: dsl.Input[dsl.Model], synthesize: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("grpo", config_json, tracking_uri, parent_run_id, model, prepare_data=prepare_data, sft=sft,
                        synthesize=synthesize)
