"""Where each rank's tensors sit in the whole model, and building a rank's shard without the whole model.

    model = build_sharded(cfg, par, bridge, device, init_from=None)    # meta -> parallelize -> this rank's shard
    view = shard_view(model, par)        # local name -> Piece(global name, global shape, region of it)

The model is built on the meta device, the bridge shards it there (TP slices, EP experts, PP stages), and only
then does each tensor get storage, holding nothing but this rank's piece of it. Its values come from one of:

- `init_region`: the model's initialisation as a function of (seed, parameter name, element index). Values are
  drawn per 256x256 tile (1-D tensors: per 65,536 elements), each tile from its own generator seeded by a hash of
  (seed, name, tile), so a rank draws only the tiles its piece overlaps and every layout gets the same full
  weights from the same seed, the single device included;
- `dsaforge.model.train.hf_shards`: the piece's slice of an HF checkpoint, read memory-mapped (FP8 dequantised
  per slice).

The same view names every piece in checkpoints (`dsaforge.model.train.reshard`), so a checkpoint written under
one layout loads under another.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from dsaforge.config import Config
from dsaforge.model.layers import RMSNorm
from dsaforge.model.moe import Gate
from dsaforge.model.transformer import Transformer

TILE = 256
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Piece:
    """A rank's part of one tensor of the whole model: `region` (one slice per dim) of `name`, shaped `shape`."""
    name: str
    shape: tuple[int, ...]
    region: tuple[slice, ...]

    @property
    def whole(self) -> bool:
        return all(s.start == 0 and s.stop == n for s, n in zip(self.region, self.shape))

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.region)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.region)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent state (parameters and persistent buffers) by local name, as live tensors."""
    keys = set(model.state_dict(keep_vars=True).keys())
    found = dict(model.named_buffers())
    found.update(dict(model.named_parameters()))
    return {k: v for k, v in found.items() if k in keys}


def shard_view(model: nn.Module, par=None) -> dict[str, Piece]:
    """Local state-dict name -> its Piece of the whole model, from the marks the bridge leaves on sharded tensors
    (`dsaforge_shard` 'tp<r>/' with `dsaforge_partition_dim`, or 'ep<r>/'). Pipeline stages keep global block
    names, so they need no translation. par: the bridge's Parallel (None: one device)."""
    view = {}
    n_local = model.cfg.n_routed_experts // par.ep if par is not None else 0
    for name, t in state_tensors(model).items():
        tag = getattr(t, "dsaforge_shard", "")
        shape, region = list(t.shape), [slice(0, n) for n in t.shape]
        if tag.startswith("tp"):
            dim, n = t.dsaforge_partition_dim, t.shape[t.dsaforge_partition_dim]
            shape[dim] = n * par.tp
            region[dim] = slice(par.tp_rank * n, (par.tp_rank + 1) * n)
        elif tag.startswith("ep"):
            local = int(_EXPERT.search(name).group(1))
            name_global = _EXPERT.sub(f".experts.{par.ep_rank * n_local + local}.", name, count=1)
            view[name] = Piece(name_global, tuple(shape), tuple(region))
            continue
        view[name] = Piece(name, tuple(shape), tuple(region))
    return view


# ---------------------------------------------------------------- initialisation as a function of the element

def init_rules(model: Transformer) -> dict[str, tuple[str, float]]:
    """Global name -> ("normal", std) | ("ones", 0) | ("zeros", 0): the Transformer's own initialisation
    (`Transformer._init_weights` and the modules' constructors), read off an unsharded (meta) model."""
    std = model.cfg.init_std
    rules = {}
    for prefix, m in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            rules[p + "weight"] = ("normal", std)
            if getattr(m, "bias", None) is not None:
                rules[p + "bias"] = ("zeros", 0.0)
        elif isinstance(m, Gate):
            rules[p + "weight"] = ("normal", std)
            rules[p + "bias"] = ("zeros", 0.0)
        elif isinstance(m, nn.LayerNorm):
            rules[p + "weight"], rules[p + "bias"] = ("ones", 0.0), ("zeros", 0.0)
        elif isinstance(m, RMSNorm):
            rules[p + "weight"] = ("ones", 0.0)
    missing = sorted(set(model.state_dict().keys()) - set(rules))
    if missing:
        raise ValueError(f"no initialisation rule for {', '.join(missing[:5])}: add its module type to init_rules")
    return rules


