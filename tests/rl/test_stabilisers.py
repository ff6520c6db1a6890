"""Keep Sampling Mask and Keep Routing through the real path: episodes sampled by the rollout engine, collated,
and scored by the training model (`token_logprobs`) after an optimizer step (paper §3.1).

- top-p < 1 and lr = 0: the importance ratio pi_theta / pi_old is 1 with Keep Sampling Mask, and equals the kept
  mass (sum over the kept set of the full-vocabulary probability) without it.
- After `update_router_bias` has moved the routers, the trainer's log-probs match the engine's with Keep Routing
  and differ without it.

Run: python -m pytest tests/rl/test_stabilisers.py -q     (about 20 s on CPU)
"""
import numpy as np
import pytest
import torch

from dsaforge.config import load_config
from dsaforge.model import update_router_bias
from dsaforge.model.engine import Engine
from dsaforge.model.rl.batch import EpisodeRecord, collate
from dsaforge.model.rl.grpo import LossConfig, grpo_loss
from dsaforge.model.rl.policy import token_logprobs
from dsaforge.model.sampling import SamplingParams
from dsaforge.model.train.state import TrainState

TOL = 2e-4


def _setup(bias_speed=1e-3):
    cfg = load_config("tiny")
    cfg.train.device = "cpu"
    cfg.model.index_topk = 8                      # prompts of 10-20 tokens: the sparse path really selects
    cfg.model.bias_update_speed = bias_speed
    cfg.model.init_std = 0.05                     # a random model whose experts differ enough to see a reroute
    return cfg, TrainState(cfg, "sparse", cfg.rl)


def _episodes(cfg, model, top_p, seed=0):
    engine = Engine(model, mode="sparse", max_batch=4, max_len=64, capture_routing=True, capture_kept=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.model.vocab_size, (n,), generator=g).tolist() for n in (10, 17, 13, 20)]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=12))
    eps = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        kept = [[] if k is None else np.asarray(k).tolist() for k in (o.kept or [None] * len(o.tokens))]
        eps.append(EpisodeRecord("t", "general", i, p + o.tokens, [False] * len(p) + [True] * len(o.tokens),
                                 [0.0] * len(p) + list(o.logprobs), advantage=1.0 - 0.5 * i,
                                 routing=o.routing.transpose(1, 0, 2), kept=kept))
    return eps


def _batch(cfg, eps, keep_routing=True, keep_mask=True):
    return collate(eps, 0, cfg.model.vocab_size, [0.0] * len(eps), keep_routing, keep_mask,
                   cfg.model.n_activated_experts)


def test_keep_sampling_mask_makes_the_ratio_one_and_without_it_the_ratio_is_the_kept_mass():
    cfg, state = _setup()
    eps = _episodes(cfg, state.model, top_p=0.7)
    b = _batch(cfg, eps)
    assert b.keep is not None and not b.keep.all(dim=1).all()           # top-p really truncated
    # one GRPO step at lr = 0: the gradient is real, the weights do not move (the router bias does)
    state.model.train()
    logp, _, mask = token_logprobs(state.model, b.tokens, b.sampled, "sparse", b.routing, b.keep)
    grpo_loss(logp, b.old_logp, b.advantages, mask, LossConfig())[0].backward()
    state.optimizer_step(0.0, lambda what, v: pytest.fail(f"non-finite {what}"))
    state.model.eval()
    with torch.no_grad():
        with_mask, _, mask = token_logprobs(state.model, b.tokens, b.sampled, "sparse", b.routing, b.keep)
        without, _, _ = token_logprobs(state.model, b.tokens, b.sampled, "sparse", b.routing, None)
    ratio_ksm = (with_mask - b.old_logp)[mask].exp()
    ratio_full = (without - b.old_logp)[mask].exp()
    # the kept mass: the full distribution's probability of the engine's kept set at each sampled token
    with torch.no_grad():
        h = state.model(b.tokens[:, :-1], mode="sparse", routing=b.routing, return_hidden=True).hidden[mask]
        kept_mass = (torch.softmax(state.model.head(h).float(), -1) * b.keep).sum(-1)
    print(f"\ntop-p 0.7: ratio with Keep Sampling Mask {ratio_ksm.min():.5f}..{ratio_ksm.max():.5f}; without: "
          f"mean {ratio_full.mean():.4f} (kept mass mean {kept_mass.mean():.4f}, min {kept_mass.min():.4f})")
    torch.testing.assert_close(ratio_ksm, torch.ones_like(ratio_ksm), atol=TOL, rtol=0)
    torch.testing.assert_close(ratio_full, kept_mass, atol=TOL, rtol=0)
    assert ratio_full.mean() < 0.95


def test_keep_routing_matches_the_engine_after_the_router_bias_moved():
    cfg, state = _setup(bias_speed=0.05)
    eps = _episodes(cfg, state.model, top_p=1.0, seed=1)
    b = _batch(cfg, eps, keep_mask=False)
    model = state.model
    model.train()
    with torch.no_grad():                  # a training forward counts expert loads; the update moves the bias
        model(b.tokens[:, :-1], mode="sparse")
    before = [m.gate.bias.clone() for m in model.modules() if hasattr(m, "gate")]
    update_router_bias(model)
    moved = max((m.gate.bias - b0).abs().max().item() for m, b0 in zip(
        [m for m in model.modules() if hasattr(m, "gate")], before))
    assert moved > 0
    model.eval()
    with torch.no_grad():
        replay, _, mask = token_logprobs(model, b.tokens, b.sampled, "sparse", b.routing, None)
        free, _, _ = token_logprobs(model, b.tokens, b.sampled, "sparse", None, None)
        routes = model(b.tokens[:, :-1], mode="sparse", return_routing=True).routing
    changed = np.mean([float((r.sort(-1).values != e.sort(-1).values).any(-1).float().mean())
                       for r, e in zip(routes, b.routing)])
    gap_replay = (replay - b.old_logp)[mask].abs()
    gap_free = (free - b.old_logp)[mask].abs()
    print(f"\nbias moved {moved:.3f}: {100 * changed:.1f}% of token routes changed; |trainer - engine| log-prob "
          f"with Keep Routing max {gap_replay.max():.2e}, without max {gap_free.max():.2e} mean {gap_free.mean():.2e}")
    assert changed > 0
    assert gap_replay.max() < TOL
    assert gap_free.max() > 100 * TOL
