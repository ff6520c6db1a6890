"""Token sampling for rollouts: temperature, top-k and top-p truncation, the sampled token's log-probability under
the distribution it was drawn from, and the kept-token set (Keep Sampling Mask, paper §3.1).

    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=512, stop_token_ids=(eos,))
    tokens, logprobs, kept = sample(logits, [params] * B, generator)

Log-probs are the *processed* ones: log softmax(logits / T) renormalised over the kept set, which is what the
sampler drew from (pi_old of the off-policy sequence mask). The kept set is where the truncated distribution is
non-zero; a trainer applying Keep Sampling Mask renormalises pi_theta over the same set. Temperature 0 is greedy:
the token is the argmax and its log-prob the untempered full-vocabulary one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus mass kept (1 = off)
    top_k: int = 0                      # tokens kept (0 = off)
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def truncates(self) -> bool:
        return self.temperature > 0 and (self.top_p < 1 or self.top_k > 0)


def processed_logits(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                     top_k: torch.Tensor, any_top_k: bool = True, any_top_p: bool = True) -> torch.Tensor:
    """logits [B, V] -> tempered logits with -inf outside each row's kept set (fp32).

    temperature [B] (rows with 0 use 1: greedy rows keep the full distribution), top_p [B], top_k [B] (0 = all).
    top-k keeps every token tied with the k-th; top-p keeps the smallest prefix (by descending probability) whose
    mass reaches top_p, always at least one token. any_top_k / any_top_p False (the caller knows no row truncates
    that way) skip that truncation's kernels; with neither, no sort runs."""
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if not (any_top_k or any_top_p):
        return x
    v = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)                                # [B, V]
    drop_sorted = None
    if any_top_k:
        k = torch.where(top_k > 0, top_k.clamp_max(v), v)
        kth = sorted_x.gather(1, (k - 1)[:, None])                                   # [B, 1]
        drop_sorted = sorted_x < kth                                                 # top-k
    if any_top_p:
        kept = sorted_x if drop_sorted is None else sorted_x.masked_fill(drop_sorted, float("-inf"))
        probs = kept.softmax(-1)
        before = probs.cumsum(-1) - probs                                            # mass strictly before each
        drop_p = before >= top_p[:, None]                                            # top-p
        drop_sorted = drop_p if drop_sorted is None else drop_sorted | drop_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))


@functools.lru_cache(maxsize=32)
def _param_tensors(params: tuple[SamplingParams, ...], device: torch.device):
    """Per-row temperature [B] fp32, top_p [B] fp32, top_k [B] int64 on `device`, in one host-to-device copy; cached
    because a decode loop asks for the same rows' tensors at every step (callers must not modify them)."""
    vals = torch.tensor([[p.temperature, p.top_p if p.temperature > 0 else 1.0, p.top_k if p.temperature > 0 else 0]
                         for p in params], dtype=torch.float64).to(device)
    return vals[:, 0].float(), vals[:, 1].float(), vals[:, 2].long()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generator: Optional[torch.Generator] = None,
           want_kept: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """logits [B, V] -> (tokens [B] int64, log-probs [B] fp32, kept [B, V] bool or None).

    kept is returned when want_kept and some row truncates; rows that do not truncate are all True."""
    dev = logits.device
    temp, top_p, top_k = _param_tensors(tuple(params), dev)
    x = processed_logits(logits, temp, top_p, top_k, any_top_k=any(p.temperature > 0 and p.top_k > 0 for p in params),
                         any_top_p=any(p.temperature > 0 and p.top_p < 1 for p in params))
    logp = x.log_softmax(-1)                                                         # [B, V]
    # Gumbel-max on the truncated logits: exact sampling from softmax(x), one kernel for the whole batch.
    u = torch.rand(x.shape, device=dev, generator=generator, dtype=torch.float32) if generator is None or \
        generator.device == torch.device(dev) else torch.rand(x.shape, generator=generator).to(dev)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    drawn = (x + gumbel).argmax(-1)
    greedy = temp == 0
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    lp = logp.gather(1, tokens[:, None])[:, 0]
    kept = None
    if want_kept and any(p.truncates for p in params):
        kept = torch.isfinite(x)
    return tokens, lp, kept
