"""config.json <-> ModelConfig for transformers' `DeepseekV32Config` and DeepSeek's published layout.

Every field transformers' DeepseekV32Config has is in exactly one of three tables below: mapped onto a
ModelConfig field (`MAPPED`), known not to change what the model computes (`NO_EFFECT`, with the reason), or
accepted only at values dsaforge computes the same way (`checked in from_hf_config`, listed in `CHECKED`).
Anything else is refused with a one-line error naming the field, its value and what dsaforge supports, so an
import never computes a different model silently. `tests/model/test_hf_fields.py` walks every field of the
installed transformers' config against these tables and against `DeepseekV32ForCausalLM`.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable

from pydantic import ValidationError

from dsaforge.config.base import ConfigError
from dsaforge.config.model import ModelConfig


class UnsupportedCheckpoint(ConfigError):
    """A checkpoint setting or tensor dsaforge would not compute the way transformers does; the message names it."""


# transformers' DeepseekV32Config defaults (5.x), used for keys a config.json leaves out. The field walk checks
# this table against the installed transformers.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "output_router_logits": False, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "norm_topk_prob": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
    "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "rope_parameters": None, "mlp_layer_types": None, "attention_bias": False, "attention_dropout": 0.0,
    "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64, "mlp_bias": False, "head_dim": 64,
    "first_k_dense_replace": 3, "layer_types": None,
    # PreTrainedConfig's own fields
    "transformers_version": None, "architectures": None, "output_hidden_states": False, "return_dict": True,
    "dtype": None, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "id2label": None, "label2id": None,
    "problem_type": None,
}

# HF field -> ModelConfig field: the value carries over unchanged.
MAPPED: dict[str, str] = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "num_experts_per_tok": "n_activated_experts", "n_group": "n_expert_groups",
    "topk_group": "n_limited_groups", "routed_scaling_factor": "route_scale", "norm_topk_prob": "norm_topk_prob",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "attention_bias": "attention_bias",
    "initializer_range": "init_std",
}

# Fields that do not change the function transformers computes from a checkpoint (why, in a few words).
NO_EFFECT: dict[str, str] = {
    "output_router_logits": "an output switch", "use_cache": "an inference switch",
    "output_hidden_states": "an output switch", "return_dict": "an output switch",
    "chunk_size_feed_forward": "not read by DeepseekV32", "is_encoder_decoder": "not read by DeepseekV32",
    "id2label": "classification heads only", "label2id": "classification heads only",
    "problem_type": "classification heads only", "transformers_version": "metadata", "architectures": "metadata",
    "dtype": "the tensors' dtype is read from the checkpoint", "pad_token_id": "only the embedding's init/gradient",
    "bos_token_id": "the tokenizer's business", "eos_token_id": "the tokenizer's business",
    "mlp_bias": "not read by DeepseekV32's MLP", "head_dim": "recomputed from qk_rope_head_dim by transformers",
    "attention_dropout": "active only in training (dsaforge trains without attention dropout)",
}

# Fields accepted only at the values dsaforge computes identically (the checks are in from_hf_config).
CHECKED = {
    "num_key_value_heads": "equal to num_attention_heads (MLA expands keys per head)",
    "hidden_act": "'silu' (SwiGLU experts)",
    "tie_word_embeddings": "true or false (tied: the head is imported as a copy of the embedding)",
    "mlp_layer_types": "the first k layers 'dense', the rest 'sparse'",
    "layer_types": "'indexed_attention' for every layer (DSA)",
    "first_k_dense_replace": "any k (used when mlp_layer_types is absent)",
    "rope_parameters": "rope_type default, linear or yarn",
}

# Keys of DeepSeek's published config.json (and transformers' legacy names) that are not DeepseekV32Config fields.
DEEPSEEK_KEYS = {
    "model_type", "rope_scaling", "rope_theta", "torch_dtype", "qk_head_dim", "scoring_func", "topk_method",
    "moe_layer_freq", "num_nextn_predict_layers", "ep_size", "auto_map", "quantization_config", "_name_or_path",
    "partial_rotary_factor", "original_max_position_embeddings", "dsaforge",
}

ROPE_TYPES = ("default", "linear", "yarn")


def _refuse(field: str, value: Any, supported: str) -> UnsupportedCheckpoint:
    return UnsupportedCheckpoint(f"config.json {field}={value!r} is not supported: dsaforge supports {supported}")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(d: dict) -> dict:
    """The rope parameters as transformers standardises them: `rope_scaling` before `rope_parameters`, top-level
    rope_theta / partial_rotary_factor / original_max_position_embeddings folded in, `type` read as `rope_type`."""
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in d:
        rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in d:     # transformers gives a top-level value priority
            rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings",
                                                                      HF_DEFAULTS["max_position_embeddings"]))
    return rope


def _rope_fields(rope: dict) -> dict:
    """ModelConfig's rope fields computing what transformers computes for these rope parameters."""
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise _refuse("rope_parameters.rope_type", kind, "rope types " + ", ".join(ROPE_TYPES))
    prf = rope.get("partial_rotary_factor")
    if prf is not None and prf != 1.0:
        raise _refuse("rope_parameters.partial_rotary_factor", prf, "1.0 (MLA rotates the whole rope slice)")
    theta = rope["rope_theta"]
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise _refuse("rope_parameters.rope_theta", theta, "a positive number")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out | {"rope_type": "default"}
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise _refuse("rope_parameters.factor", factor, "a factor >= 1")
    if kind == "linear":
        # transformers would still fold mscale_all_dim into the softmax scale for any non-default rope type
        if rope.get("mscale_all_dim"):
            raise _refuse("rope_parameters.mscale_all_dim", rope["mscale_all_dim"], "mscale only with rope_type yarn")
        return out | {"rope_type": "linear", "rope_factor": float(factor)}

    original = rope["original_max_position_embeddings"]
    if not isinstance(original, int) or original <= 0:
        raise _refuse("rope_parameters.original_max_position_embeddings", original, "a positive integer")
    betas = {}
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        v = rope.get(key) or default                   # transformers: `or`, so 0 and null take the default
        if not isinstance(v, (int, float)) or v != int(v) or v <= 0:
            raise _refuse(f"rope_parameters.{key}", rope.get(key), "a positive whole number")
        betas[key] = int(v)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim is not None and mscale_all_dim < 0:
        raise _refuse("rope_parameters.mscale_all_dim", mscale_all_dim, "mscale_all_dim >= 0")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:                      # transformers' `_compute_yarn_parameters`
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    if not isinstance(attention_factor, (int, float)) or attention_factor <= 0:
        raise _refuse("rope_parameters.attention_factor", attention_factor, "a positive number")
    return out | dict(rope_type="yarn", rope_factor=float(factor), original_seq_len=original, **betas,
                      yarn_truncate=bool(rope.get("truncate", True)), mscale=float(mscale_all_dim or 0.0),
                      rope_attention_factor=float(attention_factor))


