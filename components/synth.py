"""Agentic task synthesis as a KFP component: environments, tools, tasks and verifiers that passed every gate."""
from typing import Optional

from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def synthesize(config_json: str, tracking_uri: str, parent_run_id: str, tasks: dsl.Output[dsl.Dataset],
               prepare_data: Optional[dsl.Input[dsl.Dataset]] = None):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("synthesize", config_json, tracking_uri, parent_run_id, tasks, prepare_data=prepare_data)
