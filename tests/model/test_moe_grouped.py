"""The grouped expert dispatch of `MoE` against the per-expert loop it replaced (`loop_reference`, the oracle):
outputs, gradients of the input, the experts, the router and the shared expert, forced routing, idle experts."""
import pytest
import torch

from dsaforge.model import MoE
from dsaforge.model.moe import grouped_mm, grouped_swiglu, loop_reference as loop_moe_forward
from tests.model.model_helpers import tiny_cfg


def _moe(seed=0, **over):
    cfg = tiny_cfg(**{"n_routed_experts": 16, "n_expert_groups": 4, "n_limited_groups": 2,
                      "n_activated_experts": 4, "moe_inter_dim": 24, **over})
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)   # outputs of order 1, so 1e-6 is a few fp32 ulps
        moe.gate.bias.normal_(0, 0.2)
    return cfg, moe


def _close(a, b) -> bool:
    """Gradients sum the same terms in another order (index backward vs per-expert gathers): allow 1e-6
    relative to the largest entry, a few fp32 ulps at these magnitudes (entries reach ~2)."""
    return bool((a - b).abs().max() <= 1e-6 * max(1.0, float(b.abs().max())))


def _grads(moe, x, y):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    params = [x] + list(moe.parameters())
    return torch.autograd.grad((y * g).sum(), params, allow_unused=True)


@pytest.mark.parametrize("over", [{}, {"n_shared_experts": 0}, {"score_func": "softmax"},
                                  {"n_expert_groups": 1, "n_limited_groups": 1}])
def test_grouped_matches_loop_fp32(over):
    cfg, moe = _moe(**over)
    x = torch.randn(3, 11, cfg.dim, requires_grad=True)
    y_new, i_new, _ = moe(x)
    y_old, i_old = loop_moe_forward(moe, x)
    assert torch.equal(i_new, i_old)
    err = (y_new - y_old).abs()
    print(f"\noutput max {err.max():.2e} mean {err.mean():.2e} (largest entry {y_old.abs().max():.1f})")
    assert err.max() <= 1e-6
    g_new, g_old = _grads(moe, x, y_new), _grads(moe, x, y_old)
    for (name, _), a, b in zip([("x", None)] + list(moe.named_parameters()), g_new, g_old):
        if b is None:              # an expert that got no token: no gradient (zero where weights are stacked)
            assert name.startswith("experts.") and (a is None or not a.any()), name
        else:
            print(f"grad {name}: max {(a - b).abs().max():.2e} (largest entry {b.abs().max():.1f})")
            assert _close(a, b), name


def test_grouped_matches_loop_forced_routing_with_idle_experts():
    cfg, moe = _moe(seed=3)
    x = torch.randn(2, 9, cfg.dim, requires_grad=True)
    # Only experts 0-5 receive tokens, expert 0 the most: idle groups have zero rows in the grouped matmul.
    g = torch.Generator().manual_seed(5)
    forced = torch.stack([torch.cat((torch.zeros(1, dtype=torch.long), 1 + torch.randperm(5, generator=g)[:3]))
                          for _ in range(18)]).view(2, 9, 4)
    y_new, i_new, _ = moe(x, forced)
    y_old, i_old = loop_moe_forward(moe, x, forced)
    assert torch.equal(i_new, forced) and torch.equal(i_old, forced)
    assert (y_new - y_old).abs().max() <= 1e-6
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, a, b in zip(names, _grads(moe, x, y_new), _grads(moe, x, y_old)):
        if b is None:
            # The loop never touched idle experts (no gradient); torch._grouped_mm's stacked weights would give
            # them an exact zero instead, as megatron's grouped GEMM does.
            assert name.startswith("experts.") and int(name.split(".")[1]) > 5 and (a is None or not a.any()), name
        else:
            assert _close(a, b), name


def test_expert_load_counted_once_per_forward():
    cfg, moe = _moe()
    moe.train()
    x = torch.randn(2, 13, cfg.dim)
    moe(x)
    assert moe.expert_load.sum() == 2 * 13 * cfg.n_activated_experts


def test_grouped_mm_against_per_group_matmul():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, 4, generator=g)                          # [E, N, K]
    counts = torch.tensor([3, 0, 2, 0, 4])
    x = torch.randn(int(counts.sum()), 4, generator=g)
    out = grouped_mm(x, list(w), counts.tolist())
    ref = torch.cat([x[s:s + n] @ w[e].T for e, (s, n) in
                     enumerate(zip((counts.cumsum(0) - counts).tolist(), counts.tolist())) if n])
    assert torch.equal(out, ref)
    # no rows at all
    assert grouped_swiglu(x[:0], torch.zeros(5, dtype=torch.long), list(torch.randn(5, 3, 4)),
                          list(torch.randn(5, 3, 4)), list(torch.randn(5, 4, 3))).shape == (0, 4)


def test_grouped_under_cpu_autocast_close_to_loop():
    cfg, moe = _moe()
    x = torch.randn(2, 10, cfg.dim)
    with torch.autocast("cpu", torch.bfloat16):
        y_new, _, _ = moe(x)
        y_old, _ = loop_moe_forward(moe, x)
    assert y_new.dtype == y_old.dtype
    scale = y_old.float().abs().max()
    assert (y_new.float() - y_old.float()).abs().max() <= 2e-2 * scale
