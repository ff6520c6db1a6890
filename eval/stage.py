"""The evaluate stage: the paper's claims measured on one checkpoint, suite by suite (`eval.suites`).

    dsaforge stage evaluate --preset tiny --input prepare-data=DATA --input sparse=SPARSE --input synthesize=TASKS \
        --out EVAL                                     # CPU: lm, long-context, agentic, code, reasoning
    1 GPU: the same command; add `--set eval.suites=[efficiency]` for throughput and cost (GPU only)
    (KFP: the evaluate component, last in the end-to-end pipeline)

Inputs: prepare-data (tokenizer, held-out rows, haystack text), a model stage's output (`grpo`, `sft`, `sparse`,
`warmup`, `pretrain`, or `hf-checkpoint=DIR`; the newest wins), and synthesize (held-out agentic tasks; only the
agentic suite reads it).
Output directory: `<suite>/results.parquet` + `<suite>/summary.json` per suite, `summary.json` for all of them,
and `report/index.html` with its PNG plots. Metrics go to MLflow as `eval/<suite>/<name>`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dsaforge.config import ConfigError
from dsaforge.eval import report
from dsaforge.eval.checkpoint import load_for_eval
from dsaforge.eval.results import SuiteResult
from dsaforge.outputs import staged_dir


def _lm(ctx, em) -> SuiteResult:
    from dsaforge.eval import lm
    return lm.run(em, ctx.cfg, ctx.inputs["prepare-data"])


def _long_context(ctx, em) -> SuiteResult:
    from dsaforge.eval import longctx
    return longctx.run(em, ctx.cfg, ctx.inputs["prepare-data"])


def _code(ctx, em) -> SuiteResult:
    from dsaforge.eval import code
    from dsaforge.eval.generate import make_generator
    return code.run(ctx.cfg, make_generator(em, ctx.cfg, desc="eval code (generate)"))


def _reasoning(ctx, em) -> SuiteResult:
    from dsaforge.eval import reasoning
    from dsaforge.eval.generate import make_generator
    return reasoning.run(ctx.cfg, make_generator(em, ctx.cfg, desc="eval reasoning (generate)"))


def _agentic(ctx, em) -> SuiteResult:
    from dsaforge.eval import agentic
    return agentic.run(em, ctx.cfg, ctx.inputs["synthesize"])


def _efficiency(ctx, em) -> SuiteResult:
    from dsaforge.eval import efficiency
    return efficiency.run(em.model, ctx.cfg)


SUITES = {"lm": _lm, "long-context": _long_context, "agentic": _agentic, "code": _code, "reasoning": _reasoning,
          "efficiency": _efficiency}


def check_inputs(cfg, inputs: dict) -> None:
    """Fail before any work when a chosen suite cannot run here."""
    suites = cfg.eval.suites
    if not suites:
        raise ConfigError("eval.suites is empty; choose from " + ", ".join(SUITES))
    if "agentic" in suites and "synthesize" not in inputs:
        raise ConfigError("the agentic suite needs the synthesize output (--input synthesize=DIR), or drop it from "
                          "eval.suites")
    if "agentic" in suites:
        from dsaforge.eval.agentic import heldout_tasks
        heldout_tasks(inputs["synthesize"], 1)
    if "efficiency" in suites and not torch.cuda.is_available():
        raise ConfigError("the efficiency suite measures GPU throughput and cost and needs a CUDA device; drop it "
                          "from eval.suites on this machine")


def run(ctx) -> dict:
    cfg, tracker = ctx.cfg, ctx.tracker
    check_inputs(cfg, ctx.inputs)
    tracker.log_params({f"eval.{k}": v for k, v in cfg.eval.model_dump().items()})
    em, source = load_for_eval(cfg, ctx.inputs)
    if em.device.type == "cpu" and em.cfg.dim < 1024:
        # A small model's matmuls are too small to split across threads, and on a busy machine the threads' spinning
        # costs more than it gains: 16 prompts x 32 tokens of the tiny model took 1.2 s on one thread and 23 s on
        # two, on 2 cores shared with other jobs.
        torch.set_num_threads(1)
    tracker.set_tags({"dsaforge.eval.checkpoint": source})
    overall: dict = {"checkpoint": source, "device": str(em.device), "suites": {}}
    flat: dict = {}
    # Built aside and published whole (dsaforge.outputs); each suite's metrics and files reach MLflow as it ends,
    # so a later suite's failure loses none of them.
    with staged_dir(Path(ctx.out_dir)) as out:
        for suite in cfg.eval.suites:
            t0 = time.time()
            result = SUITES[suite](ctx, em)
            result.summary["seconds"] = round(time.time() - t0, 2)
            result.write(out)
            tracker.log_metrics(result.metrics())
            tracker.log_artifacts(out / suite, f"eval/{suite}")
            overall["suites"][suite] = result.summary
            flat.update({f"{suite}/{k}": v for k, v in result.summary.items() if _headline(k)})
        (out / "summary.json").write_text(json.dumps(overall, indent=2, default=str) + "\n")
        tracker.log_artifact(out / "summary.json", "eval")
        histories = _histories(tracker, cfg.eval.report_metrics)
        rep = report.build(out, histories, title=f"dsaforge evaluation: {source}",
                           about={"checkpoint": source, "device": str(em.device), "preset": cfg.preset,
                                  "top_k": em.cfg.index_topk, "max_seq_len": em.cfg.max_seq_len})
        tracker.log_artifacts(rep, "eval/report")
    return {"checkpoint": source, **flat}


def _headline(key: str) -> bool:
    return key.endswith(("/loss", "accuracy", "pass_at_1", "mean_score", "usd_per_mtok")) and key.count("/") <= 1


def _histories(tracker, names: list[str]) -> dict:
    uri, run_id = getattr(tracker, "uri", None), getattr(tracker, "run_id", None)
    if not (uri and run_id and names):
        return {}
    from dsaforge.tracking_query import metric_histories
    return metric_histories(uri, run_id, names)
