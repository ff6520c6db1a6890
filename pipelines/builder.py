"""One builder for every pipeline: a list of stage names becomes a KFP pipeline whose wiring comes from the stage
registry (`dsaforge.stages.STAGES`: each stage's inputs, output and component), whose placement comes from the
config (dsaforge.pipelines.placement), and whose MLflow parent run is opened first and closed in an exit handler.

A stage whose upstream is not in the pipeline reads it from `reuse` (stage -> artifact URI) through a KFP importer:
that is how a sub-pipeline starts from another's outputs (`--input sparse=URI`) and how `dsaforge run --resume`
skips the steps that had finished.
"""

from typing import Mapping, Optional, Sequence  # no `from __future__ import annotations`: KFP reads the types

from kfp import dsl

from dsaforge.config import Config, ConfigError
from dsaforge.stages import STAGES, input_param

ARTIFACTS = {"Dataset": dsl.Dataset, "Model": dsl.Model, "Artifact": dsl.Artifact}


def available(stages: Sequence[str]) -> tuple[str, ...]:
    """The stages of a pipeline definition that this installation has."""
    return tuple(s for s in stages if s in STAGES)


def plan(name: str, stages: Sequence[str], reuse: Mapping[str, str]) -> list[str]:
    """The stages to run, in order, checking that every required input is produced or given."""
    todo = [s for s in available(stages) if s not in reuse]
    produced = set(reuse)
    for stage in todo:
        missing = [i for i in STAGES[stage].inputs if i not in produced]
        if missing:
            raise ConfigError(f"pipeline {name}: stage {stage} needs the output of {', '.join(missing)} "
                              f"(pass --input {missing[0]}=URI)")
        produced.add(stage)
    return todo


def build(name: str, stages: Sequence[str], description: str, cfg: Config,
          reuse: Optional[Mapping[str, str]] = None):
    """The @dsl.pipeline of `stages`; `reuse` maps stages to finished outputs (URIs) imported instead of run."""
    from dsaforge.components.tracking import close_run, open_run
    from dsaforge.pipelines.placement import cache_key, control_task, place

    reuse = dict(reuse or {})
    unknown = sorted(set(reuse) - set(STAGES))
    if unknown:
        raise ConfigError(f"--input {unknown[0]}: no such stage; stages: {', '.join(STAGES)}")
    todo = plan(name, stages, reuse)

    @dsl.pipeline(name=name, description=description)
    def pipeline(config_json: str, tracking_uri: str = "", parent_run_id: str = ""):
        close = control_task(close_run(config_json=config_json, tracking_uri=tracking_uri,
                                       parent_run_id=parent_run_id, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                             cfg)
        with dsl.ExitHandler(close):
            run = control_task(open_run(config_json=config_json, tracking_uri=tracking_uri, pipeline=name,
                                        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                        parent_run_id=parent_run_id), cfg)
            common = dict(config_json=config_json, tracking_uri=tracking_uri, parent_run_id=run.output)
            outputs, keys = {}, {}
            for stage, uri in reuse.items():
                imported = dsl.importer(artifact_uri=uri, artifact_class=ARTIFACTS[STAGES[stage].artifact],
                                        reimport=False, metadata={"dsaforge.stage": stage})
                imported.set_display_name(f"{stage} (reused)")
                outputs[stage], keys[stage] = imported.output, f"uri:{uri}"
            for stage in todo:
                spec = STAGES[stage]
                wired = [i for i in spec.inputs + spec.optional if i in outputs]
                upstream = {input_param(i): outputs[i] for i in wired}
                keys[stage] = cache_key(cfg, stage, {i: keys[i] for i in wired})
                if spec.fan_out and cfg.synth.shards > 1:
                    task = fan_out(spec, cfg, common, upstream)
                else:
                    task = spec.load_component()(**common, **upstream)
                task.set_display_name(stage)
                place(task, cfg, spec, keys[stage])
                outputs[stage] = task.outputs[spec.output]

    return pipeline


def fan_out(spec, cfg: Config, common: dict, upstream: dict):
    """`cfg.synth.shards` shard tasks in a dsl.ParallelFor, then the stage's merge task over dsl.Collected outputs.

    Shard tasks take no per-run input (no parent run id), so KFP's own cache key (their inputs: config, shard id,
    upstream artifacts) reuses a finished shard; a static cache key cannot, as it would be the same for all."""
    from dsaforge.pipelines.placement import place

    shard_component, merge_component = (spec.load_component(t) for t in spec.fan_out)
    n = cfg.synth.shards
    with dsl.ParallelFor(list(range(n)), parallelism=n, name=f"{spec.name}-shards") as shard:
        task = shard_component(config_json=common["config_json"], shard=shard, **upstream)
        task.set_display_name(f"{spec.name}-shard")
        place(task, cfg, spec)
    return merge_component(**common, shards=dsl.Collected(task.outputs["shard_out"]), **upstream)
