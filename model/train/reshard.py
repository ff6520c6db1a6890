"""Layout-independent checkpoints and the shard-by-shard HF export.

Checkpoint tensors are keyed by their names in the whole model (`model/<name>`, `optim/<name>/exp_avg`, ...) and
carry their global shape and the offsets of each rank's piece, so torch.distributed.checkpoint (DCP) stores every
element once and reads back, for any other layout, exactly the elements each rank then owns (TP2xEP2 -> one
device, DP2 -> DP4, ...):

- a model tensor whole on this rank (replicated, an expert, a pipeline stage's block) is a plain tensor: DCP keeps
  one copy of replicas;
- a tensor-parallel slice is a `Chunks` of one rectangle at its global offsets;
- megatron's distributed optimizer holds a flat range of each parameter's (TP-local) elements on each DP rank; the
  range is cut into at most three rectangles of the parameter (a partial row, whole rows, a partial row), so the
  AdamW moments are stored as whole-model tensors too, whatever the DP size that wrote them.

`export_hf_sharded` writes the end-of-stage HF checkpoint without gathering the model anywhere: every tensor is
written by one rank that holds it (a tensor-parallel one after an all-gather within its TP group, one tensor at a
time), into that rank's own safetensors files, streamed tensor by tensor; rank 0 writes config.json and the index.
"""
from __future__ import annotations

import bisect
import json
import struct
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from dsaforge.model.hf import export_metadata, hf_name
from dsaforge.model.train.shards import Piece, state_tensors


class Chunks:
    """Some rectangles (views of local storage) of a tensor of global shape `shape`: what a rank holds of it."""

    def __init__(self, shape: tuple[int, ...], parts: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.shape, self.parts = torch.Size(shape), [(torch.Size(o), t) for o, t in parts]

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, off), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=t.shape),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.shape))
                for off, t in self.parts]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=t.shape) for off, t in self.parts]

    def part(self, offset) -> torch.Tensor:
        for off, t in self.parts:
            if off == torch.Size(offset):
                return t
        raise ValueError(f"no piece at offset {tuple(offset)}")


