"""Hugging Face checkpoint interop: a directory that transformers' DeepseekV32ForCausalLM, vLLM and SGLang load.

    export_hf(model, "ckpt/")          # config.json (model_type deepseek_v32) + safetensors with DeepSeek's names
    model = import_hf("ckpt/")

Tensor names are those of DeepSeek's published checkpoint (one tensor per routed expert; the MTP module as layer
n_layers + d, with its own copies of the embedding and head). Fields HF has no name for (FP8/Hadamard
simulation, balancing settings) ride along under config.json's "dsaforge" key.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from dsaforge.config.model import ModelConfig
from dsaforge.model.hf_config import (UnsupportedCheckpoint, from_hf_config, noted_settings, to_hf_config,
                                     unexpressed_settings)
from dsaforge.model.moe import MoE
from dsaforge.model.transformer import Transformer

__all__ = ["UnsupportedCheckpoint", "check_run_config", "export_hf", "from_hf_config", "hf_name", "import_hf",
           "to_hf_config"]

# ModelConfig fields a run may set differently from the checkpoint it starts from, on purpose: context extension
# (rope), the indexer's selection and numerics, the MTP depth being trained, training-only settings.
MAY_DIFFER = {"max_seq_len", "rope_type", "original_seq_len", "rope_theta", "rope_factor", "beta_fast", "beta_slow",
              "yarn_truncate", "mscale", "rope_attention_factor", "index_topk", "index_fp8", "index_hadamard",
              "seq_aux_loss_alpha", "bias_update_speed", "init_std"}

# our module path -> DeepSeek on-disk name, applied to the text after "layers.{i}." / "mtp.{d}.block."
_LAYER_RULES = [
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^attn\.wq_a\.", "self_attn.q_a_proj."),
    (r"^attn\.q_norm\.", "self_attn.q_a_layernorm."),
    (r"^attn\.wq_b\.", "self_attn.q_b_proj."),
    (r"^attn\.wkv_a\.", "self_attn.kv_a_proj_with_mqa."),
    (r"^attn\.kv_norm\.", "self_attn.kv_a_layernorm."),
    (r"^attn\.wkv_b\.", "self_attn.kv_b_proj."),
    (r"^attn\.wo\.", "self_attn.o_proj."),
    (r"^attn\.indexer\.", "self_attn.indexer."),          # wq_b, wk, k_norm, weights_proj keep their names
    (r"^ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^ffn\.gate\.weight$", "mlp.gate.weight"),
    (r"^ffn\.", "mlp."),
]
_FFN_RULES = [(r"\.w1\.", ".gate_proj."), (r"\.w3\.", ".up_proj."), (r"\.w2\.", ".down_proj.")]
_MTP_RULES = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "norm.": "shared_head.norm."}


def _layer_name(rest: str) -> str:
    for pat, rep in _LAYER_RULES:
        if re.match(pat, rest):
            rest = re.sub(pat, rep, rest, count=1)
            break
    if rest.startswith("mlp."):
        for pat, rep in _FFN_RULES:
            rest = re.sub(pat, rep, rest)
    return rest


def hf_name(name: str, n_layers: int) -> str:
    """Our state-dict key -> DeepSeek's on-disk key."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    if m := re.match(r"^layers\.(\d+)\.(.*)$", name):
        return f"model.layers.{m[1]}.{_layer_name(m[2])}"
    if m := re.match(r"^mtp\.(\d+)\.(.*)$", name):
        prefix, rest = f"model.layers.{n_layers + int(m[1])}.", m[2]
        if rest.startswith("block."):
            return prefix + _layer_name(rest[len("block."):])
        for ours, theirs in _MTP_RULES.items():
            if rest.startswith(ours):
                return prefix + theirs + rest[len(ours):]
    raise KeyError(f"no DeepSeek checkpoint name for parameter {name!r}")


