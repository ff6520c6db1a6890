"""Components that open and close the pipeline's parent MLflow run (tags as KFP's MLflow plugin sets them)."""
from kfp import dsl

from dsaforge.components.image import COMPONENT


@dsl.component(**COMPONENT)
def open_run(config_json: str, tracking_uri: str, pipeline: str, pipeline_run_id: str, parent_run_id: str) -> str:
    from dsaforge.components.runtime import open_pipeline_run

    return open_pipeline_run(config_json, tracking_uri, pipeline, pipeline_run_id, parent_run_id)


@dsl.component(**COMPONENT)
def close_run(status: dsl.PipelineTaskFinalStatus, config_json: str, tracking_uri: str, parent_run_id: str,
              pipeline_run_id: str):
    from dsaforge.components.runtime import close_pipeline_run

    close_pipeline_run(config_json, tracking_uri, parent_run_id, pipeline_run_id, status.state,
                       status.error_message or "")
