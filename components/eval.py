"""The evaluate stage as a KFP component: suites over the final checkpoint, results + report (a Metrics-bearing
Artifact whose directory holds Parquet, JSON and the HTML report)."""
from kfp import dsl

from dsaforge.components.image import IMAGE


@dsl.component(base_image=IMAGE)
def evaluate(config_json: str, tracking_uri: str, parent_run_id: str, dataset: dsl.Input[dsl.Dataset],
             model: dsl.Input[dsl.Model], tasks: dsl.Input[dsl.Dataset], results: dsl.Output[dsl.Artifact]):
    from dsaforge.components.runtime import run_component

    run_component("evaluate", config_json, tracking_uri, parent_run_id, results.path,
                  inputs={"prepare-data": dataset.path, "sparse": model.path, "synthesize": tasks.path},
                  metadata=results.metadata)
