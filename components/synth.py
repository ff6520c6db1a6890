"""Agentic task synthesis as a KFP component: environments, tools, tasks and verifiers that passed every gate."""
from typing import List, Optional

from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def synthesize(config_json: str, tracking_uri: str, parent_run_id: str, tasks: dsl.Output[dsl.Dataset],
               prepare_data: Optional[dsl.Input[dsl.Dataset]] = None):
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("synthesize", config_json, tracking_uri, parent_run_id, tasks, prepare_data=prepare_data)


@dsl.component(**COMPONENT)
def synthesize_shard(config_json: str, shard: int, shard_out: dsl.Output[dsl.Dataset],
                     prepare_data: Optional[dsl.Input[dsl.Dataset]] = None):
    """One shard of the first synthesis round (synth.shards > 1); not tracked on its own: the merge's stage run
    records every shard's numbers. No per-run input, so KFP's cache key (config, shard, data) can hit."""
    from dsaforge.components.runtime import run_shard_component

    run_shard_component(config_json, shard, shard_out, prepare_data)


@dsl.component(**COMPONENT)
def synthesize_merge(config_json: str, tracking_uri: str, parent_run_id: str, shards: dsl.Input[List[dsl.Dataset]],
                     tasks: dsl.Output[dsl.Dataset], prepare_data: Optional[dsl.Input[dsl.Dataset]] = None):
    """The synthesize stage over its shards: validates them, finishes the synthesis, publishes atomically."""
    from dsaforge.components.runtime import run_stage_component

    run_stage_component("synthesize", config_json, tracking_uri, parent_run_id, tasks, prepare_data=prepare_data,
                        shards=shards)