class SavePlanner(DefaultSavePlanner):
    """DCP's planner, reading a `Chunks` entry's rectangles (the state dict is flat: no flattening pass, which
    would not carry a `Chunks` through)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.part(index.offset) if isinstance(obj, Chunks) else super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DefaultLoadPlanner's setup first passes the dict through `_init_state_dict`, which turns any value that
        # is not a tensor (a Chunks) into None; the dict is flat and already materialised, so nothing else is needed
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.part(index.offset) if isinstance(obj, Chunks) else super().lookup_tensor(index)


def _rectangles(piece: Piece, local_shape: tuple[int, ...], flat: torch.Tensor, start: int
                ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Elements [start, start + flat.numel()) of a local tensor (row-major, shaped `local_shape`, placed at
    piece.offsets in the whole tensor) as (global offsets, view of `flat`) rectangles: at most three."""
    end, base = start + flat.numel(), piece.offsets
    if len(local_shape) == 1:
        return [((base[0] + start,), flat)]
    if len(local_shape) != 2:
        raise ValueError(f"{piece.name}: no rectangles for a {len(local_shape)}-d tensor")
    cols, out, s = local_shape[1], [], start

    def add(row: int, col: int, rows: int, n: int) -> None:
        out.append(((base[0] + row, base[1] + col), flat[s - start:s - start + rows * n].view(rows, n)))

    if s % cols and s < end:
        n = min(cols - s % cols, end - s)
        add(s // cols, s % cols, 1, n)
        s += n
    if (full := (end - s) // cols):
        add(s // cols, 0, full, cols)
        s += full * cols
    if s < end:
        add(s // cols, 0, 1, end - s)
    return out


def _entry(piece: Piece, local_shape, flat: torch.Tensor, start: int):
    if start == 0 and flat.numel() == torch.Size(local_shape).numel() and piece.whole:
        return flat.view(local_shape)
    return Chunks(piece.shape, _rectangles(piece, tuple(local_shape), flat, start))


def _inner_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers that hold AdamW state: the trainer's own, or those inside megatron's (chained)
    distributed optimizer (`megatron_bridge.DataParallel`)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        yield optimizer
        return
    for opt in getattr(optimizer.optimizer, "chained_optimizers", [optimizer.optimizer]):
        yield opt.optimizer


def _owner(model: nn.Module):
    """data_ptr -> (local name, model parameter, element offset) for any tensor inside a parameter's storage:
    megatron's distributed optimizer steps flat views of the fp32 parameters it owns a range of."""
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), n, p)
                   for n, p in model.named_parameters())
    starts = [s[0] for s in spans]

    def find(t: torch.Tensor):
        i = bisect.bisect_right(starts, t.data_ptr()) - 1
        if i < 0 or t.data_ptr() + t.numel() * t.element_size() > spans[i][1] or t.dtype != spans[i][3].dtype:
            raise ValueError("an optimizer tensor is not a view of a model parameter (master weights in another "
                             "dtype): layout-independent checkpoints need fp32 parameters, as the trainer keeps")
        _, _, name, p = spans[i]
        return name, p, (t.data_ptr() - p.data_ptr()) // p.element_size()
    return find


def ensure_state(opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state for every parameter so a checkpoint can be loaded into it in place."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def checkpoint_state(model: nn.Module, optimizer, view: dict[str, Piece]) -> dict:
    """Name -> tensor or Chunks (live references, so DCP loads in place) of the model and AdamW state, keyed by
    names in the whole model."""
    out: dict = {}
    for name, t in state_tensors(model).items():
        piece = view[name]
        out[f"model/{piece.name}"] = _entry(piece, t.shape, t.data.view(-1), 0) if not piece.whole else t.data
    owner = _owner(model)
    for opt in _inner_optimizers(optimizer):
        ensure_state(opt)
        for group in opt.param_groups:
            for p in group["params"]:
                name, param, start = owner(p)
                piece = view[name]
                for k, v in opt.state[p].items():
                    key = f"optim/{piece.name}/{k}"
                    if v.dim() == 0:                # the step count: one value, the same on every rank
                        out[key] = v
                    elif key in out:
                        raise ValueError(f"two optimizer ranges of {name} on one rank")
                    else:
                        out[key] = _entry(piece, param.shape, v.view(-1), start)
    return out


def gathered_state(model: nn.Module, view: dict[str, Piece]) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, on every rank, assembled from every rank's pieces. For tests and small
    models (it holds the whole model per rank); the export and checkpoints never call it."""
    local = [(view[n].name, view[n].shape, view[n].region, t.detach().cpu()) for n, t in state_tensors(model).items()]
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, shape, region, t in part:
            if name not in out:
                out[name] = torch.empty(shape, dtype=t.dtype)
            out[name][region] = t
    return out


# ---------------------------------------------------------------- HF export, shard by shard

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class _SafetensorsStream:
    """A safetensors file whose header is written first (names, dtypes, shapes known up front) and whose tensors
    are then appended one at a time, so a rank never holds more than one of them."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape in entries:
            n = torch.Size(shape).numel() * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.order, self.f = [e[0] for e in entries], open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, t: torch.Tensor) -> None:
        if key != self.order.pop(0):
            raise RuntimeError(f"safetensors stream: {key} written out of order")
        self.f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        if not self.order:
            self.f.close()


def export_hf_sharded(model: nn.Module, view: dict[str, Piece], out: Path, tp_group=None, tp: int = 1,
                      max_file_bytes: int = 5 * 2**30) -> None:
    """Write `model` (this rank's shard; every rank calls this) as an HF checkpoint under `out` (which exists),
    in the names and layout of `dsaforge.model.hf.export_hf`. A tensor-parallel tensor is all-gathered within its
    TP group one at a time; each tensor is then written by the lowest rank holding it whole."""
    cfg = model.cfg
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = state_tensors(model)
    names = sorted(local)
    tp_rank = dist.get_rank(tp_group) if tp > 1 else 0
    # a TP slice is claimed by the group's first rank, which holds the whole tensor after the gather
    claims = sorted({view[n].name for n in names if view[n].whole or tp_rank == 0})
    all_claims = [claims]
    if world > 1:
        all_claims = [None] * world
        dist.all_gather_object(all_claims, claims)
    writer = {}
    for r in reversed(range(world)):
        writer.update({name: r for name in all_claims[r]})
    mine = [n for n in names if writer.get(view[n].name) == rank]

    def hf_keys(name: str) -> list[str]:
        keys = [hf_name(name, cfg.n_layers)]
        for d in range(cfg.n_mtp_layers):       # DeepSeek's layout: the MTP module's own embedding and head copies
            copy = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}.get(name)
            if copy:
                keys.append(f"model.layers.{cfg.n_layers + d}.{copy}")
        return keys

    files, current, size = [], [], 0
    for n in mine:
        for key in hf_keys(view[n].name):
            nbytes = torch.Size(view[n].shape).numel() * local[n].element_size()
            if current and size + nbytes > max_file_bytes:
                files.append(current)
                current, size = [], 0
            current.append((key, local[n].dtype, view[n].shape))
            size += nbytes
    if current:
        files.append(current)
    counts = [len(files)]
    if world > 1:
        counts = [None] * world
        dist.all_gather_object(counts, len(files))
    total_files, first = sum(counts), sum(counts[:rank])

    def fname(i: int) -> str:
        return "model.safetensors" if total_files == 1 else f"model-{i + 1:05d}-of-{total_files:05d}.safetensors"
    streams = {}
    for i, entries in enumerate(files):
        stream = _SafetensorsStream(out / fname(first + i), entries)
        streams.update({key: stream for key, _, _ in entries})
    for n in names:
        t, piece = local[n], view[n]
        if not piece.whole and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=tp_group)
            dim = next(d for d, s in enumerate(piece.region) if s.stop - s.start != piece.shape[d])
            t = torch.cat(parts, dim=dim)
        if writer.get(piece.name) == rank:
            for key in hf_keys(piece.name):
                streams[key].write(key, t)
    weight_map = {key: fname(first + i) for i, entries in enumerate(files) for key, _, _ in entries}
    nbytes = sum(torch.Size(shape).numel() * dtype.itemsize for entries in files for _, dtype, shape in entries)
    maps = [(weight_map, nbytes)]
    if world > 1:
        maps = [None] * world
        dist.all_gather_object(maps, (weight_map, nbytes))
    if rank == 0:
        export_metadata(cfg, out, next(model.parameters()).dtype)
        if total_files > 1:
            merged = {k: v for m, _ in maps for k, v in m.items()}
            (out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum(b for _, b in maps)}, "weight_map": dict(sorted(merged.items()))},
                indent=2) + "\n")
