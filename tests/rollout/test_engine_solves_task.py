"""End to end through every piece: a tiny model trained on one task's reference trajectory (rendered with the chat
format) rolls the task out with the in-process engine, calling the task's real tool (a live Jupyter kernel in the
sandbox), and its verifier passes; the rollout's tokens are exactly the training tokens, so the format a trainer
sees and the one rollouts produce are the same."""
import pytest
import torch
import torch.nn.functional as F

from dsaforge.config import presets
from dsaforge.data.chat import ChatTemplate
from dsaforge.data.tokenizer import train_tokenizer
from dsaforge.model import Transformer
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams
from dsaforge.rollout import EnginePolicy, RolloutConfig, run_episodes
from dsaforge.synth.episode import make_episode
from dsaforge.synth.generate import synthesize
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import load_tasks
from dsaforge.synth.trajectory import load_trajectories
from tests.model.model_helpers import tiny_cfg
from tests.synth.conftest import requires_bwrap

pytestmark = [requires_bwrap, pytest.mark.slow]


def test_trained_tiny_model_solves_its_task_through_the_engine(tmp_path):
    cfg = presets.tiny().synth
    cfg.agent_classes, cfg.holdout_fraction = ["code_interpreter"], 0.0
    cfg.tasks_per_class, cfg.envs_per_class, cfg.max_difficulty, cfg.pass_k = 1, 1, 1, 1
    synthesize(cfg, tmp_path)
    (traj,), (task,) = load_trajectories(tmp_path), load_tasks(tmp_path)
    assert traj["passed"]
    text = ChatTemplate(thinking=True).render(traj["messages"], traj["tools"], add_generation_prompt=False)
    chat = ChatTemplate(train_tokenizer([text] * 8, vocab_size=1024), thinking=True)
    ids = chat.encode(traj["messages"], traj["tools"], add_generation_prompt=False)
    x = torch.tensor([ids])

    torch.manual_seed(0)
    model = Transformer(tiny_cfg(vocab_size=chat.tokenizer.get_vocab_size(), dim=128, inter_dim=256, n_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(400):
        logits = model(x, mode="dense").logits[0, :-1]
        loss = F.cross_entropy(logits, x[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02 and bool((logits.argmax(-1) == x[0, 1:]).all()):
            break
    print(f"memorised {len(ids)} tokens in {step + 1} steps (loss {loss.item():.4f})")
    model.eval()

    engine = Engine(model, mode="dense", max_batch=2, max_len=model.cfg.max_seq_len, capture_routing=True)
    policy = EnginePolicy(engine, chat, SamplingParams(temperature=0.0, max_new_tokens=200))
    (t,) = run_episodes(policy, [make_episode(task, Sandbox(hide=[str(tmp_path.resolve())]))],
                        RolloutConfig(max_turns=3))
    assert t.passed and t.finish_reason == "answered" and t.turns == 1, (t.finish_reason, t.detail)
    (w,) = t.windows
    assert w.tokens == ids                                  # the kernel's real output fed back, token for token
    assert t.messages[3]["content"] == traj["messages"][3]["content"]
    gen = [lp for lp, m in zip(w.logprobs, w.mask) if m]
    assert len(gen) == sum(w.mask) > 0 and min(gen) > -0.5
    assert w.routing.shape == (len(ids) - 1, model.n_moe_layers, model.cfg.n_activated_experts)
