"""rl.epochs: passes over one rollout batch. The first pass is on-policy (the ratio to the engine's log-probs is 1);
later passes are off-policy, so the ratio moves, the clip acts, and every pass takes rl.updates_per_step steps."""
from pathlib import Path

import torch

from dsaforge.model import Transformer
from dsaforge.model.rl.loop import GRPO
from dsaforge.model.train.state import TrainState, export
from dsaforge.tracking import NullTracker

from tests.rl.test_distributed import PROMPTS, _cfg, _episodes


def _train(tmp_path: Path, *sets) -> dict:
    cfg = _cfg("rl.kl_coef=0", "rl.updates_per_step=1", "rl.lr=3e-3", *sets)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    export(tmp_path / "init", model.state_dict(), cfg, {"stage": "init"})
    episodes = _episodes(cfg, model)
    state = TrainState(cfg, cfg.rl.mode, cfg.rl, tmp_path / "init")
    grpo = GRPO(cfg, state, None, None, list(range(PROMPTS)), [], tmp_path, NullTracker(), pad_id=0)
    grpo.advantages(episodes, torch.tensor([e.reward for e in episodes], dtype=torch.float64))
    stats = grpo.train(episodes)
    stats["updates"] = int(state.optimizer.state[state.params[0]]["step"])      # AdamW's step count
    return stats


def test_later_epochs_are_off_policy_and_clipped(tmp_path):
    one = _train(tmp_path / "one", "rl.epochs=1")
    three = _train(tmp_path / "three", "rl.epochs=3")
    assert one["updates"] == 1 and three["updates"] == 3
    # one on-policy pass: the trainer's log-probs equal the engine's, so every ratio is 1
    assert abs(one["rl/ratio_min"] - 1) < 1e-4 and abs(one["rl/ratio_max"] - 1) < 1e-4
    assert one["rl/clip_fraction"] == 0
    # passes 2 and 3 see the updated policy: ratios leave 1 and some are clipped
    assert three["rl/ratio_max"] > 1.05 or three["rl/ratio_min"] < 0.95, three
    assert three["rl/clip_fraction"] > 0, three
