"""DeepSeek-V3.2's architecture fields, named as in DeepSeek's reference `ModelArgs` (inference/config_671B_v3.2.json).

The HF `DeepseekV32Config` names differ; `dsaforge.model.hf` maps between them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsaforge.config.base import Section


class ModelConfig(Section):
    vocab_size: int = Field(129280, gt=0, description="Token vocabulary; the tokenizer is trained to this size.")
    dim: int = Field(7168, gt=0, description="Hidden size.")
    inter_dim: int = Field(18432, gt=0, description="FFN width of the dense layers.")
    moe_inter_dim: int = Field(2048, gt=0, description="FFN width of each routed and shared expert.")
    n_layers: int = Field(61, gt=0)
    n_dense_layers: int = Field(3, ge=0, description="The first layers use a dense FFN instead of MoE.")
    n_heads: int = Field(128, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    max_seq_len: int = Field(163840, gt=0, description="Longest position the RoPE tables cover.")
    # moe
    n_routed_experts: int = Field(256, ge=0)
    n_shared_experts: int = Field(1, ge=0)
    n_activated_experts: int = Field(8, ge=0)
    n_expert_groups: int = Field(8, gt=0)
    n_limited_groups: int = Field(4, gt=0)
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    route_scale: float = Field(2.5, gt=0)
    norm_topk_prob: bool = Field(True, description="Sigmoid routing: renormalise the k chosen scores to sum to 1.")
    seq_aux_loss_alpha: float = Field(0.0, ge=0, description="Sequence-wise balance loss weight (0 = off).")
    bias_update_speed: float = Field(1e-3, ge=0, description="Auxiliary-loss-free balancing: step of the correction bias.")
    # mla
    q_lora_rank: int = Field(1536, gt=0, description="Query latent width; the indexer reads this latent, so it cannot be 0.")
    kv_lora_rank: int = Field(512, gt=0)
    qk_nope_head_dim: int = Field(128, gt=0)
    qk_rope_head_dim: int = Field(64, gt=0)
    v_head_dim: int = Field(128, gt=0)
    attention_bias: bool = Field(False, description="Biases on MLA's q_a, kv_a and output projections.")
    # rope (YaRN)
    rope_type: Literal["auto", "yarn", "linear", "default"] = Field(
        "auto", description="auto: YaRN only when max_seq_len > original_seq_len (DeepSeek's reference); yarn: YaRN "
        "at every length (transformers' rope_type yarn); linear: positions divided by rope_factor; default: plain RoPE.")
    original_seq_len: int = Field(4096, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_factor: float = Field(40.0, ge=1)
    beta_fast: int = Field(32, gt=0)
    beta_slow: int = Field(1, gt=0)
    yarn_truncate: bool = Field(True, description="Round YaRN's correction range to whole dims (transformers' truncate).")
    mscale: float = Field(1.0, ge=0, description="YaRN softmax scale: qk^-1/2 * (0.1 mscale ln(rope_factor) + 1)^2 "
                          "(transformers' mscale_all_dim).")
    rope_attention_factor: float = Field(1.0, gt=0, description="YaRN's cos/sin magnitude (transformers' "
                                         "attention_factor); DeepSeek's reference leaves it at 1.")
    # index (DSA lightning indexer)
    index_n_heads: int = Field(64, gt=0)
    index_head_dim: int = Field(128, gt=0)
    index_topk: int = Field(2048, gt=0)
    index_fp8: bool = Field(False, description="Simulate DeepSeek's FP8 e4m3 block-scaled indexer path.")
    index_hadamard: bool = Field(False, description="Rotate indexer q/k by a Hadamard transform (as before FP8).")
    # mtp
    n_mtp_layers: int = Field(0, ge=0, description="Multi-token-prediction depth (V3.2 ships 1).")
    init_std: float = Field(0.006, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) exceeds n_layers ({self.n_layers})")
        if self.n_layers > self.n_dense_layers:
            if self.n_routed_experts == 0:
                raise ValueError("n_routed_experts must be > 0 when there are MoE layers (n_layers > n_dense_layers)")
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(f"n_activated_experts ({self.n_activated_experts}) must be in 1..n_routed_experts ({self.n_routed_experts})")
            if self.n_routed_experts % self.n_expert_groups:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_expert_groups ({self.n_expert_groups})")
            if self.n_limited_groups > self.n_expert_groups:
                raise ValueError(f"n_limited_groups ({self.n_limited_groups}) exceeds n_expert_groups ({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_activated_experts > self.n_limited_groups * per_group:
                raise ValueError("n_activated_experts exceeds the experts reachable in n_limited_groups groups")
            if self.n_expert_groups > 1 and self.score_func == "sigmoid" and per_group < 2:
                # Group-limited routing ranks a group by the sum of its two best biased scores.
                raise ValueError(f"each expert group needs >= 2 experts (n_routed_experts {self.n_routed_experts} / "
                                 f"n_expert_groups {self.n_expert_groups} = {per_group})")
        if self.qk_rope_head_dim % 2 or self.index_head_dim % 2:
            raise ValueError("qk_rope_head_dim and index_head_dim must be even (RoPE rotates pairs)")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim})")
        return self

    @property
    def applied_rope_type(self) -> Literal["yarn", "linear", "default"]:
        """The RoPE variant the model computes ("auto" resolved by the sequence lengths)."""
        if self.rope_type == "auto":
            return "yarn" if self.max_seq_len > self.original_seq_len else "default"
        return self.rope_type

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim
