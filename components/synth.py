"""Agentic task synthesis as a KFP component: environments, tools, tasks and verifiers that passed every gate."""
from kfp import dsl

from dsaforge.components.image import IMAGE


@dsl.component(base_image=IMAGE)
def synthesize(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
               tasks: dsl.Output[dsl.Dataset]):
    from dsaforge.components.runtime import run_component

    run_component("synthesize", config_json, tracking_uri, parent_run_id, tasks.path,
                  inputs={"prepare-data": dataset.path}, metadata=tasks.metadata)
