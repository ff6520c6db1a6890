"""The image a component names at definition time. Every pipeline task is given its image from the config
(`pipeline.image` for GPU stages, `pipeline.cpu_image` for the rest, see dsaforge.pipelines.placement), so this
default only matters to someone who uses a component outside dsaforge's pipelines. The images contain dsaforge and
kfp, so components never pip-install anything at start (`install_kfp_package=False`)."""
from dsaforge.config.sections import PipelineConfig

IMAGE = PipelineConfig.model_fields["image"].default
COMPONENT = dict(base_image=IMAGE, install_kfp_package=False)