def model_card(cfg, hf_cfg: dict) -> str:
    """README.md of an export: what the checkpoint is, and every setting transformers does not compute."""
    lines = ["---", "library_name: transformers", "tags: [deepseek_v32, dsaforge]", "---", "",
             "# DeepSeek-V3.2-architecture checkpoint (dsaforge export)", "",
             f"{cfg.n_layers} layers, hidden {cfg.dim}, {cfg.n_routed_experts} routed experts "
             f"({cfg.n_activated_experts} active), lightning indexer {cfg.index_n_heads}x{cfg.index_head_dim} "
             f"with top-k {cfg.index_topk}, RoPE: {cfg.applied_rope_type}. Loads as "
             "`transformers.DeepseekV32ForCausalLM`; the full dsaforge model config is config.json's `dsaforge` key.",
             ""]
    unexpressed = unexpressed_settings(cfg)
    lines += ["## Settings transformers does not compute", ""]
    if unexpressed:
        lines += ["These change what the model computes; transformers' DeepseekV32ForCausalLM runs without them:", ""]
        lines += [f"- `{k}={getattr(cfg, k)!r}`: {v}" for k, v in unexpressed.items()]
    else:
        lines += ["None: transformers computes this model's logits as dsaforge does."]
    noted = noted_settings(cfg)
    if noted:
        lines += ["", "Also carried, without effect on transformers' logits:", ""]
        lines += [f"- `{k}`: {v}" for k, v in noted.items()]
    return "\n".join(lines) + "\n"


def export_metadata(cfg: ModelConfig, out: Path, dtype: torch.dtype, stacklevel: int = 2) -> None:
    """An export's config.json and README.md (model card); warns when the model uses a setting transformers cannot
    express (the card names it too). The tensors are written by `export_hf`, or shard by shard by
    `dsaforge.model.train.reshard.export_hf_sharded`."""
    hf_cfg = to_hf_config(cfg)
    for name, what in unexpressed_settings(cfg).items():
        warnings.warn(f"HF export {name}={getattr(cfg, name)!r}: {what}", stacklevel=stacklevel)
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, hf_cfg))


def export_hf(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json, README.md (model card) and safetensors (sharded with model.safetensors.index.json when
    large). Warns when the model uses a setting transformers cannot express (the card names it too)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    export_metadata(cfg, out, model.embed.weight.dtype, stacklevel=3)
    tensors = {hf_name(k, cfg.n_layers): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for d in range(len(model.mtp)):   # the MTP module carries its own copies of the shared embedding and head
        prefix = f"model.layers.{cfg.n_layers + d}."
        tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = tensors[k], size + n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


FP8_BLOCK = 128


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DeepSeek's FP8 weight (e4m3 [out, in]) times its 128x128 block scales (`weight_scale_inv`, fp32
    [ceil(out/128), ceil(in/128)]) -> `dtype`, computed in fp32."""
    out_f, in_f = weight.shape
    want = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise UnsupportedCheckpoint(f"FP8 weight {tuple(weight.shape)} needs block scales of shape {want}, "
                                    f"got {tuple(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)


def _read_tensors(path: Path, fp8_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read one at a time (memory-mapped); FP8 weights with a `weight_scale_inv`
    are dequantised to `fp8_dtype` as they are read, so no FP8 copy and no fp32 copy of the model is ever held."""
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    handles = {f: safe_open(str(path / f), "pt") for f in files}
    where = {k: f for f, h in handles.items() for k in h.keys()}
    tensors = {}
    for key, f in where.items():
        if key.endswith(".weight_scale_inv"):
            continue
        t = handles[f].get_tensor(key)
        scale_key = key + "_scale_inv"
        if t.dtype == torch.float8_e4m3fn:
            if scale_key not in where:
                raise UnsupportedCheckpoint(f"{path}: FP8 tensor {key} has no {scale_key}")
            t = dequantize_fp8(t, handles[where[scale_key]].get_tensor(scale_key), fp8_dtype)
        elif scale_key in where:
            raise UnsupportedCheckpoint(f"{path}: {scale_key} scales {key}, which is {t.dtype}, not float8_e4m3fn")
        tensors[key] = t
    return tensors


def _split_fused_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Accept transformers' fused expert layout ([E, 2I, D] gate_up_proj, [E, D, I] down_proj) as well."""
    for key in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gate_up, down = tensors.pop(key), tensors.pop(prefix + "down_proj")
        gate, up = gate_up.chunk(2, dim=1)
        for e in range(gate_up.shape[0]):
            tensors[f"{prefix}{e}.gate_proj.weight"] = gate[e]
            tensors[f"{prefix}{e}.up_proj.weight"] = up[e]
            tensors[f"{prefix}{e}.down_proj.weight"] = down[e]


def _names_list(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _take_copies(tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor], hf_cfg: dict, n_layers: int,
                 n_mtp: int, path: Path) -> None:
    """Tensors the checkpoint stores but dsaforge shares: a tied head (transformers' tie_word_embeddings) and the
    MTP module's copies of the embedding and head (DeepSeek's layout). Each copy must equal what it stands for."""
    if hf_cfg.get("tie_word_embeddings", False):
        # transformers ties lm_head to the embedding and ignores a stored lm_head.weight
        head = tensors.pop("lm_head.weight", None)
        state["head.weight"] = state["embed.weight"].clone()
        if head is not None and not torch.equal(head, state["embed.weight"]):
            raise UnsupportedCheckpoint(f"{path}: tie_word_embeddings=True but lm_head.weight differs from "
                                        "model.embed_tokens.weight (transformers would use the embedding)")
        warnings.warn(f"{path}: tie_word_embeddings=True: the output head is imported as a copy of the embedding "
                      "(dsaforge keeps them untied, so training updates them separately)", stacklevel=3)
    for d in range(n_mtp):
        prefix = f"model.layers.{n_layers + d}."
        for copy, shared in (("embed_tokens.weight", "embed.weight"), ("shared_head.head.weight", "head.weight")):
            t = tensors.pop(prefix + copy, None)
            if t is not None and not torch.equal(t, state[shared]):
                raise UnsupportedCheckpoint(f"{path}: {prefix + copy} differs from the main model's "
                                            f"{hf_name(shared, n_layers)}; dsaforge's MTP module shares them")


def import_hf(path: str | Path, dtype: Optional[torch.dtype] = None, device=None) -> Transformer:
    """Build a Transformer from an exported, DeepSeek- or transformers-saved directory (DeepSeek's FP8 block-scaled
    weights are dequantised on load, to `dtype` or bf16). Settings
    dsaforge does not compute as transformers does, and checkpoint tensors missing or left unused, are errors
    that name them (`UnsupportedCheckpoint`, a ConfigError)."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = from_hf_config(hf_cfg)
    tensors = _read_tensors(path, dtype or torch.bfloat16)
    _split_fused_experts(tensors)
    with torch.device("meta"):
        model = Transformer(cfg)
    state, missing = {}, []
    tied = hf_cfg.get("tie_word_embeddings", False)
    for name, want in model.state_dict().items():
        key = hf_name(name, cfg.n_layers)
        if name == "head.weight" and tied:
            continue                                   # _take_copies gives it the embedding
        if key in tensors:
            state[name] = tensors.pop(key)
            if state[name].shape != want.shape:
                raise UnsupportedCheckpoint(f"{path}: tensor {key} has shape {tuple(state[name].shape)}; config.json "
                                            f"implies {tuple(want.shape)}")
        else:
            missing.append(key)
    if missing:
        raise UnsupportedCheckpoint(f"{path}: missing tensor(s) {_names_list(missing)}")
    _take_copies(tensors, state, hf_cfg, cfg.n_layers, cfg.n_mtp_layers, path)
    # zero-size tensors carry nothing (transformers' n_shared_experts=0 stores [0, dim] shared-expert weights)
    unused = sorted(k for k, t in tensors.items() if t.numel())
    if unused:
        raise UnsupportedCheckpoint(f"{path}: tensor(s) the model does not use: {_names_list(unused)} "
                                    f"({len(unused)} in all)")
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():   # non-persistent buffers are not in the checkpoint: give them storage
        if isinstance(m, MoE):
            m.expert_load = torch.zeros(m.n_experts)
    return model.to(device=device or "cpu", dtype=dtype or state["embed.weight"].dtype)


def check_run_config(run: ModelConfig, checkpoint: ModelConfig, path: str | Path) -> None:
    """A run that starts from a checkpoint computes with its own `model` section: refuse (naming the fields) where it
    would compute a different architecture than the checkpoint's config.json, and warn where it deliberately may
    (`MAY_DIFFER`: context extension, indexer settings, training settings)."""
    diff = {k: (getattr(run, k), getattr(checkpoint, k)) for k in type(run).model_fields
            if getattr(run, k) != getattr(checkpoint, k)}
    hard = {k: v for k, v in diff.items() if k not in MAY_DIFFER}
    if hard:
        raise UnsupportedCheckpoint(f"{path}: the run's model section differs from the checkpoint's config.json: "
                                    + ", ".join(f"model.{k}={a!r} vs {b!r}" for k, (a, b) in sorted(hard.items())))
    if diff:
        warnings.warn(f"{path}: continuing with the run's "
                      + ", ".join(f"model.{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in sorted(diff.items())),
                      stacklevel=2)
