"""The training model's log-probabilities of sampled tokens, with Keep Routing and Keep Sampling Mask.

    logp, entropy, mask = token_logprobs(model, tokens, sampled, mode="sparse", routing=engine_routes,
                                         keep=kept_sets, temperature=cfg.rl.temperature)

tokens [B, S] are whole episodes (prompt, sampled segments, tool outputs, padding); sampled [B, S] marks the tokens
the policy sampled. Results are aligned with tokens[:, 1:] (the log-prob of token t comes from position t-1), so
they are [B, S-1]. Only the sampled positions go through the output head: the [S, vocab] logits of a whole episode
never exist.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dsaforge.model.moe import MoE
from dsaforge.model.rl.grpo import kept_logprobs


def token_logprobs(model, tokens: torch.Tensor, sampled: torch.Tensor, mode: str = "dense",
                   routing: Optional[Sequence[torch.Tensor]] = None, keep: Optional[torch.Tensor] = None,
                   temperature: float = 1.0, lengths: Optional[torch.Tensor] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (log pi_theta [B, S-1], entropy [B, S-1], mask [B, S-1]), zero where mask is False.

    The forward runs on tokens[:, :-1], the tokens the engine fed through the model (the last sampled token never
    is). routing: the engine's expert indices per MoE layer for those positions, [B, S-1, k] each (Keep Routing: the
    training forward takes the experts that sampled the tokens; the router still scores, so it keeps its
    gradient). keep: [N, V] bool kept sets, one row per sampled token in row-major order of `sampled[:, 1:]`
    (Keep Sampling Mask). lengths [B]: each row's length before padding; in training mode the padding's routed
    tokens are then taken back out of the experts' load counts (`uncount_padding`)."""
    out = model(tokens[:, :-1], mode=mode, routing=routing, return_hidden=True, return_routing=lengths is not None)
    if lengths is not None and model.training:
        uncount_padding(model, out.routing, lengths, tokens.shape[1] - 1)
    mask = sampled[:, 1:].bool()                                                    # [B, S-1]
    h = out.hidden[mask]                                                           # [N, dim]
    targets = tokens[:, 1:][mask]                                                  # [N]
    if keep is not None and keep.shape[0] != targets.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} rows; the batch has {targets.shape[0]} sampled tokens")
    lp, ent = kept_logprobs(model.head(h), targets, keep, temperature)
    logp = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent.detach())
    return logp, entropy, mask


def uncount_padding(model, routes: Sequence[torch.Tensor], lengths: torch.Tensor, width: int) -> None:
    """Subtract the padding positions' routes from each MoE layer's `expert_load`, so the router-bias update counts
    the episodes' tokens only, however they were batched (with Keep Routing, padding takes stand-in experts 0..k-1,
    which would otherwise look overloaded). routes: the forward's expert indices per MoE layer, [B, S', k] with
    S' = width for the main layers and width - d for the MTP layer of depth d; lengths [B] real token counts."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe, idx in zip(moes, routes):
        b, s, k = idx.shape
        real = (lengths.to(idx.device) - 1 - (width - s))[:, None]                  # real positions in this layer
        pad = torch.arange(s, device=idx.device)[None, :] >= real                   # [B, S']
        if pad.any():
            moe.expert_load -= torch.bincount(idx[pad].flatten(), minlength=moe.expert_load.numel()).to(
                moe.expert_load.dtype)
