"""Offline task synthesis: build environments per agent class, run every candidate through the gates in worker
processes, split by environment, and write the Parquet manifest plus the environment bundles.

    from dsaforge.synth.generate import synthesize
    summary = synthesize(cfg.synth, out_dir, data_dir=None)      # CPU only; `workers` processes

Layout of `out_dir`: tasks.parquet (the manifest), envs/<env_id>/ (bundles), search/corpus.jsonl (the search
tool's corpus), swe_instances.jsonl (SWE-smith-style records of the kept code tasks), trajectories.parquet (each
task's reference solution replayed through its episode's tools), summary.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dsaforge.config import SynthConfig
from dsaforge.synth.gates import BaselineSolver, Solver, validate_env
from dsaforge.synth.registry import agent_class
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.search.corpus import build_corpus
from dsaforge.synth.task import GENERATOR_VERSION, Task, write_manifest
from dsaforge.synth.trajectory import write_reference_trajectories


class SynthesisError(RuntimeError):
    """An agent class could not produce any valid task; the message says which gates rejected what."""


def _check_requirements(classes: list[str]) -> None:
    import importlib.util

    if "code_interpreter" in classes:
        missing = [m for m in ("jupyter_client", "ipykernel") if importlib.util.find_spec(m) is None]
        if missing:
            raise SynthesisError(f"the code_interpreter agent class needs {' and '.join(missing)} "
                                 "(pip install jupyter-client ipykernel), or drop it from synth.agent_classes")


@dataclass
class ClassResult:
    agent_class: str
    tasks: list[Task] = field(default_factory=list)
    envs_built: int = 0
    candidates: int = 0
    validated: int = 0            # tasks that passed every gate, before trimming to tasks_per_class
    rejected: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    wall_s: float = 0.0

    @property
    def per_minute(self) -> float:
        return 60.0 * self.validated / self.wall_s if self.wall_s > 0 else 0.0

    def stats(self) -> dict:
        return {"tasks": len(self.tasks), "envs": len({t.env_id for t in self.tasks}), "envs_built": self.envs_built,
                "candidates": self.candidates, "validated": self.validated,
                "gate_pass_rate": round(self.validated / max(self.candidates, 1), 4),
                "rejected": dict(sorted(self.rejected.items())), "wall_s": round(self.wall_s, 2),
                "tasks_per_min": round(self.per_minute, 2),
                "mean_pass_at_k": round(sum(t.pass_c / max(t.pass_k, 1) for t in self.tasks) / max(len(self.tasks), 1), 4)}


def env_seed(seed: int, cls: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{cls}/{index}".encode()).digest()[:6], "big")


def heldout(env_id: str, seed: int, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"holdout/{seed}/{env_id}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


# Worker state: one sandbox and solver per process, set by the pool initializer.
_W: dict = {}


def _init_worker(sandbox_cfg, hide, solver) -> None:
    _W["sandbox"] = Sandbox(sandbox_cfg, hide=hide)
    _W["solver"] = solver or BaselineSolver()


def _build_one(job: dict) -> dict:
    cls = agent_class(job["cls"])
    env_dir = Path(job["env_dir"])
    t0 = time.monotonic()
    resources = dict(job["resources"], sandbox=_W["sandbox"])
    try:
        draft = cls.build_env(job["env_id"], job["family"], job["seed"], job["max_difficulty"], env_dir, resources)
        report = validate_env(cls, draft, _W["sandbox"], _W["solver"], job["pass_k"], job["seed"])
        err = None
    except Exception as e:   # one broken environment must not stop a large run; it is counted and reported
        report, err = None, f"{type(e).__name__}: {e}"[:500]
    if report is None or not report.kept:
        shutil.rmtree(env_dir, ignore_errors=True)
    return {"tasks": [t.row() for t in report.kept] if report else [], "candidates": report.candidates if report else 0,
            "rejected": report.rejected if report else {"build_error": 1}, "error": err,
            "seconds": time.monotonic() - t0}


def _plan(cfg: SynthConfig, cls_name: str, start: int, count: int, out_dir: Path, resources: dict) -> list[dict]:
    cls = agent_class(cls_name)
    families = list(cls.families) + sorted(resources.get("llm_families", {})) if cls_name == "general" else list(cls.families)
    jobs = []
    for i in range(start, start + count):
        family = families[i % len(families)]
        env_id = f"{cls_name.replace('_', '')}-{family.replace('_', '').replace(':', '')}-{i:05d}"
        jobs.append({"cls": cls_name, "family": family, "env_id": env_id, "env_dir": str(out_dir / "envs" / env_id),
                     "seed": env_seed(cfg.seed, cls_name, i), "max_difficulty": cfg.max_difficulty,
                     "pass_k": cfg.pass_k, "resources": resources})
    return jobs


def _select(tasks: list[Task], n: int) -> list[Task]:
    """Keep n tasks, spread over difficulties and environments (round-robin by difficulty, then env order)."""
    by_level: dict[int, list[Task]] = {}
    for t in sorted(tasks, key=lambda t: (t.env_id, t.task_id)):
        by_level.setdefault(t.difficulty, []).append(t)
    out: list[Task] = []
    while len(out) < n and any(by_level.values()):
        for level in sorted(by_level):
            if by_level[level] and len(out) < n:
                out.append(by_level[level].pop(0))
    return out


def _resources(cfg: SynthConfig, cls_name: str, out_dir: Path, n_tasks: int, n_envs: int,
               llm_families: dict[str, str]) -> dict:
    per_env = max(1, math.ceil(n_tasks / (n_envs * cfg.max_difficulty)))
    return {"tasks_per_level": per_env, "corpus": str(out_dir / "search" / "corpus.jsonl"),
            "llm_families": llm_families if cls_name == "general" else {}}


def synthesize(cfg: SynthConfig, out_dir: Path, data_dir: Optional[Path] = None, solver: Optional[Solver] = None,
               on_progress: Optional[Callable[[str, int, int], None]] = None, max_rounds: int = 4,
               llm_family_count: int = 3, targets: Optional[dict[str, tuple[int, int]]] = None,
               prebuilt: Optional[dict[str, dict[int, dict]]] = None) -> dict:
    """`targets` overrides (tasks, envs) per agent class, e.g. for the paper's mix (search-heavy); by default
    every class gets cfg.tasks_per_class tasks over cfg.envs_per_class environments. `prebuilt` holds results of
    environments built elsewhere (by shards, see `merge_shards`), per class by environment index: the plan is
    the same, only those builds are skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "envs").mkdir(exist_ok=True)
    # Probe the sandbox and the classes' requirements up front, so a missing piece fails before any work.
    Sandbox(cfg.sandbox)
    _check_requirements(list(cfg.agent_classes))
    corpus_info = None
    if "search" in cfg.agent_classes:
        corpus_info = build_corpus(out_dir / "search" / "corpus.jsonl", data_dir, limit=cfg.corpus_documents)
    llm_families: dict[str, str] = {}
    if cfg.llm_endpoint and "general" in cfg.agent_classes:
        from dsaforge.synth.llm import write_families

        llm_families = write_families(cfg.llm_endpoint, out_dir, count=llm_family_count, model=cfg.llm_model)
    results: dict[str, ClassResult] = {}
    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    t_all = time.monotonic()
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg.sandbox, [str(out_dir.resolve())], solver)) as pool:
        for cls_name in cfg.agent_classes:
            res = ClassResult(cls_name)
            t0 = time.monotonic()
            n_tasks, n_envs = (targets or {}).get(cls_name, (cfg.tasks_per_class, cfg.envs_per_class))
            resources = _resources(cfg, cls_name, out_dir, n_tasks, n_envs, llm_families)
            kept_rows: list[dict] = []
            start, count = 0, n_envs
            # Gates reject some candidates; top up with fresh environments until the target is met.
            for _ in range(max_rounds):
                jobs = _plan(cfg, cls_name, start, count, out_dir, resources)
                have = (prebuilt or {}).get(cls_name, {})
                todo = [job for k, job in enumerate(jobs) if start + k not in have]
                chunk = max(1, len(todo) // (cfg.workers * 8))
                built = iter(pool.map(_build_one, todo, chunksize=chunk) if todo else ())
                for k in range(len(jobs)):
                    r = have[start + k] if start + k in have else next(built)
                    kept_rows += r["tasks"]
                    res.candidates += r["candidates"]
                    res.envs_built += 1
                    for g, n in r["rejected"].items():
                        res.rejected[g] = res.rejected.get(g, 0) + n
                    if r["error"] and not res.first_error:
                        res.first_error = r["error"]
                    if on_progress:
                        on_progress(cls_name, len(kept_rows), n_tasks)
                start += count
                missing = n_tasks - len(kept_rows)
                if missing <= 0:
                    break
                rate = len(kept_rows) / max(start, 1)
                count = max(1, math.ceil(1.3 * missing / max(rate, 0.5)))
            res.validated = len(kept_rows)
            if n_tasks > 0 and not kept_rows:
                raise SynthesisError(f"agent class {cls_name!r}: no task passed its gates out of {res.candidates} "
                                     f"candidates in {res.envs_built} environments (rejected: {res.rejected}"
                                     + (f"; first build error: {res.first_error}" if res.first_error else "") + ")")
            tasks = [_task(r, out_dir) for r in kept_rows]
            res.tasks = _select(tasks, n_tasks)
            res.wall_s = time.monotonic() - t0
            results[cls_name] = res
    all_tasks = [t for r in results.values() for t in r.tasks]
    _split(all_tasks, cfg)
    _prune(out_dir, all_tasks)
    write_manifest(all_tasks, out_dir / "tasks.parquet")
    _write_swe_instances(out_dir, all_tasks)
    # Reference trajectories: each reference solution replayed through its episode's tools (real tool outputs).
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        trajectories = write_reference_trajectories(
            all_tasks, out_dir / "trajectories.parquet", Sandbox(cfg.sandbox, hide=[str(out_dir.resolve())]),
            map_fn=lambda f, *its: pool.map(f, *its, chunksize=max(1, len(all_tasks) // (cfg.workers * 8))))
    summary = {
        "generator_version": GENERATOR_VERSION, "tasks": len(all_tasks),
        "envs": len({t.env_id for t in all_tasks}), "heldout_tasks": sum(t.split == "heldout" for t in all_tasks),
        "heldout_envs": len({t.env_id for t in all_tasks if t.split == "heldout"}),
        "wall_s": round(time.monotonic() - t_all, 2), "workers": cfg.workers,
        "tasks_per_min": round(60 * len(all_tasks) / max(time.monotonic() - t_all, 1e-9), 2),
        "classes": {k: v.stats() for k, v in results.items()}, "corpus": corpus_info,
        "sandbox": cfg.sandbox.backend, "solver": (solver or BaselineSolver()).name, "pass_k": cfg.pass_k,
        "llm_families": sorted(llm_families), "trajectories": trajectories,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _task(row: dict, root: Path) -> Task:
    r = dict(row)
    r["tools"] = json.loads(r["tools"]) if isinstance(r["tools"], str) else r["tools"]
    r["gates"] = json.loads(r["gates"]) if isinstance(r["gates"], str) else r["gates"]
    return Task(**r, root=root)


def _split(tasks: list[Task], cfg: SynthConfig) -> None:
    """Held out by environment, so no evaluation task shares a database, repository or fact set with training.
    Each class with at least two environments holds out at least one when holdout_fraction > 0."""
    by_cls: dict[str, list[str]] = {}
    for t in tasks:
        by_cls.setdefault(t.agent_class, [])
        if t.env_id not in by_cls[t.agent_class]:
            by_cls[t.agent_class].append(t.env_id)
    held: set[str] = set()
    for envs in by_cls.values():
        chosen = {e for e in envs if heldout(e, cfg.seed, cfg.holdout_fraction)}
        if cfg.holdout_fraction > 0 and not chosen and len(envs) >= 2:
            chosen = {min(envs, key=lambda e: hashlib.sha256(f"{cfg.seed}/{e}".encode()).hexdigest())}
        if len(chosen) == len(envs) and len(envs) >= 2:
            chosen.discard(sorted(chosen)[0])
        held |= chosen
    for t in tasks:
        t.split = "heldout" if t.env_id in held else "train"


def _prune(out_dir: Path, tasks: list[Task]) -> None:
    """Remove bundles of environments none of whose tasks made the final selection."""
    keep = {t.env_id for t in tasks}
    for d in (out_dir / "envs").iterdir():
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _write_swe_instances(out_dir: Path, tasks: list[Task]) -> None:
    with open(out_dir / "swe_instances.jsonl", "w") as f:
        for t in tasks:
            if t.agent_class == "code":
                inst = json.loads((t.env_dir / "hidden" / "tasks.json").read_text())[t.key]["instance"]
                f.write(json.dumps(dict(inst, task_id=t.task_id, split=t.split), sort_keys=True) + "\n")


# ---- fan-out: the first round of every class split into shards that run as parallel pipeline tasks ----------

SHARD_FILE = "shard.json"


def _digest(cfg: SynthConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def synthesize_shard(cfg: SynthConfig, out_dir: Path, shard: int, shards: int, data_dir: Optional[Path] = None,
                     solver: Optional[Solver] = None, targets: Optional[dict[str, tuple[int, int]]] = None) -> dict:
    """Build shard `shard` of `shards`: the environments whose index is `shard` modulo `shards`, for every class,
    over the first round and `synth.shard_overbuild` more (what the top-up rounds most likely ask for, so the merge
    rarely builds anything). Writes their bundles under out_dir/envs and the per-environment results to
    out_dir/shard.json. The merge (`merge_shards`) replays `synthesize`'s plan over them, so the outcome is the
    unsharded one, task for task; builds the plan never asks for are dropped."""
    if not 0 <= shard < shards:
        raise SynthesisError(f"shard {shard} is not in 0..{shards - 1}")
    if cfg.llm_endpoint:
        raise SynthesisError("synth.shards > 1 cannot be combined with synth.llm_endpoint (every shard would ask "
                             "the LLM for different families); use one shard")
    out_dir = Path(out_dir)
    (out_dir / "envs").mkdir(parents=True, exist_ok=True)
    Sandbox(cfg.sandbox)
    _check_requirements(list(cfg.agent_classes))
    if "search" in cfg.agent_classes:
        build_corpus(out_dir / "search" / "corpus.jsonl", data_dir, limit=cfg.corpus_documents)
    results: dict[str, list[dict]] = {}
    t0 = time.monotonic()
    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg.sandbox, [str(out_dir.resolve())], solver)) as pool:
        for cls_name in cfg.agent_classes:
            n_tasks, n_envs = (targets or {}).get(cls_name, (cfg.tasks_per_class, cfg.envs_per_class))
            planned = math.ceil(n_envs * (1 + cfg.shard_overbuild))
            jobs = _plan(cfg, cls_name, 0, planned, out_dir, _resources(cfg, cls_name, out_dir, n_tasks, n_envs, {}))
            mine = [(i, job) for i, job in enumerate(jobs) if i % shards == shard]
            built = pool.map(_build_one, [job for _, job in mine], chunksize=max(1, len(mine) // (cfg.workers * 8)))
            results[cls_name] = [dict(r, index=i) for (i, _), r in zip(mine, built)]
    meta = {"shard": shard, "shards": shards, "generator_version": GENERATOR_VERSION, "config": _digest(cfg),
            "targets": {k: list(v) for k, v in sorted((targets or {}).items())},
            "wall_s": round(time.monotonic() - t0, 2),
            "results": results}
    tmp = out_dir / (SHARD_FILE + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out_dir / SHARD_FILE)         # a shard without shard.json never finished
    return {"shard": shard, "shards": shards, "envs": sum(len(r) for r in results.values()),
            "validated": sum(len(x["tasks"]) for r in results.values() for x in r), "wall_s": meta["wall_s"]}


def merge_shards(cfg: SynthConfig, shard_dirs: list[Path], out_dir: Path, data_dir: Optional[Path] = None,
                 solver: Optional[Solver] = None, on_progress: Optional[Callable[[str, int, int], None]] = None,
                 targets: Optional[dict[str, tuple[int, int]]] = None) -> dict:
    """Check that the shards are one complete set made from this config, then finish the synthesis from their
    first round (top-up rounds, selection, split, manifest) in a side directory and publish it by one rename."""
    metas = []
    for d in shard_dirs:
        path = Path(d) / SHARD_FILE
        if not path.is_file():
            raise SynthesisError(f"shard directory {d} has no {SHARD_FILE} (that shard did not finish)")
        metas.append(json.loads(path.read_text()))
    shards = {m["shards"] for m in metas}
    ids = sorted(m["shard"] for m in metas)
    if len(shards) != 1 or ids != list(range(next(iter(shards)))):
        raise SynthesisError(f"incomplete or mixed shard set: shards {ids} of {sorted(shards)}")
    for m in metas:
        if m["config"] != _digest(cfg) or m["generator_version"] != GENERATOR_VERSION:
            raise SynthesisError(f"shard {m['shard']} was made with another synth config or generator version")
        if m["targets"] != {k: list(v) for k, v in sorted((targets or {}).items())}:
            raise SynthesisError(f"shard {m['shard']} was made with other targets")
    prebuilt: dict[str, dict[int, dict]] = {}
    for cls_name in cfg.agent_classes:
        rows = {r["index"]: r for m in metas for r in m["results"].get(cls_name, [])}
        n_envs = (targets or {}).get(cls_name, (cfg.tasks_per_class, cfg.envs_per_class))[1]
        missing = [i for i in range(n_envs) if i not in rows]
        if missing:
            raise SynthesisError(f"shards lack {len(missing)} of the {n_envs} first-round {cls_name} environments")
        prebuilt[cls_name] = rows
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "envs").mkdir(parents=True)
    for d in shard_dirs:
        for env in sorted((Path(d) / "envs").iterdir()):
            shutil.copytree(env, partial / "envs" / env.name)
    summary = synthesize(cfg, partial, data_dir, solver, on_progress, targets=targets, prebuilt=prebuilt)
    summary["shards"] = len(metas)
    summary["shard_envs_built"] = sum(len(r) for r in prebuilt.values())
    summary["shard_wall_s"] = max(m["wall_s"] for m in metas)
    (partial / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if out_dir.exists():
        if any(out_dir.iterdir()):
            raise SynthesisError(f"{out_dir} is not empty; the merged tasks were left in {partial}")
        out_dir.rmdir()
    os.replace(partial, out_dir)
    return summary
