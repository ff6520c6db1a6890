"""prepare-data as a KFP component: corpus -> documents, tokenizer and packed token shards (a Dataset artifact)."""
from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def prepare_data(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Output[dsl.Dataset]):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("prepare-data", config_json, tracking_uri, parent_run_id, dataset)