def _tile_generator(seed: int, name: str, tile: tuple[int, ...]) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}/{tile}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def init_region(seed: int, piece: Piece, rule: tuple[str, float]) -> torch.Tensor:
    """The values of `piece` (fp32, on CPU) under `rule`: the same numbers whichever layout asks, since each
    256x256 tile of a matrix (65,536-element block of a vector) is drawn from its own (seed, name, tile) generator
    and a piece draws exactly the tiles it overlaps."""
    kind, std = rule
    if kind == "ones":
        return torch.ones(piece.sizes)
    if kind == "zeros":
        return torch.zeros(piece.sizes)
    if len(piece.shape) == 1:
        tiles, shape = (TILE * TILE,), piece.shape
    elif len(piece.shape) == 2:
        tiles, shape = (TILE, TILE), piece.shape
    else:
        raise ValueError(f"{piece.name}: no tiling for a {len(piece.shape)}-d tensor")
    out = torch.empty(piece.sizes)
    ranges = [range(s.start // t, -(-s.stop // t)) for s, t in zip(piece.region, tiles)]
    for tile in itertools.product(*ranges):
        lo = [i * t for i, t in zip(tile, tiles)]
        hi = [min((i + 1) * t, n) for i, t, n in zip(tile, tiles, shape)]
        values = torch.randn([h - lo_ for lo_, h in zip(lo, hi)], generator=_tile_generator(seed, piece.name, tile))
        src = tuple(slice(max(s.start, a) - a, min(s.stop, b) - a) for s, a, b in zip(piece.region, lo, hi))
        dst = tuple(slice(max(s.start, a) - s.start, min(s.stop, b) - s.start) for s, a, b in zip(piece.region, lo, hi))
        out[dst] = values[src]
    return out.mul_(std)


# ---------------------------------------------------------------- giving a meta model storage, piece by piece

def materialize(model: nn.Module, view: dict[str, Piece], device: torch.device,
                values: Callable[[str, Piece, torch.Tensor], torch.Tensor]) -> None:
    """Give every meta parameter and buffer of `model` storage on `device`, one tensor at a time:
    `values(local name, piece, meta tensor)` returns its CPU values (host memory peaks at one piece). Non-persistent
    buffers (router loads) start at zero. Parameters keep their attributes (the bridge's shard marks)."""
    for prefix, m in model.named_modules():
        p = f"{prefix}." if prefix else ""
        for key, t in list(m._parameters.items()):
            if t is None or not t.is_meta:
                continue
            new = torch.empty(t.shape, dtype=t.dtype, device=device)
            new.copy_(values(p + key, view[p + key], t))
            param = nn.Parameter(new, requires_grad=t.requires_grad)
            param.__dict__.update(t.__dict__)
            m._parameters[key] = param
        for key, t in list(m._buffers.items()):
            if t is None or not t.is_meta:
                continue
            new = torch.zeros(t.shape, dtype=t.dtype, device=device)
            if p + key in view:
                new.copy_(values(p + key, view[p + key], t))
            m._buffers[key] = new


def build_sharded(cfg: Config, par=None, bridge=None, device: torch.device = torch.device("cpu"),
                  init_from: Optional[Path] = None, seed: Optional[int] = None) -> Transformer:
    """This rank's shard of the model, on `device`: built on the meta device, sharded there by the bridge (when
    given, with `par`), then materialised piece by piece from `init_from` (an HF checkpoint, each rank reading only
    its slices) or from the seeded initialisation (`init_region`; seed defaults to cfg.train.seed). No rank ever
    holds more than its shard plus one piece."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    rules = init_rules(model) if init_from is None else None
    if bridge is not None and par is not None:
        with torch.device("meta"):
            bridge.parallelize(model, par)
    view = shard_view(model, par)
    if init_from is not None:
        from dsaforge.model.train.hf_shards import HFShards
        with HFShards(Path(init_from), cfg.model) as ckpt:
            materialize(model, view, device, ckpt.values)
    else:
        seed = cfg.train.seed if seed is None else seed
        materialize(model, view, device, lambda name, piece, t: init_region(seed, piece, rules[piece.name]))
    return model
