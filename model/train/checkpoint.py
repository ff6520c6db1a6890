"""Sharded, atomic training checkpoints (torch.distributed.checkpoint) and the consolidated end-of-stage export.

Layout under a stage's `checkpoints/`:
  step-00000050/            complete checkpoint (a directory only gets this name once everything is on disk)
    .metadata, __*_*.distcp DCP shards: model + optimizer tensors, each rank writes its own
    trainer-rank00000.pt    per-rank trainer state: step, RNG states, data position, last metrics
    meta.json               written last, before the rename: step, world layout, wall time
  step-00000100.tmp-<id>/   in progress (or left by a crash): never loaded, removed by the next save

Sharding: a tensor whose key is the same on every rank is replicated and DCP stores it once; tensor- or
expert-parallel shards get rank-specific keys (`tp1/...`, `ep0/...` from `shard_tag`), and under torchrun
megatron's distributed optimizer keeps each rank's slice of the AdamW state under `rank<r>/optim/...`, so every
shard is saved exactly once and a resumed run with the same layout reads back exactly what it wrote. Changing the
layout goes through the stage's consolidated HF export (`hf/`), which every next stage starts from.
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
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state for every parameter so a checkpoint can be loaded into it in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                 shard_tag: Callable[[str, torch.Tensor], str]) -> dict[str, torch.Tensor]:
    """Flat name -> tensor dict (live references, so DCP loads in place) of the model and optimizer. An optimizer
    that shards its own state (megatron's distributed optimizer, through the bridge) lists its tensors itself."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        out[f"{shard_tag(name, t)}model/{name}"] = t.data if isinstance(t, nn.Parameter) else t
    if not isinstance(optimizer, torch.optim.Optimizer):
        out.update(optimizer.tensors(_rank()))
        return out
    ensure_optimizer_state(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            tag = shard_tag(name, p)
            for k, v in optimizer.state[p].items():
                out[f"{tag}optim/{name}/{k}"] = v
    return out


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


def save(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
         shard_tag: Callable[[str, torch.Tensor], str], keep_last: int, layout: dict) -> Path:
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
        dcp.save(tensor_state(model, optimizer, shard_tag), checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer-rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"step": step, "time": time.time(), **layout}
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


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         shard_tag: Callable[[str, torch.Tensor], str], layout: dict) -> dict:
    """Load a checkpoint written with the same parallel layout in place; returns the trainer state (RNG restored)."""
    meta = json.loads((path / "meta.json").read_text())
    saved = {k: meta.get(k) for k in layout}
    if saved != layout:
        raise ValueError(f"{path} was written with parallel layout {saved}, this run uses {layout}; resume with the "
                         "same layout, or start a new stage from the stage's hf/ export")
    state = tensor_state(model, optimizer, shard_tag)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    trainer = torch.load(path / f"trainer-rank{_rank():05d}.pt", weights_only=False)
    set_rng_state(trainer.pop("rng"))
    return trainer
