"""Rewards for GRPO: the task verifier's outcome plus format and length terms with configurable weights, plus any
custom reward functions named by dotted path (paper §3: rule-based outcome reward, length penalty, ...).

    fns = load_reward_functions(cfg.rl.reward.custom)       # once, at stage start: import errors are config errors
    r = total_reward(episode, cfg.rl.reward, max_new_tokens, fns)

An episode record needs `score` (the verifier's score in [0, 1], `Task.reward`), `response_tokens` (tokens the
policy sampled) and `well_formed` (every turn parsed and an answer was submitted); a custom function receives the
whole record and returns a float.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Protocol

from dsaforge.config import ConfigError


class Scored(Protocol):
    score: float
    response_tokens: int
    well_formed: bool


def length_penalty(response_tokens: int, target: int, budget: int) -> float:
    """Share of the response budget used beyond `target` tokens, in [0, 1] (0 up to the target)."""
    if budget <= target:
        return 0.0
    return min(1.0, max(0, response_tokens - target) / (budget - target))


def load_reward_functions(custom: Mapping[str, float]) -> list[tuple[str, Callable[[Any], float], float]]:
    """[(path, function, weight)] for 'package.module:function' or 'package.module.function' paths."""
    out = []
    for path, weight in custom.items():
        module, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
        if not module or not attr:
            raise ConfigError(f"rl.reward.custom: {path!r} is not a dotted path to a function (package.module:function)")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rl.reward.custom: cannot load {path!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"rl.reward.custom: {path!r} is not callable")
        out.append((path, fn, float(weight)))
    return out


def reward_terms(episode: Scored, cfg, budget: int,
                 custom: list[tuple[str, Callable[[Any], float], float]] = ()) -> dict[str, float]:
    """Each weighted term of the reward (cfg: the `rl.reward` section; budget: rl.max_new_tokens)."""
    terms = {"outcome": cfg.outcome_weight * float(episode.score)}
    if cfg.format_weight:
        terms["format"] = cfg.format_weight * float(bool(episode.well_formed))
    if cfg.length_weight:
        terms["length"] = -cfg.length_weight * length_penalty(episode.response_tokens, cfg.length_target, budget)
    for path, fn, weight in custom:
        value = float(fn(episode))
        if value != value:                           # NaN would poison every advantage in its group
            raise ValueError(f"reward function {path} returned NaN")
        terms[path] = weight * value
    return terms


def total_reward(episode: Scored, cfg, budget: int, custom=()) -> float:
    return sum(reward_terms(episode, cfg, budget, custom).values())