def _dense_layers(d: dict, n_layers: int) -> int:
    """n_dense_layers as transformers derives it: from mlp_layer_types when given, else first_k_dense_replace."""
    types = d.get("mlp_layer_types")
    if types is None:
        return min(d.get("first_k_dense_replace", HF_DEFAULTS["first_k_dense_replace"]), n_layers)
    types = list(types)[:n_layers]
    k = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    if len(types) < n_layers or types != ["dense"] * k + ["sparse"] * (n_layers - k):
        raise _refuse("mlp_layer_types", d["mlp_layer_types"], CHECKED["mlp_layer_types"])
    return k


def _check_deepseek_keys(d: dict) -> None:
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "scoring_func": (lambda v: v == "sigmoid", "'sigmoid' (DeepSeek-V3.2's router)"),
        "topk_method": (lambda v: v == "noaux_tc", "'noaux_tc' (group-limited top-k with the correction bias)"),
        "moe_layer_freq": (lambda v: v == 1, "1 (every layer past first_k_dense_replace is MoE)"),
        "hidden_act": (lambda v: v in ("silu", "swish"), CHECKED["hidden_act"]),
        "quantization_config": (lambda v: v is None or (
            v.get("quant_method") == "fp8" and v.get("fmt", "e4m3") == "e4m3"
            and list(v.get("weight_block_size", [128, 128])) == [128, 128]),
            "unquantised or DeepSeek's FP8 (quant_method fp8, fmt e4m3, weight_block_size [128, 128])"),
    }
    for key, (ok, supported) in checks.items():
        if key in d and not ok(d[key]):
            raise _refuse(key, d[key], supported)
    heads = d.get("num_attention_heads", HF_DEFAULTS["num_attention_heads"])
    kv_heads = d.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise _refuse("num_key_value_heads", kv_heads, f"num_key_value_heads == num_attention_heads ({heads})")
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t != "indexed_attention" for t in layer_types):
        raise _refuse("layer_types", layer_types, CHECKED["layer_types"])
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _refuse("tie_word_embeddings", tie, CHECKED["tie_word_embeddings"])


