"""Reward terms: verifier outcome, format bonus, length penalty and custom functions by dotted path."""
from dataclasses import dataclass

import pytest

from dsaforge.config import ConfigError
from dsaforge.config.sections import RewardConfig
from dsaforge.model.rl.reward import length_penalty, load_reward_functions, reward_terms, total_reward


@dataclass
class Ep:
    score: float
    response_tokens: int
    well_formed: bool


def tool_call_bonus(ep) -> float:      # a custom reward function, loaded by its dotted path below
    return 0.5 if ep.well_formed else -1.0


def test_terms_by_hand():
    cfg = RewardConfig(outcome_weight=1.0, format_weight=0.2, length_weight=0.5, length_target=100)
    # 300 tokens of a 500 budget, 100 free: penalty share (300 - 100) / (500 - 100) = 0.5
    terms = reward_terms(Ep(1.0, 300, True), cfg, budget=500)
    assert terms == pytest.approx({"outcome": 1.0, "format": 0.2, "length": -0.25})
    assert total_reward(Ep(0.0, 50, False), cfg, budget=500) == pytest.approx(0.0)
    assert length_penalty(900, 100, 500) == 1.0 and length_penalty(10, 100, 500) == 0.0
    assert reward_terms(Ep(0.5, 300, True), RewardConfig(), budget=500) == {"outcome": 0.5}


def test_custom_reward_functions_by_dotted_path():
    path = f"{__name__}:tool_call_bonus"
    fns = load_reward_functions({path: 2.0})
    assert reward_terms(Ep(1.0, 10, False), RewardConfig(custom={path: 2.0}), 100, fns)[path] == -2.0
    for bad, why in [("nosuchmodule_xyz.fn", "cannot load"), (f"{__name__}:missing", "cannot load"),
                     ("justaname", "dotted path")]:
        with pytest.raises(ConfigError, match=why):
            load_reward_functions({bad: 1.0})
