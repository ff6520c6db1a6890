"""prepare-data as a KFP component: corpus -> documents, tokenizer and packed token shards (a Dataset artifact)."""
from kfp import dsl

from dsaforge.components.image import IMAGE


@dsl.component(base_image=IMAGE)
def prepare_data(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Output[dsl.Dataset]):
    from dsaforge.components.runtime import run_component

    run_component("prepare-data", config_json, tracking_uri, parent_run_id, dataset.path, metadata=dataset.metadata)
