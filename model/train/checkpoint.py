"""Sharded, atomic, layout-independent training checkpoints (torch.distributed.checkpoint).

Layout under a stage's `checkpoints/`:
  step-00000050/            complete checkpoint (a directory only gets this name once everything is on disk)
    .metadata, __*_*.distcp DCP shards: model + optimizer tensors, each rank writes its own pieces
    trainer-rank00000.pt    per-rank trainer state: step, RNG states, data position, last metrics
    meta.json               written last, before the rename: step, world layout that wrote it, wall time
  step-00000100.tmp-<id>/   in progress (or left by a crash): never loaded, removed by the next save

Every tensor is stored under its name in the whole model with its global shape, each rank contributing the
pieces it owns (`dsaforge.model.train.reshard`): replicas once, tensor-parallel slices and the distributed
optimizer's flat ranges of the AdamW moments at their global offsets. So a checkpoint resumes under any layout
(TP2xEP2 -> one device, DP2 -> DP4, PP2 -> PP1): each rank reads back exactly the elements it now owns. The trainer
state is the same on every rank except its RNG states; a rank of a different layout takes rank 0's.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from dsaforge.model.train.reshard import LoadPlanner, SavePlanner, checkpoint_state
from dsaforge.model.train.shards import Piece

STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT = 2          # 2: tensors keyed by their names in the whole model (1: rank-keyed shards)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(s: str) -> str:
    if not dist.is_initialized():
        return s
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, view: dict[str, Piece],
         keep_last: int, layout: dict) -> Path:
    """Write checkpoint `step` atomically (temporary dir, meta.json last, rename) and keep the newest `keep_last`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / _broadcast_str(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    if _rank() == 0:
        for stale in ckpt_dir.glob(f"{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with warnings.catch_warnings():   # single-process runs: DCP notes that it saves without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(checkpoint_state(model, optimizer, view), checkpoint_id=str(tmp), planner=SavePlanner())
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer-rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "time": time.time(), "format": FORMAT, **layout}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():       # a re-save of the same step (resumed run that saves again)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob("step-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, model: nn.Module, optimizer, view: dict[str, Piece], layout: dict) -> dict:
    """Load a checkpoint in place, whatever layout wrote it; returns the trainer state (RNG restored: this rank's
    own under the same layout, rank 0's otherwise)."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was written by an older dsaforge with rank-keyed shards; resume it with that "
                         "version, or start a new stage from the stage's hf/ export")
    saved = {k: meta.get(k) for k in layout}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(checkpoint_state(model, optimizer, view), checkpoint_id=str(path), planner=LoadPlanner())
    own = path / f"trainer-rank{_rank():05d}.pt"
    trainer = torch.load(own if saved == layout else path / "trainer-rank00000.pt", weights_only=False)
    set_rng_state(trainer.pop("rng"))
    return trainer
