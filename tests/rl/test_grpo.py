"""GRPO's pure functions against hand-computed values and exact expectations (paper Eq. 5-9).

Run: python -m pytest tests/rl/test_grpo.py -q      (a few seconds on CPU)
"""
import math

import pytest
import torch

from dsaforge.model.rl.grpo import (LossConfig, aggregate, clipped_surrogate, group_advantages, grpo_loss, k3,
                                    keep_mask_from_sets, kept_logprobs, opsm_keep, unbiased_kl)



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons in double precision, restored afterwards (the default dtype is process-wide)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_group_advantage_is_mean_centred_and_optionally_std_normalised():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(group_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))
    # std (unbiased, over 4): group 1 sqrt(1/3), group 2 0.5
    want = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.5, 0.5, 0.5, -1.5]]) / torch.tensor([[math.sqrt(1 / 3)], [1.0]])
    assert torch.allclose(group_advantages(r, std_normalize=True, eps=0.0), want)
    assert torch.equal(group_advantages(torch.ones(2, 3)), torch.zeros(2, 3))      # all-equal groups teach nothing
    with pytest.raises(ValueError, match="group >= 2"):
        group_advantages(torch.ones(3))


def test_the_three_aggregations_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(v, m, "sequence").item() == pytest.approx((6 / 3 + 4 / 1) / 2)     # 3.0
    assert aggregate(v, m, "token").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "dr_grpo").item() == pytest.approx(10 / (2 * 4))
    assert aggregate(v, m, "dr_grpo", max_len=10).item() == pytest.approx(10 / 20)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(v, m, "mean")


