"""The evaluate stage as a KFP component: the suites on the newest model the pipeline made (an Artifact whose
directory holds each suite's Parquet and JSON and the HTML report)."""
from typing import Optional

from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def evaluate(config_json: str, tracking_uri: str, parent_run_id: str, prepare_data: dsl.Input[dsl.Dataset],
             results: dsl.Output[dsl.Artifact], pretrain: Optional[dsl.Input[dsl.Model]] = None,
             warmup: Optional[dsl.Input[dsl.Model]] = None, sparse: Optional[dsl.Input[dsl.Model]] = None,
             sft: Optional[dsl.Input[dsl.Model]] = None, grpo: Optional[dsl.Input[dsl.Model]] = None,
             synthesize: Optional[dsl.Input[dsl.Dataset]] = None):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("evaluate", config_json, tracking_uri, parent_run_id, results, prepare_data=prepare_data,
                        pretrain=pretrain, warmup=warmup, sparse=sparse, sft=sft, grpo=grpo, synthesize=synthesize)
