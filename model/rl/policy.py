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
    (Keep Sampling Mask). lengths [B]: each row's length before padding; the forward then counts only the positions
    the engine fed (the first length - 1) in the experts' load (`Transformer.forward(valid=)`), so the router-bias
    update sees the episodes' tokens however they were batched (under Keep Routing the padding takes stand-in
    experts 0..k-1, which would otherwise look overloaded)."""
    fed = tokens[:, :-1]
    valid = None
    if lengths is not None:
        valid = torch.arange(fed.shape[1], device=fed.device)[None, :] < (lengths.to(fed.device) - 1)[:, None]
    out = model(fed, mode=mode, routing=routing, return_hidden=True, valid=valid)
    mask = sampled[:, 1:].bool()                                                    # [B, S-1]
    h = out.hidden[mask]                                                           # [N, dim]
    targets = tokens[:, 1:][mask]                                                  # [N]
    if keep is not None and keep.shape[0] != targets.shape[0]:
        raise ValueError(f"keep has {keep.shape[0]} rows; the batch has {targets.shape[0]} sampled tokens")
    lp, ent = kept_logprobs(model.head(h), targets, keep, temperature)
    logp = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)
    entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent.detach())
    return logp, entropy, mask
