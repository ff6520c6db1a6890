"""DeepSeekMoE: sigmoid router with a correction bias, group-limited top-k, shared expert, aux-loss-free balancing.

N = B*S tokens, E = n_routed_experts, k = n_activated_experts, G = n_expert_groups, I = moe_inter_dim.

The routed experts run as one grouped SwiGLU over the N*k token-slots sorted by expert (`grouped_swiglu`), not one
small matmul per expert. Their weights stay one `MLP` per expert (`experts.{e}.w1/w2/w3`), the layout of DeepSeek's
checkpoint that `hf.py` and the megatron bridge address; the forward stacks them into [E, I, dim] / [E, dim, I].
"""
from __future__ import annotations

from typing import Optional, Sequence

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
        self.norm_topk_prob = cfg.norm_topk_prob
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
        if self.score_func == "sigmoid" and self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights * self.route_scale).to(x.dtype), indices, scores


def use_grouped_mm(x: torch.Tensor) -> bool:
    """torch._grouped_mm (one CUTLASS launch for all experts, with autograd) runs on Hopper-class GPUs in bf16.
    Elsewhere torch's own fallback, whose dtype and layout rules differ by version, is not relied on."""
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return x.is_cuda and bf16 and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(x.device) >= (9, 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor | Sequence[torch.Tensor], groups: torch.Tensor | list[int]):
    """x [M, K] rows grouped by expert, w [E, N, K] (nn.Linear layout) -> [M, N]: the rows of group e times w[e]^T.

    Stacked w with groups = int32 end row of each group [E]: torch._grouped_mm. A list of E weights [N, K] with
    groups = rows per expert: one mm per contiguous group of rows, no padding, no scatter (indexing a stacked
    tensor per expert instead would cost a full [E, N, K] zero gradient per expert in backward)."""
    if isinstance(w, torch.Tensor):
        # CUTLASS wants mat_b column-major: the transpose of the contiguous [E, N, K] stack is exactly that.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=groups)
    parts = x.split(groups)
    # With no rows at all the [0, N] result still hangs off x and w: an expert-parallel rank that received no token
    # must still run the all-to-all in backward that its peers run.
    return torch.cat([F.linear(p, w[e]) for e, p in enumerate(parts) if groups[e]] or [F.linear(x, w[0])])


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """Every expert's SwiGLU w2(silu(w1 x) * w3 x) on its own rows: x [M, dim] sorted by expert, counts [E] rows
    per expert, w1/w3 [E, I, dim] and w2 [E, dim, I], stacked (torch._grouped_mm) or as per-expert lists
    -> [M, dim]."""
    if isinstance(w1, torch.Tensor):
        # torch._grouped_mm is outside autocast's op lists: cast as autocast would for a Linear.
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        x, w1, w3, w2 = (t.to(dt) for t in (x, w1, w3, w2))
        groups = counts.cumsum(0).to(torch.int32)                                     # no host sync
    else:
        groups = counts.tolist()
    h = F.silu(grouped_mm(x, w1, groups)) * grouped_mm(x, w3, groups)                 # [M, I]
    return grouped_mm(h, w2, groups)                                                  # [M, dim]


