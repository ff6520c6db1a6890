"""The synthesize stage: agentic task synthesis for SFT, RL and evaluation.

    dsaforge stage synthesize --preset tiny --input prepare-data=DIR     # CPU; bubblewrap required
    (KFP: the synthesize component calls run(ctx) in a CPU pod; GPU not used)

Writes the Parquet manifest, environment bundles and summary into ctx.out_dir and logs counts, gate pass rates,
throughput and sample tasks to MLflow.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from dsaforge.outputs import staged_dir
from dsaforge.progress import Progress
from dsaforge.synth.generate import merge_shards, synthesize
from dsaforge.synth.task import load_tasks


def run(ctx) -> dict:
    cfg = ctx.cfg.synth
    data_dir = ctx.inputs.get("prepare-data")
    ctx.tracker.log_params({f"synth.{k}": v for k, v in cfg.model_dump().items() if k != "sandbox"}
                           | {f"synth.sandbox.{k}": v for k, v in cfg.sandbox.model_dump().items()})
    total = sum(cfg.targets.get(c, (cfg.tasks_per_class, 0))[0] for c in cfg.agent_classes)
    done: dict[str, int] = {}
    # Built in a temporary sibling and renamed into place: a kill never leaves a manifest pointing at bundles that
    # are gone, and the stage never writes into someone else's directory.
    with Progress("synthesize", total=total, unit="task") as bar, staged_dir(ctx.out_dir) as build:
        def progress(cls: str, kept: int, target: int) -> None:
            new = min(kept, target)
            bar.update(new - done.get(cls, 0), cls=cls)
            done[cls] = new

        solver = None
        if cfg.solver == "chat":
            from dsaforge.synth.llm import ChatSolver

            solver = ChatSolver(cfg.solver_endpoint, cfg.llm_model)
        shard_dirs = [Path(p) for k, p in sorted(ctx.inputs.items()) if k.startswith("shard-")]
        if shard_dirs:       # fanned out (synth.shards > 1): finish from the shards' first round
            summary = merge_shards(cfg, shard_dirs, build, data_dir=Path(data_dir) if data_dir else None,
                                   solver=solver, on_progress=progress, targets=dict(cfg.targets))
        else:
            summary = synthesize(cfg, build, data_dir=Path(data_dir) if data_dir else None, solver=solver,
                                 on_progress=progress, llm_family_count=cfg.llm_families, targets=dict(cfg.targets))
    metrics = {"tasks": summary["tasks"], "envs": summary["envs"], "heldout_tasks": summary["heldout_tasks"],
               "tasks_per_min": summary["tasks_per_min"], "wall_s": summary["wall_s"]}
    for cls, s in summary["classes"].items():
        for k in ("tasks", "envs", "candidates", "validated", "gate_pass_rate", "tasks_per_min", "mean_pass_at_k"):
            metrics[f"{cls}.{k}"] = s[k]
    for cls, s in (summary.get("trajectories") or {}).items():
        metrics[f"{cls}.reference_trajectories_passed"] = s["passed"] / max(s["trajectories"], 1)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_dict(summary, "synth/summary.json")
    tasks = load_tasks(ctx.out_dir)
    samples = {}
    for t in tasks:   # one sample per class and difficulty, prompts as a reader would see them
        samples.setdefault(f"{t.agent_class}/d{t.difficulty}", {"task_id": t.task_id, "family": t.family,
                                                              "prompt": t.prompt, "tools": [f["function"]["name"] for f in t.tools],
                                                              "gates": t.gates, "pass@k": f"{t.pass_c}/{t.pass_k}"})
    ctx.tracker.log_dict(samples, "synth/samples.json")
    manifest = ctx.out_dir / "tasks.parquet"
    ctx.tracker.log_artifact(manifest, "synth")
    if (ctx.out_dir / "trajectories.parquet").exists():
        ctx.tracker.log_artifact(ctx.out_dir / "trajectories.parquet", "synth")
    ctx.tracker.log_dataset("synth-tasks", str(manifest), hashlib.sha256(manifest.read_bytes()).hexdigest()[:16],
                            context="training")
    ctx.tracker.set_tags({"synth.generator_version": summary["generator_version"], "synth.sandbox": summary["sandbox"]})
    return {k: summary[k] for k in ("tasks", "envs", "heldout_tasks", "heldout_envs", "tasks_per_min", "wall_s")} | {
        "per_class": {c: {k: s[k] for k in ("tasks", "gate_pass_rate", "tasks_per_min")} for c, s in summary["classes"].items()}}
