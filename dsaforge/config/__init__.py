"""Typed, validated configuration: one section per concern, presets as functions, YAML + --set overrides."""
from dsaforge.config.base import ConfigError, Section
from dsaforge.config.loader import config_hash, diff, flatten, load_config, to_yaml, validate
from dsaforge.config.model import ModelConfig
from dsaforge.config.presets import PRESETS, preset
from dsaforge.config.sections import (Config, DataConfig, EvalConfig, ParallelConfig, PipelineConfig, RLConfig,
                                      SandboxConfig, StageTrainConfig, SynthConfig, TrackingConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "PRESETS", "ParallelConfig",
           "PipelineConfig", "RLConfig", "SandboxConfig", "Section", "StageTrainConfig", "SynthConfig",
           "TrackingConfig", "TrainConfig", "config_hash", "diff", "flatten", "load_config", "preset", "to_yaml",
           "validate"]