def from_hf_config(d: dict) -> ModelConfig:
    """ModelConfig from a DeepSeek-V3.2 config.json (ours, DeepSeek's or transformers' save_pretrained)."""
    if d.get("model_type") != "deepseek_v32":
        raise ConfigError(f"expected model_type 'deepseek_v32', got {d.get('model_type')!r}")
    unknown = sorted(set(d) - set(HF_DEFAULTS) - DEEPSEEK_KEYS)
    if unknown:
        warnings.warn(f"config.json keys neither DeepseekV32Config nor DeepSeek's layout has, ignored as "
                      f"transformers ignores them: {', '.join(unknown)}", stacklevel=2)
    _check_deepseek_keys(d)
    if d.get("attention_dropout"):
        warnings.warn(f"config.json attention_dropout={d['attention_dropout']}: dsaforge trains without attention "
                      "dropout (inference is unaffected)", stacklevel=2)
    base = dict(d.get("dsaforge") or {})
    fields = {ours: d.get(hf, HF_DEFAULTS[hf]) for hf, ours in MAPPED.items()}
    fields["n_dense_layers"] = _dense_layers(d, fields["n_layers"])
    fields["n_mtp_layers"] = d.get("num_nextn_predict_layers", 0)
    fields["score_func"] = "sigmoid"
    fields.update(_rope_fields(rope_parameters(d)))
    # "auto" (DeepSeek's rule: YaRN only past original_seq_len) computes the same as the explicit type whenever
    # the lengths agree; keep it then, so our own exports round-trip exactly
    if base.get("rope_type", "auto") == "auto":
        original = fields.get("original_seq_len", base.get("original_seq_len", ModelConfig().original_seq_len))
        if fields["rope_type"] == ("yarn" if fields["max_seq_len"] > original else "default"):
            fields["rope_type"] = "auto"
    base.update(fields)
    try:
        return ModelConfig.model_validate(base)
    except ValidationError as e:
        err = e.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")
        for hf, o in MAPPED.items():       # speak in config.json's names
            msg = re.sub(rf"\b{o}\b", hf, msg)
        if ours is None:
            raise UnsupportedCheckpoint(f"config.json describes a model dsaforge cannot build: {msg}") from None
        hf = next((h for h, o in MAPPED.items() if o == ours), ours)
        raise _refuse(hf, err.get("input"), f"values where {msg}") from None


def to_hf_config(cfg: ModelConfig) -> dict:
    """config.json in DeepSeek's published layout (which transformers reads, and vLLM/SGLang expect), written from
    what the model computes: every setting transformers can express is written out, none is assumed."""
    if cfg.score_func != "sigmoid":
        raise ValueError("DeepSeek-V3.2 checkpoints (and transformers' DeepseekV32) route with sigmoid scores; "
                         f"score_func={cfg.score_func!r} cannot be exported")
    if cfg.n_mtp_layers > 1:
        raise ValueError(f"n_mtp_layers={cfg.n_mtp_layers} cannot be exported: DeepSeek's checkpoint layout holds one "
                         "MTP module (num_nextn_predict_layers <= 1)")
    out: dict[str, Any] = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
    out.update({hf: getattr(cfg, ours) for hf, ours in MAPPED.items()})
    out.update({
        "first_k_dense_replace": cfg.n_dense_layers, "num_key_value_heads": cfg.n_heads, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "moe_layer_freq": 1, "num_nextn_predict_layers": cfg.n_mtp_layers,
        "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": cfg.rope_theta,
        "bos_token_id": 0, "eos_token_id": 1,
    })
    rope = cfg.applied_rope_type
    if rope == "linear":
        out["rope_scaling"] = {"type": "linear", "factor": cfg.rope_factor}
    elif rope == "yarn":
        # mscale == mscale_all_dim (DeepSeek's published form) with the cos/sin magnitude written out explicitly
        out["rope_scaling"] = {
            "type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale,
            "attention_factor": cfg.rope_attention_factor, "truncate": cfg.yarn_truncate,
        }
    out["dsaforge"] = cfg.model_dump()
    return out


def unexpressed_settings(cfg: ModelConfig) -> dict[str, str]:
    """Settings of `cfg` that transformers' DeepseekV32ForCausalLM does not compute, with what it does instead.
    The export names them in its model card and warns about those that change the logits."""
    out = {}
    if cfg.index_fp8:
        out["index_fp8"] = ("the lightning indexer's q/k are FP8 e4m3 block-quantised (simulated) before scoring; "
                            "transformers scores in full precision, so it can select different keys")
    return out


def noted_settings(cfg: ModelConfig) -> dict[str, str]:
    """Settings transformers does not run but that leave its logits unchanged."""
    out = {}
    if cfg.index_hadamard and not cfg.index_fp8:
        out["index_hadamard"] = "an orthonormal rotation of indexer q/k: scores equal up to rounding"
    if cfg.n_mtp_layers:
        out["n_mtp_layers"] = (f"the MTP module (layer {cfg.n_layers}) is stored in DeepSeek's layout; transformers "
                               "does not load or run it")
    for name in ("seq_aux_loss_alpha", "bias_update_speed"):
        out[name] = f"{getattr(cfg, name)}: a training setting (config.json's dsaforge key)"
    return out