def expert_counts(indices: torch.Tensor, n_experts: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token-slots per expert [E] (int64) from expert indices [..., k]; with valid [...] (bool, indices' shape
    without k), only the slots of valid tokens. torch.bincount on CUDA reads the largest index back to the host to
    size its output, and selecting the valid tokens (indices[valid]) reads their count back (a device
    synchronisation per call either way); a scatter-add of 1s, or of the validity, into E bins does not."""
    flat = indices.flatten()
    ones = torch.ones_like(flat) if valid is None else valid[..., None].expand(indices.shape).flatten().long()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, ones)


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

    def forward(self, x: torch.Tensor, forced: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None):
        """x [B, S, dim], forced [B, S, k] or None, valid [B, S] bool or None (False on padding)
        -> (y [B, S, dim], indices [B, S, k], seq aux loss or None).

        Every position is routed and computed (padding included: the experts' dispatch is the same with or without
        a mask), but only valid positions count in `expert_load` and in the balance loss, so the router-bias update
        and the loss see the real tokens however the rows were padded."""
        b, s, d = x.shape
        flat = x.reshape(-1, d)                                                           # [N, dim]
        if forced is not None:
            forced = forced.reshape(-1, self.topk).to(device=x.device, dtype=torch.long)
        weights, indices, scores = self.gate(flat, forced)
        counts = expert_counts(indices, self.n_experts)                                   # [E] every slot dispatched
        if self.training and self.count_load:
            load = counts if valid is None else expert_counts(indices, self.n_experts, valid.reshape(-1))
            self.expert_load += load.to(self.expert_load.dtype)
        y = self.routed(flat, weights, indices, counts)                                   # [N, dim]
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        aux = (self._seq_aux_loss(scores.view(b, s, -1), indices.view(b, s, -1), valid) if self.aux_alpha > 0
               else None)
        return y.view(b, s, d), indices.view(b, s, self.topk), aux

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               counts: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for every token (the part expert parallelism redistributes)."""
        # Token-slots sorted by expert; stable, so within an expert tokens stay in order and the final index_add
        # accumulates in the same order as a per-expert loop would.
        order = indices.flatten().argsort(stable=True)                                    # [N*k]
        token = order // self.topk
        y_sorted = self.expert_forward(flat[token], counts)                               # [N*k, dim]
        return torch.zeros_like(flat).index_add_(0, token, y_sorted * weights.flatten()[order, None])

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, dim] rows sorted by expert, counts [E_local] -> each row through its expert's SwiGLU.
        The weights stay one MLP per expert (the checkpoint layout); torch._grouped_mm gets them stacked."""
        w1, w3, w2 = ([getattr(e, n).weight for e in self.experts] for n in ("w1", "w3", "w2"))
        if use_grouped_mm(x_sorted):
            w1, w3, w2 = torch.stack(w1), torch.stack(w3), torch.stack(w2)
        return grouped_swiglu(x_sorted, counts, w1, w3, w2)

    def _seq_aux_loss(self, scores: torch.Tensor, indices: torch.Tensor,
                      valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences.
        f_i = E/(k S) * #tokens of the sequence routed to i; P_i = mean over the sequence of normalised scores.
        With valid [B, S], S is each sequence's count of valid tokens and padding enters neither sum; sequences
        without any are left out of the average."""
        b, s, e = scores.shape
        normed = scores / scores.sum(-1, keepdim=True)                                    # [B, S, E]
        w = torch.ones(b, s, device=scores.device) if valid is None else valid.float()    # [B, S] counted tokens
        n = w.sum(1, keepdim=True)                                                        # [B, 1]
        p = (normed * w[..., None]).sum(1) / n.clamp_min(1)                               # [B, E]
        f = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, indices.reshape(b, -1), w[..., None].expand(b, s, self.topk).reshape(b, -1)) * (
            e / (self.topk * n.clamp_min(1)))
        per_seq = (f * p).sum(-1)                                                         # [B]
        return self.aux_alpha * per_seq.sum() / (n > 0).sum().clamp_min(1)

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += speed * sign(mean load - load_i): under-loaded experts become more likely to be picked. With no
        load counted every err is 0 and nothing moves, so no test of the load (a host sync) is needed."""
        err = self.expert_load.mean() - self.expert_load
        self.gate.bias += self.bias_update_speed * torch.sign(err)
        self.expert_load.zero_()


def loop_reference(moe: MoE, x: torch.Tensor, forced: Optional[torch.Tensor] = None):
    """The MoE as a plain loop, one matmul per expert that received tokens: the oracle for the grouped dispatch
    and the baseline of `dsaforge.model.train.bench_moe`. -> (y [B, S, dim], indices [B, S, k])."""
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    if forced is not None:
        forced = forced.reshape(-1, moe.topk)
    weights, indices, _ = moe.gate(flat, forced)
    counts = torch.bincount(indices.flatten(), minlength=moe.n_experts)
    y = torch.zeros_like(flat)
    for e in torch.nonzero(counts).flatten().tolist():
        tok, slot = torch.where(indices == e)
        y.index_add_(0, tok, moe.experts[e](flat[tok]) * weights[tok, slot, None])
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(flat)
    return y.view(b, s, d), indices.view(b, s, moe.topk)
