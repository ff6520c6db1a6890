"""Worker for test_distributed.py: one GRPO train phase on a fixed set of episodes, on one process or as one rank of a
torchrun job (data parallel through the megatron bridge: megatron's DDP and distributed optimizer).

    python tests/rl/dp_worker.py CFG.json INIT EPISODES.pkl OUT.pt                          # one process
    torchrun --nproc-per-node 2 tests/rl/dp_worker.py CFG.json INIT EPISODES.pkl OUT.pt     # DP = 2

Each rank takes the whole groups of its share of the prompts, computes their advantages, and trains on them; rank 0
saves the train phase's statistics and the whole model's updated weights to OUT.pt.
"""
import pickle
import sys
from pathlib import Path

import torch

from dsaforge.config import Config
from dsaforge.model.rl.loop import GRPO, share
from dsaforge.model.train.state import TrainState, build_model
from dsaforge.tracking import NullTracker

cfg_path, init, episodes_path, out = sys.argv[1:]
cfg = Config.model_validate_json(Path(cfg_path).read_text())
init = Path(init)
state = TrainState(cfg, cfg.rl.mode, cfg.rl, init)
reference = build_model(cfg, init, state.device).eval().requires_grad_(False)
prompts = list(range(cfg.rl.prompts_per_step))
grpo = GRPO(cfg, state, reference, None, prompts, [], Path(out).parent, NullTracker(), pad_id=0)
episodes = pickle.loads(Path(episodes_path).read_bytes())
first, mine = share(prompts, *state.dp)
local = [e for e in episodes if first <= e.group < first + len(mine)]
grpo.advantages(local, torch.tensor([e.reward for e in local], dtype=torch.float64))
stats = grpo.train(local)
weights = state.full_state_dict()
if state.is_main:
    torch.save({"stats": stats, "weights": weights, "dp": state.dp[1], "local": len(local),
                "optimizer": type(state.optimizer).__name__}, out)
state.close()
