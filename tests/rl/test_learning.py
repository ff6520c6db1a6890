"""The tiny learning bar: GRPO after SFT raises the held-out pass rate by >= 10 points and by more than 3 standard
errors, on the tiny-RL task set (hundreds of held-out prompts; every tool call and verdict through the episode
interface and the sandbox), through the real sft and grpo stages (`dsaforge.model.rl.tiny`).

Run: python -m pytest tests/rl/test_learning.py -q -s
"""
import pytest

from dsaforge.model.rl.tiny import run
from dsaforge.synth import sandbox as sbx

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sbx.bwrap_problem() is not None, reason=f"bwrap unusable: {sbx.bwrap_problem()}")]


def test_grpo_after_sft_raises_heldout_pass_rate(tmp_path):
    r = run(tmp_path)
    metrics = r["tracker"].metrics
    assert r["heldout"] >= 200
    assert r["after"] - r["before"] >= 0.10, r
    assert r["gain_se"] > 3, r
    # the stabilisers' statistics were logged every step
    for key in ("rl/ratio_mean", "rl/opsm_fraction", "rl/engine_trainer_logp_gap", "rl/entropy"):
        assert len(metrics[key]) == r["grpo"]["steps"], key
