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
from dsaforge.tracking import NullTracker, Tracker


@dataclass
class StageContext:
    cfg: Config
    out_dir: Path                                   # this stage's output directory (a KFP output artifact's path)
    inputs: dict[str, Path] = field(default_factory=dict)   # upstream stages' outputs, by stage name
    tracker: Tracker = field(default_factory=NullTracker)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str                                     # "module:function", the function takes a StageContext
    inputs: tuple[str, ...]                         # names of the stages whose outputs it reads
    help: str

    def load(self) -> Callable[[StageContext], dict]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("prepare-data", "dsaforge.data.prepare:run", (),
          "Ingest a corpus, dedup, train the BPE tokenizer, pack token sequences into Parquet shards."),
    Stage("pretrain", "dsaforge.model.train.stages:pretrain", ("prepare-data",),
          "Dense MLA+MoE language-model pretraining (from scratch, or continued from an HF checkpoint)."),
    Stage("warmup", "dsaforge.model.train.stages:warmup", ("prepare-data", "pretrain"),
          "Dense warm-up: everything frozen but the lightning indexer, trained on its KL to the attention."),
    Stage("sparse", "dsaforge.model.train.stages:sparse", ("prepare-data", "warmup"),
          "Sparse adaptation: top-k attention, all parameters, LM loss + indexer KL on the selected set."),
    Stage("synthesize", "dsaforge.synth.stage:run", (),
          "Agentic task synthesis: environments, tools, tasks and verifiers that pass every validation gate."),
    # The model input is any training stage's output (sparse, warmup, pretrain, rl) or hf-checkpoint=DIR; the
    # synthesize output is read by the agentic suite only. dsaforge.eval.stage checks what the chosen suites need.
    Stage("evaluate", "dsaforge.eval.stage:run", ("prepare-data",),
          "Evaluation suites (perplexity, long-context dense vs DSA, agentic, code, reasoning, cost) and a report."),
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
    ctx = StageContext(cfg=cfg, out_dir=Path(out_dir), inputs={k: Path(v) for k, v in inputs.items()},
                       tracker=tracker or NullTracker())
    return stage.load()(ctx)
