"""GRPO with DeepSeek-V3.2's stabilisers as pure functions: tensors in, tensors out (arXiv 2512.02556 §3.1).

Shapes: B sequences (G per prompt, P prompts, B = P*G), T token positions per sequence, `mask` [B, T] is 1 on
the tokens the policy sampled (never on the prompt, tool outputs or padding). Log-probabilities are of the sampled
token: `logp` is pi_theta (with grad), `old_logp` is pi_old as the inference engine returned it while sampling
(processed: temperature and top-p/top-k truncation applied), `ref_logp` the frozen reference policy.

    loss = -agg( min(r A, clip(r, 1-eps_lo, 1+eps_hi) A) * M ) + beta * agg( r * K3(pi_theta, pi_ref) )

with r = pi_theta / pi_old, A the group advantage (Eq. 5-6), M the off-policy sequence mask (Eq. 8-9), the second
term the unbiased KL estimate (Eq. 7), agg one of three aggregations (`aggregate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

Aggregation = Literal["sequence", "token", "dr_grpo"]


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: A_i = R_i - mean(R) over the group (Eq. 6, no std division, as in the
    paper and Dr.GRPO); `std_normalize` divides by the group's std + eps (the original GRPO)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group >= 2], got {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's K3 estimate of KL(pi_theta || pi_ref) per sampled token: rho - log(rho) - 1, rho = pi_ref/pi_theta.
    Non-negative; sampled from pi_theta its value is unbiased, its gradient is not (it follows the reverse KL)."""
    log_rho = ref_logp - logp
    return torch.exp(log_rho) - log_rho - 1


def unbiased_kl(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Eq. 7: (pi_theta / pi_old) * K3. The ratio is NOT detached: under samples from pi_old its gradient is
    sum_x pi_theta * (log pi_theta - log pi_ref) * grad log pi_theta = grad KL(pi_theta || pi_ref), exactly."""
    return torch.exp(logp - old_logp) * k3(logp, ref_logp)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token (to maximise): min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).
    adv [B] (one advantage per sequence) or [B, T]. -> (objective [B, T], ratio r [B, T])."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None] if adv.dim() == 1 else adv
    return torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a), ratio


def opsm_keep(adv: torch.Tensor, old_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
              delta: float) -> torch.Tensor:
    """Eq. 8-9, off-policy sequence masking: bool [B], False for a sequence whose advantage is negative AND whose
    length-normalised log(pi_old / pi_theta) exceeds delta. Decided per sequence, by the sequence's advantage;
    pi_old must be the engine's sampling probability, so kernel mismatch counts as well as staleness."""
    m = mask.to(logp.dtype)
    drift = ((old_logp - logp.detach()) * m).sum(1) / m.sum(1).clamp(min=1)        # [B], k1 of KL(pi_old||pi_theta)
    return ~((adv < 0) & (drift > delta))


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: Aggregation, max_len: Optional[int] = None,
              n_seqs: Optional[int] = None, n_tokens: Optional[int] = None) -> torch.Tensor:
    """values [B, T] -> scalar, over the masked tokens.
    sequence: 1/B sum_i 1/|o_i| sum_t  (Eq. 5, GRPO's per-sequence length normalisation);
    token:    sum over all tokens / number of tokens (DAPO's token mean);
    dr_grpo:  sum over all tokens / (B * max_len) (Dr.GRPO: a constant normaliser, no length bias).
    n_seqs / n_tokens replace B / the token count when [B, T] is one micro-batch of a larger batch, so that the
    micro-batches' results add up to the batch's."""
    m = mask.to(values.dtype)
    b = n_seqs or values.shape[0]
    if how == "sequence":
        return ((values * m).sum(1) / m.sum(1).clamp(min=1)).sum() / b
    if how == "token":
        return (values * m).sum() / (n_tokens or m.sum().clamp(min=1))
    if how == "dr_grpo":
        return (values * m).sum() / (b * (max_len or values.shape[1]))
    raise ValueError(f"aggregation must be 'sequence', 'token' or 'dr_grpo', got {how!r}")


