"""Each rank reads only its slices of an HF checkpoint: the sharded counterpart of `dsaforge.model.hf.import_hf`.

    with HFShards(path, cfg.model) as ckpt:            # config and tensor names/shapes checked up front
        materialize(model, view, device, ckpt.values)    # one slice at a time, memory-mapped

Slices come from safetensors' `get_slice`, so a rank touches only the bytes of its pieces. DeepSeek's FP8 weights
(e4m3 with 128x128 `weight_scale_inv` block scales) are dequantised per slice, reading only the scale blocks the
slice covers. Values equal the matching slice of `import_hf(path)` loaded into the training model: FP8 goes to
bf16, every parameter then to the checkpoint's model dtype (its embedding's), then to the parameter's own dtype;
the router's correction bias stays fp32 throughout, as the Transformer keeps it. `bytes_read` counts what was read.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsaforge.config.model import ModelConfig
from dsaforge.model.hf import FP8_BLOCK, UnsupportedCheckpoint, check_run_config, from_hf_config, hf_name
from dsaforge.model.train.shards import Piece
from dsaforge.model.transformer import Transformer

_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_FUSED = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class HFShards:
    """An HF checkpoint directory opened for sliced reads, checked against the run's model config."""

    def __init__(self, path: Path, run: ModelConfig):
        from safetensors import safe_open
        self.path = path
        hf_cfg = json.loads((path / "config.json").read_text())
        self.cfg = from_hf_config(hf_cfg)
        check_run_config(run, self.cfg, path)
        self.tied = hf_cfg.get("tie_word_embeddings", False)
        index = path / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                 else [f.name for f in sorted(path.glob("*.safetensors"))])
        if not files:
            raise FileNotFoundError(f"no safetensors files in {path}")
        self._handles = {f: safe_open(str(path / f), "pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.bytes_read = 0
        self._check()
        emb = self._meta("model.embed_tokens.weight")[0]
        self.model_dtype = torch.bfloat16 if emb == torch.float8_e4m3fn else emb

    def __enter__(self) -> "HFShards":
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    def _meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        sl = self._handles[self._where[key]].get_slice(key)
        return _DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())

    def _locate(self, name: str) -> tuple[str, tuple, int]:
        """Our global name -> (checkpoint key, leading indices, row offset): transformers' fused expert layout
        ([E, 2I, D] gate_up_proj, [E, D, I] down_proj) is read in place as well as DeepSeek's per-expert one."""
        if name == "head.weight" and self.tied:
            return "model.embed_tokens.weight", (), 0
        key = hf_name(name, self.cfg.n_layers)
        if key in self._where:
            return key, (), 0
        if (m := _FUSED.match(key)) and (fused := m[1] + ("down_proj" if m[3] == "down_proj" else "gate_up_proj")) \
                in self._where:
            rows = self.cfg.moe_inter_dim if m[3] == "up_proj" else 0
            return fused, (int(m[2]),), rows
        raise UnsupportedCheckpoint(f"{self.path}: missing tensor {key}")

    def _check(self) -> None:
        """Every tensor the model needs is there with its shape, and nothing is left over (import_hf's checks,
        from the safetensors headers alone)."""
        with torch.device("meta"):
            model = Transformer(self.cfg)
        used, missing = set(), []
        for name, want in model.state_dict().items():
            try:
                key, lead, rows = self._locate(name)
            except UnsupportedCheckpoint:
                missing.append(hf_name(name, self.cfg.n_layers))
                continue
            used.add(key)
            shape = self._meta(key)[1]
            if lead:                                # fused experts: [E, 2I, D] gate_up_proj or [E, D, I] down_proj
                fused_rows = want.shape[0] * (2 if key.endswith("gate_up_proj") else 1)
                ok = len(shape) == 3 and shape[0] > lead[0] and shape[1:] == (fused_rows,) + tuple(want.shape[1:])
            else:
                ok = tuple(shape) == tuple(want.shape)
            if not ok:
                raise UnsupportedCheckpoint(f"{self.path}: tensor {key} has shape {shape}; config.json "
                                            f"implies {tuple(want.shape)}")
        if missing:
            raise UnsupportedCheckpoint(f"{self.path}: missing tensor(s) {_names(missing)}")
        for d in range(self.cfg.n_mtp_layers):   # DeepSeek's MTP module stores copies of the embedding and head
            used.update(f"model.layers.{self.cfg.n_layers + d}.{k}"
                        for k in ("embed_tokens.weight", "shared_head.head.weight"))
        used.update(k + "_scale_inv" for k in list(used))
        if self.tied:                            # transformers ignores a stored head when the embedding is tied
            used.add("lm_head.weight")
        unused = sorted(k for k in self._where if k not in used and 0 not in self._meta(k)[1])
        if unused:
            raise UnsupportedCheckpoint(f"{self.path}: tensor(s) the model does not use: {_names(unused)} "
                                        f"({len(unused)} in all)")

    def read(self, key: str, lead: tuple, region: tuple[slice, ...]) -> torch.Tensor:
        """`region` of tensor `key` (after the leading indices `lead`), FP8 dequantised to bf16 from the scale
        blocks the region covers."""
        sl = self._handles[self._where[key]].get_slice(key)
        t = sl[lead + region]
        self.bytes_read += t.numel() * t.element_size()
        scale_key = key + "_scale_inv"
        if t.dtype != torch.float8_e4m3fn:
            if scale_key in self._where:
                raise UnsupportedCheckpoint(f"{self.path}: {scale_key} scales {key}, which is {t.dtype}, "
                                            "not float8_e4m3fn")
            return t
        if scale_key not in self._where or len(region) != 2 or lead:
            raise UnsupportedCheckpoint(f"{self.path}: FP8 tensor {key} has no {scale_key}")
        (r0, r1), (c0, c1) = ((s.start, s.stop) for s in region)
        out_f, in_f = self._meta(key)[1]
        want = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
        if self._meta(scale_key)[1] != want:
            raise UnsupportedCheckpoint(f"FP8 weight {(out_f, in_f)} needs block scales of shape {want}, "
                                        f"got {self._meta(scale_key)[1]}")
        b0, b1 = r0 // FP8_BLOCK, c0 // FP8_BLOCK
        scales = self._handles[self._where[scale_key]].get_slice(scale_key)[
            b0:-(-r1 // FP8_BLOCK), b1:-(-c1 // FP8_BLOCK)]
        self.bytes_read += scales.numel() * scales.element_size()
        scale = scales.float().repeat_interleave(FP8_BLOCK, 0)[r0 - b0 * FP8_BLOCK:r1 - b0 * FP8_BLOCK]
        scale = scale.repeat_interleave(FP8_BLOCK, 1)[:, c0 - b1 * FP8_BLOCK:c1 - b1 * FP8_BLOCK]
        return (t.float() * scale).to(torch.bfloat16)

    def values(self, local: str, piece: Piece, target: torch.Tensor) -> torch.Tensor:
        """`materialize`'s value source: the piece's slice, through import_hf's dtype chain."""
        key, lead, rows = self._locate(piece.name)
        region = piece.region
        if rows:
            region = (slice(region[0].start + rows, region[0].stop + rows),) + region[1:]
        t = self.read(key, lead, region)
        if isinstance(target, torch.nn.Parameter):
            t = t.to(self.model_dtype)
        if piece.name == "embed.weight" or piece.name == "head.weight":
            self._check_copies(piece, t)
        return t.to(target.dtype)

    def _check_copies(self, piece: Piece, t: torch.Tensor) -> None:
        """DeepSeek's MTP module stores its own copies of the embedding and head: dsaforge shares them, so each
        copy must equal (on this piece) what it stands for."""
        copy = "embed_tokens.weight" if piece.name == "embed.weight" else "shared_head.head.weight"
        for d in range(self.cfg.n_mtp_layers):
            key = f"model.layers.{self.cfg.n_layers + d}.{copy}"
            if key in self._where and not torch.equal(self.read(key, (), piece.region).to(t.dtype), t):
                raise UnsupportedCheckpoint(f"{self.path}: {key} differs from the main model's "
                                            f"{hf_name(piece.name, self.cfg.n_layers)}; dsaforge's MTP module "
                                            "shares them")
