"""Token sampling for rollouts: temperature, top-k and top-p truncation, the sampled token's log-probability under
the distribution it was drawn from, and the kept-token set (Keep Sampling Mask, paper §3.1).

    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=512, stop_token_ids=(eos,), seed=7)
    u = to_uniforms(draw_bits(streams, positions), device)        # one draw per row: [B] float64 in [0, 1)
    tokens, logprobs, kept = sample(logits, [params] * B, u)

Randomness is per sequence, not per batch: each row's token is the inverse CDF of its processed distribution at one
uniform, and that uniform is a counter-based hash (splitmix64) of the sequence's stream (from the engine's seed and
the sequence's key: `SamplingParams.seed`, or its submission number) and the position being sampled. A sequence's
tokens therefore depend on its own context and key alone, not on which other sequences share its decode step, nor
on their order. The hash runs on the host over [B] integers (a few microseconds of numpy, no per-row Python), and
the draws reach the device with the step's other inputs.

Log-probs are the *processed* ones: log softmax(logits / T) renormalised over the kept set, which is what the
sampler drew from (pi_old of the off-policy sequence mask). The kept set is where the truncated distribution is
non-zero; a trainer applying Keep Sampling Mask renormalises pi_theta over the same set. Temperature 0 is greedy:
the token is the argmax and its log-prob the untempered full-vocabulary one.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0                  # nucleus mass kept (1 = off)
    top_k: int = 0                      # tokens kept (0 = off)
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: Optional[int] = None          # the sequence's sampling key (None: the engine numbers its sequences)

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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

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
def _param_tensors(params: tuple[tuple[float, float, int], ...], device: torch.device):
    """Per-row temperature [B] fp32, top_p [B] fp32, top_k [B] int64 on `device`, in one host-to-device copy; cached
    because a decode loop asks for the same rows' tensors at every step (callers must not modify them). Keyed by
    the distribution's settings alone: rows differing only in their seed share an entry."""
    vals = torch.tensor([[t, p if t > 0 else 1.0, k if t > 0 else 0] for t, p, k in params],
                        dtype=torch.float64).to(device)
    return vals[:, 0].float(), vals[:, 1].float(), vals[:, 2].long()


# ---------------------------------------------------------------- per-sequence random streams

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic): z + golden, then two xor-shift-multiply
    rounds. Consecutive counters map to statistically independent 64-bit values."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def seed_of(*parts) -> int:
    """A 63-bit sampling key from any parts (task id, sample index, a call's seed, ...), the same in every process
    (Python's own hash() of a str is salted per process)."""
    parts = [int(p) if isinstance(p, np.integer) else p for p in parts]       # np.int64(3) keys as 3 does
    digest = hashlib.blake2b("\x1f".join(map(repr, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sequence_stream(seed: int, key: int) -> int:
    """A sequence's 64-bit random stream from the engine's seed and the sequence's key."""
    with np.errstate(over="ignore"):
        z = _mix(np.array([int(seed) & _MASK64], dtype=np.uint64)) ^ np.uint64(int(key) & _MASK64)
        return int(_mix(z)[0])


def draw_bits(streams: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """[B] int64 in [0, 2^53): the draw of each row's stream at the position being sampled (the top 53 bits of
    splitmix64's output sequence from the state `stream`, at that position), a pure function of the pair."""
    with np.errstate(over="ignore"):
        z = np.array(streams, dtype=np.uint64) + np.array(positions, dtype=np.uint64) * _GOLDEN
        return (_mix(z) >> np.uint64(11)).astype(np.int64)


def to_uniforms(bits: torch.Tensor | np.ndarray, device=None) -> torch.Tensor:
    """`draw_bits` -> [B] float64 uniforms in [0, 1) (exact: 53-bit integers times 2^-53)."""
    bits = torch.as_tensor(bits, device=device)
    return bits.to(torch.float64) * 2.0 ** -53


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor,
           want_kept: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """logits [B, V], uniforms [B] float64 in [0, 1) -> (tokens [B] int64, log-probs [B] fp32, kept [B, V] bool or
    None).

    Row b's token is the inverse CDF of its processed distribution at uniforms[b]: the first token whose cumulative
    probability (fp64, in vocabulary order) exceeds u times the total. So a row's token is a function of its own
    logits and draw, whatever else is in the batch. Tokens outside the kept set have zero width and are never
    drawn. kept is returned when want_kept and some row truncates; rows that do not truncate are all True."""
    dev = logits.device
    temp, top_p, top_k = _param_tensors(tuple((p.temperature, p.top_p, p.top_k) for p in params), dev)
    x = processed_logits(logits, temp, top_p, top_k, any_top_k=any(p.temperature > 0 and p.top_k > 0 for p in params),
                         any_top_p=any(p.temperature > 0 and p.top_p < 1 for p in params))
    logp = x.log_softmax(-1)                                                         # [B, V]
    cdf = logp.exp().double().cumsum(-1)                                             # [B, V]
    target = uniforms.to(device=dev, dtype=torch.float64)[:, None] * cdf[:, -1:]     # [B, 1], below the total
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(x.shape[-1] - 1)
    greedy = temp == 0
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    lp = logp.gather(1, tokens[:, None])[:, 0]
    kept = None
    if want_kept and any(p.truncates for p in params):
        kept = torch.isfinite(x)
    return tokens, lp, kept
