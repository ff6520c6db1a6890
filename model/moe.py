"""DeepSeekMoE: sigmoid router with a correction bias, group-limited top-k, shared expert, aux-loss-free balancing.

N = B*S tokens, E = n_routed_experts, k = n_activated_experts, G = n_expert_groups, I = moe_inter_dim.

The routed experts run as one grouped SwiGLU over the N*k token-slots sorted by expert (`grouped_swiglu`), not one
small matmul per expert. Their weights stay one `MLP` per expert (`experts.{e}.w1/w2/w3`), the layout of DeepSeek's
checkpoint that `hf.py` and the megatron bridge address; the forward stacks them into [E, I, dim] / [E, dim, I].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsaforge.config.model import ModelConfig
from dsaforge.model.layers import MLP


class Gate(nn.Module):
    """Router. The correction bias only steers *which* experts are chosen; the mixing weights come from the
    unbiased scores, so the bias never enters the LM loss (DeepSeek-V3's auxiliary-loss-free balancing)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = cfg.n_activated_experts, cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # A buffer, not a parameter: it is moved by `update_router_bias`, never by the optimizer.
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on scores [N, E] -> expert indices [N, k]."""
        biased = scores + self.bias if self.score_func == "sigmoid" else scores
        if self.n_groups > 1:
            grouped = biased.view(scores.shape[0], self.n_groups, -1)                     # [N, G, E/G]
            # Sigmoid routing ranks groups by their two best biased scores; softmax (V2) by the best one.
            group_scores = grouped.topk(2, -1)[0].sum(-1) if self.score_func == "sigmoid" else grouped.amax(-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]                         # [N, topk_groups]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1)[1]

    def forward(self, x: torch.Tensor, forced: Optional[torch.Tensor] = None):
        """x [N, dim] -> (weights [N, k], indices [N, k], scores [N, E]). With `forced` indices the scores are still
        computed, so the router keeps its gradient through the mixing weights (Keep Routing)."""
        logits = F.linear(x.float(), self.weight.float())                                 # [N, E] fp32
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(-1)
        with torch.no_grad():
            indices = self.select(scores.detach()) if forced is None else forced
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices, scores


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows grouped by expert, w [E, N, K] (nn.Linear layout), offs [E] int32 end row of each group
    -> [M, N], rows of group e multiplied by w[e]^T.

    torch._grouped_mm (one CUTLASS launch, with autograd) on Hopper-class GPUs in bf16. Elsewhere torch's
    fallback, whose dtype and layout rules differ by version, is not relied on: each group is one mm over a
    contiguous slice of rows, which needs no padding and no scatter."""
    if (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        # CUTLASS wants mat_b column-major: the transpose of the contiguous [E, N, K] stack is exactly that.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    parts = x.split(sizes)
    # With no rows at all the [0, N] result still hangs off x and w: an expert-parallel rank that received no
    # token must still run the all-to-all in backward that its peers run.
    return torch.cat([p @ w[e].t() for e, p in enumerate(parts) if sizes[e]] or [x @ w[0].t()])


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU w2(silu(w1 x) * w3 x) on its own rows: x [M, dim] sorted by expert, counts [E]
    rows per expert, w1/w3 [E, I, dim], w2 [E, dim, I] -> [M, dim]."""
    if torch.is_autocast_enabled(x.device.type):
        # torch._grouped_mm is outside autocast's op lists: cast as autocast would for a Linear.
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, w3, w2 = (t.to(dt) for t in (x, w1, w3, w2))
    offs = counts.cumsum(0).to(torch.int32)
    h = F.silu(grouped_mm(x, w1, offs)) * grouped_mm(x, w3, offs)                     # [M, I]
    return grouped_mm(h, w2, offs)                                                    # [M, dim]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.aux_alpha, self.bias_update_speed = cfg.seq_aux_loss_alpha, cfg.bias_update_speed
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # Tokens routed to each expert since the last bias update (training only).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        # Off while activation checkpointing recomputes this layer in backward: its tokens were counted already.
        self.count_load = True

    def forward(self, x: torch.Tensor, forced: Optional[torch.Tensor] = None):
        """x [B, S, dim], forced [B, S, k] or None -> (y [B, S, dim], indices [B, S, k], seq aux loss or None)."""
        b, s, d = x.shape
        flat = x.reshape(-1, d)                                                           # [N, dim]
        if forced is not None:
            forced = forced.reshape(-1, self.topk).to(device=x.device, dtype=torch.long)
        weights, indices, scores = self.gate(flat, forced)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)              # [E]
        if self.training and self.count_load:
            self.expert_load += counts.to(self.expert_load.dtype)
        # Token-slots sorted by expert; stable, so within an expert tokens stay in order and the final index_add
        # accumulates in the same order as a per-expert loop would.
        order = indices.flatten().argsort(stable=True)                                    # [N*k]
        token = order // self.topk
        y_sorted = self.expert_forward(flat[token], counts)                               # [N*k, dim]
        y = torch.zeros_like(flat).index_add_(0, token, y_sorted * weights.flatten()[order, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        aux = self._seq_aux_loss(scores.view(b, s, -1), indices.view(b, s, -1)) if self.aux_alpha > 0 else None
        return y.view(b, s, d), indices.view(b, s, self.topk), aux

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' weights stacked: w1, w3 [E_local, I, dim] and w2 [E_local, dim, I]."""
        return tuple(torch.stack([getattr(e, n).weight for e in self.experts]) for n in ("w1", "w3", "w2"))

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, dim] rows sorted by expert, counts [E_local] -> each row through its expert's SwiGLU."""
        return grouped_swiglu(x_sorted, counts, *self.expert_weights())

    def _seq_aux_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences.
        f_i = E/(k S) * #tokens of the sequence routed to i; P_i = mean over the sequence of normalised scores."""
        b, s, e = scores.shape
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)                               # [B, E]
        f = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, indices.reshape(b, -1), torch.ones(b, s * self.topk, device=scores.device)) * (e / (self.topk * s))
        return self.aux_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += speed * sign(mean load - load_i): under-loaded experts become more likely to be picked."""
        if self.expert_load.sum() > 0:
            err = self.expert_load.mean() - self.expert_load
            self.gate.bias += self.bias_update_speed * torch.sign(err)
        self.expert_load.zero_()
