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
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from dsaforge.config.model import ModelConfig
from dsaforge.model.moe import MoE
from dsaforge.model.transformer import Transformer

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


def to_hf_config(cfg: ModelConfig) -> dict:
    """config.json in DeepSeek's published layout (which transformers reads, and vLLM/SGLang expect)."""
    if cfg.score_func != "sigmoid":
        raise ValueError("DeepSeek-V3.2 checkpoints (and transformers' DeepseekV32) route with sigmoid scores; "
                         f"score_func={cfg.score_func!r} cannot be exported")
    if cfg.n_mtp_layers > 1:
        raise ValueError("DeepSeek's checkpoint layout holds one MTP module (num_nextn_predict_layers <= 1)")
    out = {
        "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "initializer_range": cfg.init_std, "rope_theta": cfg.rope_theta,
        "bos_token_id": 0, "eos_token_id": 1,
        "dsaforge": cfg.model_dump(),
    }
    if cfg.max_seq_len > cfg.original_seq_len:   # the reference applies YaRN only past the original length
        out["rope_scaling"] = {
            "type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
        }
        if cfg.mscale == 0:   # keep HF from inventing a cos/sin magnitude the reference does not have
            out["rope_scaling"]["attention_factor"] = 1.0
    return out


def from_hf_config(d: dict) -> ModelConfig:
    """ModelConfig from a DeepSeek-V3.2 config.json (ours or DeepSeek's)."""
    if d.get("model_type") != "deepseek_v32":
        raise ValueError(f"expected model_type 'deepseek_v32', got {d.get('model_type')!r}")
    base = dict(d.get("dsaforge") or {})
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    fields = dict(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], inter_dim=d["intermediate_size"],
        moe_inter_dim=d["moe_intermediate_size"], n_layers=d["num_hidden_layers"],
        n_dense_layers=d.get("first_k_dense_replace", 3), n_heads=d["num_attention_heads"],
        norm_eps=d.get("rms_norm_eps", 1e-6), max_seq_len=d["max_position_embeddings"],
        n_routed_experts=d["n_routed_experts"], n_shared_experts=d.get("n_shared_experts", 1),
        n_activated_experts=d["num_experts_per_tok"], n_expert_groups=d.get("n_group", 1),
        n_limited_groups=d.get("topk_group", 1), route_scale=d.get("routed_scaling_factor", 1.0),
        q_lora_rank=d["q_lora_rank"], kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], index_n_heads=d["index_n_heads"],
        index_head_dim=d["index_head_dim"], index_topk=d["index_topk"],
        n_mtp_layers=d.get("num_nextn_predict_layers", 0),
        rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
    )
    if rope.get("type", rope.get("rope_type")) == "yarn":
        fields.update(rope_factor=rope["factor"], original_seq_len=rope["original_max_position_embeddings"],
                      beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                      mscale=rope.get("mscale_all_dim", rope.get("mscale", 1.0)))
    else:   # no YaRN: make the original length cover every position, so none is applied
        fields.update(original_seq_len=d["max_position_embeddings"])
    base.update(fields)
    return ModelConfig.model_validate(base)


def export_hf(model: Transformer, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors (sharded with model.safetensors.index.json when large)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_cfg = to_hf_config(cfg)
    tensors = {hf_name(k, cfg.n_layers): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for d in range(len(model.mtp)):   # the MTP module carries its own copies of the shared embedding and head
        prefix = f"model.layers.{cfg.n_layers + d}."
        tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
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


def import_hf(path: str | Path, dtype: Optional[torch.dtype] = None, device=None) -> Transformer:
    """Build a Transformer from an exported (or DeepSeek/transformers-saved, unquantised) directory."""
    path = Path(path)
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    tensors = _read_tensors(path)
    if any(k.endswith("weight_scale_inv") for k in tensors):
        raise ValueError(f"{path} holds an FP8-quantised checkpoint (weight_scale_inv); dequantise it to bf16 first")
    _split_fused_experts(tensors)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {}
    for name in model.state_dict():
        key = hf_name(name, cfg.n_layers)
        if key not in tensors:
            raise KeyError(f"{path}: missing tensor {key!r} (for {name})")
        state[name] = tensors[key]
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():   # non-persistent buffers are not in the checkpoint: give them storage
        if isinstance(m, MoE):
            m.expert_load = torch.zeros(m.n_experts)
    return model.to(device=device or "cpu", dtype=dtype or state["embed.weight"].dtype)