def kept_logprobs(logits: torch.Tensor, tokens: torch.Tensor, keep: Optional[torch.Tensor] = None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep Sampling Mask: log pi_theta(token) renormalised over the engine's kept set. logits [N, V], tokens [N],
    keep [N, V] bool (the top-p/top-k set the engine sampled from; None: the full vocabulary).
    -> (log-prob of each token [N], entropy of the (renormalised) distribution [N])."""
    z = logits.float() / temperature
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp_all.gather(-1, tokens[:, None]).squeeze(-1), entropy


def keep_mask_from_sets(token_ids: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Kept sets in CSR form (token_ids [M], offsets [N+1], row n owns token_ids[offsets[n]:offsets[n+1]]; an empty
    row means no truncation) -> keep [N, V] bool."""
    n = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(n, device=token_ids.device), counts)
    keep = torch.zeros(n, vocab_size, dtype=torch.bool, device=token_ids.device)
    keep[rows, token_ids.long()] = True
    keep[counts == 0] = True
    return keep


@dataclass
class LossConfig:
    """The knobs of `grpo_loss` (filled from the `rl` config section)."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    aggregation: Aggregation = "sequence"
    unbiased_kl: bool = True
    opsm: bool = True
    opsm_delta: float = 0.1
    max_len: Optional[int] = None          # dr_grpo's constant normaliser (the response budget)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              cfg: LossConfig, ref_logp: Optional[torch.Tensor] = None, kl_coef: Optional[torch.Tensor] = None,
              n_seqs: Optional[int] = None, n_tokens: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss to minimise, and detached statistics.

    logp [B, T] pi_theta with grad; old_logp [B, T] the engine's; adv [B]; mask [B, T];
    ref_logp [B, T] the reference policy's (None: no KL term); kl_coef [B] beta of each sequence's task domain
    (0 allowed: that domain has no KL term). OPSM masks the policy term only, never the KL term. n_seqs / n_tokens:
    the whole batch's counts when this is one micro-batch of it (`aggregate`)."""
    m = mask.to(logp.dtype)
    objective, ratio = clipped_surrogate(logp, old_logp, adv, cfg.clip_eps_low, cfg.clip_eps_high)
    keep = opsm_keep(adv, old_logp, logp, mask, cfg.opsm_delta) if cfg.opsm else torch.ones_like(adv, dtype=torch.bool)
    policy = -aggregate(objective * keep[:, None].to(logp.dtype), mask, cfg.aggregation, cfg.max_len, n_seqs, n_tokens)
    loss = policy
    stats = {"policy_loss": policy.detach()}
    if ref_logp is not None:
        kl_tok = unbiased_kl(logp, old_logp, ref_logp) if cfg.unbiased_kl else k3(logp, ref_logp)
        beta = kl_coef if kl_coef is not None else torch.zeros(logp.shape[0], device=logp.device)
        kl_term = aggregate(kl_tok * beta[:, None].to(logp.dtype), mask, cfg.aggregation, cfg.max_len, n_seqs, n_tokens)
        loss = loss + kl_term
        stats["kl"] = aggregate(k3(logp, ref_logp).detach(), mask, "token")
        stats["kl_loss"] = kl_term.detach()
    with torch.no_grad():
        r = ratio.detach()[m.bool()]
        clipped = ((r < 1 - cfg.clip_eps_low) | (r > 1 + cfg.clip_eps_high)).float()
        stats.update({
            "ratio_min": r.min() if r.numel() else torch.tensor(1.0), "ratio_mean": r.mean() if r.numel() else
            torch.tensor(1.0), "ratio_max": r.max() if r.numel() else torch.tensor(1.0),
            "clip_fraction": clipped.mean() if r.numel() else torch.tensor(0.0),
            "opsm_fraction": 1 - keep.float().mean(),
            "logp_gap": aggregate((logp.detach() - old_logp).abs(), mask, "token"),
        })
    return loss, stats
