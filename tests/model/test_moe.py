"""DeepSeekMoE against a per-token naive router/mixture; forced routing; balancing bias; sequence-wise aux loss."""
import pytest
import torch

from dsaforge.model import Gate, MoE
from dsaforge.model.moe import expert_counts
from tests.model.model_helpers import tiny_cfg


def _moe(seed=0, **over):
    cfg = tiny_cfg(**{"n_routed_experts": 16, "n_expert_groups": 4, "n_limited_groups": 2,
                      "n_activated_experts": 4, "moe_inter_dim": 16, **over})
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.bias.normal_(0, 0.2)
    return cfg, moe


def naive_route(cfg, gate, x):
    """Per token: sigmoid scores, group rank by top-2 biased sum, top-k among kept groups, normalised * scale."""
    out_w, out_i = [], []
    per = cfg.n_routed_experts // cfg.n_expert_groups
    for t in range(x.shape[0]):
        logits = gate.weight @ x[t]
        if cfg.score_func == "sigmoid":
            s = torch.sigmoid(logits)
            sb = s + gate.bias
            gscore = [sorted(sb[g * per:(g + 1) * per].tolist())[-2:] for g in range(cfg.n_expert_groups)]
            gscore = [sum(v) for v in gscore]
        else:
            s = torch.softmax(logits, -1)
            sb = s
            gscore = [sb[g * per:(g + 1) * per].max().item() for g in range(cfg.n_expert_groups)]
        groups = sorted(range(cfg.n_expert_groups), key=lambda g: -gscore[g])[:cfg.n_limited_groups]
        cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda e: -sb[e].item())[:cfg.n_activated_experts]
        w = s[chosen]
        if cfg.score_func == "sigmoid":
            w = w / w.sum()
        out_w.append(w * cfg.route_scale)
        out_i.append(torch.tensor(chosen))
    return torch.stack(out_w), torch.stack(out_i)


def _sorted(w, i):
    order = i.argsort(-1)
    return w.gather(-1, order), i.gather(-1, order)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_matches_naive_group_limited_routing(score_func):
    cfg, moe = _moe(score_func=score_func)
    x = torch.randn(40, cfg.dim)
    w, i, _ = moe.gate(x)
    rw, ri = naive_route(cfg, moe.gate, x)
    w, i = _sorted(w, i)
    rw, ri = _sorted(rw, ri)
    assert torch.equal(i, ri)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
    per = cfg.n_routed_experts // cfg.n_expert_groups
    assert max(len(set((row // per).tolist())) for row in i) <= cfg.n_limited_groups


def test_moe_matches_naive_per_token_mixture():
    cfg, moe = _moe()
    x = torch.randn(2, 7, cfg.dim)
    y, idx, aux = moe(x)
    rw, ri = naive_route(cfg, moe.gate, x.view(-1, cfg.dim))
    flat = x.view(-1, cfg.dim)
    ref = torch.stack([sum(rw[t, j] * moe.experts[ri[t, j]](flat[t]) for j in range(cfg.n_activated_experts))
                       + moe.shared_experts(flat[t]) for t in range(flat.shape[0])]).view_as(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert idx.shape == (2, 7, cfg.n_activated_experts) and aux is None


def test_forced_routing_reproduces_output_and_keeps_router_gradient():
    cfg, moe = _moe()
    x = torch.randn(2, 7, cfg.dim)
    y, idx, _ = moe(x)
    with torch.no_grad():
        moe.gate.bias.normal_(0, 5.0)               # would now pick different experts
    y_free, idx_free, _ = moe(x)
    assert not torch.equal(idx_free, idx)
    y_forced, idx_forced, _ = moe(x, forced=idx)
    assert torch.equal(idx_forced, idx)
    torch.testing.assert_close(y_forced, y, atol=1e-6, rtol=1e-6)   # bias never enters the weights
    y_forced.square().sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_bias_update_moves_towards_balance():
    cfg, moe = _moe(bias_update_speed=0.01)
    moe.train()
    before = moe.gate.bias.clone()
    moe(torch.randn(2, 30, cfg.dim))
    load = moe.expert_load.clone()
    assert load.sum() == 2 * 30 * cfg.n_activated_experts
    moe.update_bias()
    expected = before + 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.gate.bias, expected)
    assert moe.expert_load.sum() == 0
    moe.eval()
    moe(torch.randn(1, 4, cfg.dim))
    assert moe.expert_load.sum() == 0                 # evaluation does not count load


def test_sequence_aux_loss_matches_formula():
    cfg, moe = _moe(seq_aux_loss_alpha=0.01)
    x = torch.randn(3, 9, cfg.dim)
    _, idx, aux = moe(x)
    e, k = cfg.n_routed_experts, cfg.n_activated_experts
    ref = 0.0
    for b in range(3):
        s = torch.sigmoid(x[b] @ moe.gate.weight.T)                            # [S, E]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.tensor([(idx[b] == i).sum().item() for i in range(e)], dtype=torch.float) * e / (k * 9)
        ref += 0.01 * (f * p).sum()
    torch.testing.assert_close(aux, ref / 3)


def test_gate_bias_is_a_buffer_not_a_parameter():
    cfg, moe = _moe()
    names = {n for n, _ in moe.named_parameters()}
    assert "gate.bias" not in names and "gate.bias" in moe.state_dict()
    assert isinstance(moe.gate, Gate)


def test_expert_counts_equal_bincount_and_an_empty_load_moves_no_bias():
    idx = torch.randint(0, 8, (5, 7, 3))
    counts = expert_counts(idx, 8)
    assert counts.dtype == torch.long and torch.equal(counts, torch.bincount(idx.flatten(), minlength=8))
    assert torch.equal(expert_counts(idx[:0], 8), torch.zeros(8, dtype=torch.long))
    cfg, moe = _moe(bias_update_speed=0.01)
    before = moe.gate.bias.clone()
    moe.update_bias()                                 # nothing counted since the last update
    assert torch.equal(moe.gate.bias, before)


def test_a_validity_mask_leaves_padding_out_of_the_load_and_the_balance_loss():
    """Rows padded to a common width: only the valid positions count in expert_load and the sequence-wise balance
    loss, which then equal those of the unpadded rows, each on its own."""
    cfg, moe = _moe(seq_aux_loss_alpha=0.01)
    moe.train()
    lengths = [9, 4, 0]                                    # the last row is all padding
    x = torch.randn(3, 9, cfg.dim)
    valid = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    y, idx, aux = moe(x, valid=valid)
    padded = moe.expert_load.clone()
    moe.expert_load.zero_()
    alone = []
    for b, n in enumerate(lengths[:2]):
        y_b, idx_b, aux_b = moe(x[b:b + 1, :n])
        assert torch.equal(idx_b[0], idx[b, :n])
        alone.append(aux_b)
    assert torch.equal(padded, moe.expert_load) and padded.sum() == sum(lengths) * cfg.n_activated_experts
    torch.testing.assert_close(aux, torch.stack(alone).mean())        # the empty row is left out of the mean
    # the count stays a scatter-add (no host sync) and equals bincount over the valid tokens
    assert torch.equal(expert_counts(idx, cfg.n_routed_experts, valid),
                       torch.bincount(idx[valid].flatten(), minlength=cfg.n_routed_experts))
    moe.expert_load.zero_()
    moe(x)                                                 # without a mask every position counts
    assert moe.expert_load.sum() == 27 * cfg.n_activated_experts
