"""The end-to-end pipeline: prepare-data -> pretrain -> warmup -> sparse, and synthesize from the same data; evaluate
last, on the sparse checkpoint with the held-out tasks; each stage is one component, all tracked under one MLflow run.

Run locally: `dsaforge run end-to-end --preset tiny` (KFP local runner). Compile for a cluster:
`dsaforge pipelines compile end-to-end --preset small`.
"""

from kfp import dsl

from dsaforge.components.data import prepare_data
from dsaforge.components.eval import evaluate
from dsaforge.components.synth import synthesize
from dsaforge.components.train import pretrain, sparse, warmup
from dsaforge.components.tracking import close_run, open_run
from dsaforge.config import Config
from dsaforge.pipelines.resources import cpu_task, gpu_task

NAME = "end-to-end"


def build(cfg: Config):
    @dsl.pipeline(name=NAME, description="DeepSeek-V3.2 recipe end to end: data, DSA training, synthesis, RL, eval.")
    def end_to_end(config_json: str, tracking_uri: str = "", parent_run_id: str = ""):
        close = close_run(config_json=config_json, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                          pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        with dsl.ExitHandler(cpu_task(close, "1", "1G")):
            run = cpu_task(open_run(config_json=config_json, tracking_uri=tracking_uri, pipeline=NAME,
                                    pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, parent_run_id=parent_run_id),
                           "1", "1G")
            common = dict(config_json=config_json, tracking_uri=tracking_uri, parent_run_id=run.output)
            data = cpu_task(prepare_data(**common).set_display_name("prepare-data"), "4", "16G")
            dataset = data.outputs["dataset"]
            pre = gpu_task(pretrain(dataset=dataset, **common).set_display_name("pretrain"), cfg)
            warm = gpu_task(warmup(dataset=dataset, base=pre.outputs["model"], **common).set_display_name("warmup"), cfg)
            sp = gpu_task(sparse(dataset=dataset, base=warm.outputs["model"], **common).set_display_name("sparse"), cfg)
            syn = cpu_task(synthesize(dataset=dataset, **common).set_display_name("synthesize"), "8", "16G")
            gpu_task(evaluate(dataset=dataset, model=sp.outputs["model"], tasks=syn.outputs["tasks"], **common)
                     .set_display_name("evaluate"), cfg)

    return end_to_end