def test_ppo_clip_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    obj, ratio = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert torch.allclose(ratio, torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    assert torch.allclose(obj, torch.tensor([[0.5, 0.9, 1.1, 1.28]]))            # A > 0: capped above at 1 + eps_high
    obj, _ = clipped_surrogate(logp, old, torch.tensor([-2.0]), 0.2, 0.28)
    assert torch.allclose(obj, torch.tensor([[-1.6, -1.8, -2.2, -3.0]]))         # A < 0: floored at 1 - eps_low


def test_k3_and_unbiased_kl_values_by_hand():
    logp, ref = torch.log(torch.tensor([0.2])), torch.log(torch.tensor([0.5]))
    rho = 0.5 / 0.2
    assert k3(logp, ref).item() == pytest.approx(rho - math.log(rho) - 1)
    old = torch.log(torch.tensor([0.4]))
    assert unbiased_kl(logp, old, ref).item() == pytest.approx(0.2 / 0.4 * (rho - math.log(rho) - 1))


def _expected_grad(estimator, theta, sampler_probs):
    """Exact E_{x ~ sampler}[grad estimator(x)] on a categorical: sum_x sampler(x) * grad estimator(x)."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (sampler_probs.detach() * estimator(logp)).sum().backward()
    return theta.grad


def test_unbiased_kl_gradient_is_the_exact_kl_gradient_and_plain_k3_is_not():
    g = torch.Generator().manual_seed(0)
    theta, theta_old, phi = (torch.randn(7, generator=g) for _ in range(3))
    ref = torch.log_softmax(phi, -1)
    old = torch.log_softmax(theta_old, -1)

    exact = theta.clone().requires_grad_(True)
    p = torch.softmax(exact, -1)
    (p * (torch.log(p) - ref)).sum().backward()                                    # KL(pi_theta || pi_ref)
    exact_grad = exact.grad

    # off-policy: samples from pi_old, ratio pi_theta / pi_old not detached
    g_unbiased = _expected_grad(lambda lp: unbiased_kl(lp, old, ref), theta, old.exp())
    assert torch.allclose(g_unbiased, exact_grad, atol=1e-12), (g_unbiased, exact_grad)
    # on-policy: pi_old = pi_theta (detached), the ratio is 1 in value but keeps the score-function term
    on = lambda lp: unbiased_kl(lp, lp.detach(), ref)
    g_on = _expected_grad(on, theta, torch.softmax(theta, -1))
    assert torch.allclose(g_on, exact_grad, atol=1e-12)

    # plain K3 sampled on-policy: its gradient is that of the reverse KL(pi_ref || pi_theta), not the KL
    g_k3 = _expected_grad(lambda lp: k3(lp, ref), theta, torch.softmax(theta, -1))
    print(f"\n|grad KL| {exact_grad.norm():.4f}; unbiased error {(g_unbiased - exact_grad).norm():.2e}; "
          f"plain K3 error {(g_k3 - exact_grad).norm():.4f}")
    assert (g_k3 - exact_grad).norm() > 0.1 * exact_grad.norm()
    reverse = theta.clone().requires_grad_(True)
    (ref.exp() * (ref - torch.log_softmax(reverse, -1))).sum().backward()
    assert torch.allclose(g_k3, reverse.grad, atol=1e-12)

    # a Monte-Carlo check of the same claim: 200k samples from pi_old
    x = torch.multinomial(old.exp(), 200_000, replacement=True, generator=g)
    mc = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(mc, -1)[x]
    unbiased_kl(lp, old[x], ref[x]).mean().backward()
    assert torch.allclose(mc.grad, exact_grad, atol=0.02)


def test_opsm_masks_exactly_the_negative_advantage_sequences_that_drifted_past_delta():
    delta = 0.1
    logp = torch.zeros(6, 4)
    old = torch.zeros(6, 4)
    mask = torch.ones(6, 4)
    adv = torch.tensor([-1.0, -1.0, 1.0, 0.0, -0.5, -0.5])
    old[0] = 0.15                      # mean log(pi_old/pi_theta) 0.15 > delta, A < 0 -> masked
    old[1] = 0.05                      # drift below delta                           -> kept
    old[2] = 0.3                       # drifted, but A > 0                          -> kept
    old[3] = 0.3                       # drifted, A = 0                              -> kept
    old[4, 0] = 0.36                   # one token far off, mean 0.09 <= delta       -> kept (per sequence, not token)
    old[5, :2] = 0.25                  # mean over its 2 real tokens 0.25 > delta    -> masked
    old[5, 2:] = -5.0                  # ... padding, which must not count
    mask[5, 2:] = 0
    keep = opsm_keep(adv, old, logp, mask, delta)
    assert keep.tolist() == [False, True, True, True, True, False]

    # in the loss, a masked sequence's policy term is gone but its KL term stays
    logp = logp.clone().requires_grad_(True)
    ref = torch.full((6, 4), -0.5)
    loss, stats = grpo_loss(logp, old, adv, mask, LossConfig(opsm_delta=delta), ref_logp=ref, kl_coef=torch.zeros(6))
    loss.backward()
    assert torch.all(logp.grad[0] == 0) and torch.all(logp.grad[5] == 0)
    assert torch.all(logp.grad[1] != 0)
    assert stats["opsm_fraction"].item() == pytest.approx(2 / 6)
    logp.grad = None
    loss, _ = grpo_loss(logp, old, adv, mask, LossConfig(opsm_delta=delta), ref_logp=ref, kl_coef=torch.ones(6))
    loss.backward()
    assert torch.all(logp.grad[0] != 0)                         # the KL term is never masked
    logp.grad = None
    grpo_loss(logp, old, adv, mask, LossConfig(opsm=False))[0].backward()
    assert torch.all(logp.grad[0] != 0)                         # the switch turns it off (ratio 0.86: not clipped)


def test_grpo_loss_value_and_gradient_by_hand():
    # two sequences of 2 tokens, on-policy (ratio 1): policy loss = -mean_i A_i, d/dlogp_it = -A_i / (|o_i| B)
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]])).requires_grad_(True)
    old = logp.detach().clone()
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.5, 1.0]]))
    adv = torch.tensor([1.0, -1.0])
    beta = torch.tensor([0.1, 0.0])                                 # the second sequence's domain has no KL
    loss, stats = grpo_loss(logp, old, adv, torch.ones(2, 2), LossConfig(), ref_logp=ref, kl_coef=beta)
    k3_00 = 0.5 - math.log(0.5) - 1                                  # rho = 0.25 / 0.5
    assert stats["policy_loss"].item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(0.1 * (k3_00 + 0.0) / 2 / 2)
    loss.backward()
    # KL part: beta * d/dlogp [r * k3] at r = 1 = beta * (k3 + 1 - rho) = beta * (log pi - log ref); / (|o| B)
    want = torch.tensor([[-1 / 4 + 0.1 * math.log(2) / 4, -1 / 4], [1 / 4, 1 / 4]])
    assert torch.allclose(logp.grad, want)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_keep_sampling_mask_renormalises_over_the_kept_set():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    keep = torch.tensor([[True, True, False, False]])
    lp, ent = kept_logprobs(logits, torch.tensor([1]), keep)
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    assert lp.item() == pytest.approx(math.log(p[1].item()))
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item())
    full, _ = kept_logprobs(logits, torch.tensor([1]), None)
    assert full.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    sets = keep_mask_from_sets(torch.tensor([0, 1, 3]), torch.tensor([0, 2, 3, 3]), 4)
    assert sets.tolist() == [[True, True, False, False], [False, False, False, True], [True] * 4]
