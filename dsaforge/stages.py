"""The stage registry: every stage is a library function `run(ctx) -> summary`, reachable from
`dsaforge stage <name>` (in-process) and from its KFP component (see dsaforge.components).

Stage functions are referenced by import path so that `dsaforge config ...` never imports torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dsaforge.config import Config, ConfigError
from dsaforge.outputs import check_out_dir, claim
from dsaforge.tracking import NullTracker, Tracker


@dataclass
class StageContext:
    cfg: Config
    out_dir: Path                                   # this stage's output directory (a KFP output artifact's path)
    inputs: dict[str, Path] = field(default_factory=dict)   # upstream stages' outputs, by stage name
    tracker: Tracker = field(default_factory=NullTracker)


@dataclass(frozen=True)
class Stage:
    """A stage, declared once: the CLI, its KFP component, the pipelines and the launcher all derive from this.

    A KFP component for a stage is `component` ("module:function"); its parameters are the common ones
    (config_json, tracking_uri, parent_run_id), one input artifact per name in `inputs` + `optional` (named
    `input_param(name)`) and the output artifact `output` (tests/pipelines check every component against this)."""
    name: str
    target: str                                     # "module:function", the function takes a StageContext
    inputs: tuple[str, ...]                         # names of the stages whose outputs it needs
    help: str
    optional: tuple[str, ...] = ()                  # stages whose outputs it uses when the pipeline has them
    output: str = "model"                           # the component's output artifact
    artifact: str = "Model"                         # its KFP type: Model, Dataset or Artifact
    component: Optional[str] = None                 # "module:function" of the KFP component
    gpu: bool = False                               # placed on the GPU pool (pipeline.image, accelerators)
    cpu: str = "2"                                  # default requests, overridable per stage in pipeline.resources
    memory: str = "8G"
    resumable: bool = False                         # resumes inside its own output directory (checkpoints)
    # (shard component, merge component) when the stage fans out into `synth.shards` parallel tasks
    fan_out: Optional[tuple[str, str]] = None

    def load(self) -> Callable[[StageContext], dict]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)

    def load_component(self, target: Optional[str] = None):
        target = target or self.component
        if target is None:
            raise ConfigError(f"stage {self.name!r} has no KFP component")
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)


def input_param(stage: str) -> str:
    """The component parameter that carries `stage`'s output: prepare-data -> prepare_data."""
    return stage.replace("-", "_")


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare-data", "dsaforge.data.prepare:run", (),
          "Ingest a corpus, dedup, train the BPE tokenizer, pack token sequences into Parquet shards.",
          output="dataset", artifact="Dataset", component="dsaforge.components.data:prepare_data",
          cpu="4", memory="16G"),
    Stage("pretrain", "dsaforge.model.train.stages:pretrain", ("prepare-data",),
          "Dense MLA+MoE language-model pretraining (from scratch, or continued from an HF checkpoint).",
          component="dsaforge.components.train:pretrain", gpu=True, cpu="8", memory="64G", resumable=True),
    Stage("warmup", "dsaforge.model.train.stages:warmup", ("prepare-data", "pretrain"),
          "Dense warm-up: everything frozen but the lightning indexer, trained on its KL to the attention.",
          component="dsaforge.components.train:warmup", gpu=True, cpu="8", memory="64G", resumable=True),
    Stage("sparse", "dsaforge.model.train.stages:sparse", ("prepare-data", "warmup"),
          "Sparse adaptation: top-k attention, all parameters, LM loss + indexer KL on the selected set.",
          component="dsaforge.components.train:sparse", gpu=True, cpu="8", memory="64G", resumable=True),
    Stage("synthesize", "dsaforge.synth.stage:run", (),
          "Agentic task synthesis: environments, tools, tasks and verifiers that pass every validation gate.",
          optional=("prepare-data",), output="tasks", artifact="Dataset",
          component="dsaforge.components.synth:synthesize", cpu="8", memory="16G",
          fan_out=("dsaforge.components.synth:synthesize_shard", "dsaforge.components.synth:synthesize_merge")),
    Stage("sft", "dsaforge.model.train.stages:sft", ("prepare-data", "sparse", "synthesize"),
          "Supervised fine-tuning on the tasks' reference trajectories (chat template, loss on assistant tokens).",
          component="dsaforge.components.train:sft", gpu=True, cpu="8", memory="64G", resumable=True),
    Stage("grpo", "dsaforge.model.rl.stage:run", ("prepare-data", "sft", "synthesize"),
          "GRPO with the four stabilisers: generate, reward, advantage, train, sync weights, evaluate.",
          component="dsaforge.components.rl:grpo", gpu=True, cpu="8", memory="64G", resumable=True),
    # The model is the newest training stage's output the pipeline has (grpo, sft, sparse, warmup, pretrain; or
    # hf-checkpoint=DIR from the CLI); synthesize is read by the agentic suite only. dsaforge.eval.stage checks
    # what the chosen suites need before any of them runs.
    Stage("evaluate", "dsaforge.eval.stage:run", ("prepare-data",),
          "Evaluation suites (perplexity and long-context dense vs DSA, agentic, code, reasoning, cost) and a report.",
          optional=("pretrain", "warmup", "sparse", "sft", "grpo", "synthesize"), output="results",
          artifact="Artifact", component="dsaforge.components.eval:evaluate", gpu=True, cpu="8", memory="64G"),
]}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; available: {', '.join(STAGES)}")
    return STAGES[name]


def run_stage(name: str, cfg: Config, out_dir: Path, inputs: Optional[dict[str, Path]] = None,
              tracker: Optional[Tracker] = None) -> dict:
    stage = get_stage(name)
    inputs = inputs or {}
    missing = [i for i in stage.inputs if i not in inputs]
    if missing:
        raise ConfigError(f"stage {name!r} needs the output of {', '.join(missing)} (pass --input NAME=DIR)")
    for key, path in inputs.items():
        if not Path(path).exists():
            raise ConfigError(f"stage {name!r}: input {key!r} does not exist: {path}")
    # A non-empty output is refused unless it is this stage's own unfinished work (resume); see dsaforge.outputs.
    check_out_dir(Path(out_dir), name, stage.resumable)
    if stage.resumable:
        claim(Path(out_dir), name, getattr(tracker, "run_id", None))
    ctx = StageContext(cfg=cfg, out_dir=Path(out_dir), inputs={k: Path(v) for k, v in inputs.items()},
                       tracker=tracker or NullTracker())
    return stage.load()(ctx)
