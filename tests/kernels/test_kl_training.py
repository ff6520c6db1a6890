"""Indexer KL (sparse stage and dense warm-up) and a training step through the fused autograd path."""
import pytest
import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import KernelInputError, indexer_kl, last_path, sparse_mla

B, S, T, HI, DI, H, DV, DPE, K, SCALE = 2, 6, 24, 4, 16, 3, 32, 8, 8, 0.2


def _inputs(h=H):
    iq = torch.randn(B, S, HI, DI, requires_grad=True)
    ik = torch.randn(B, T, DI, requires_grad=True)
    w = torch.randn(B, S, HI, requires_grad=True)
    q, kv = torch.randn(B, S, h, DV + DPE), torch.randn(B, T, DV + DPE)
    return iq, ik, w, q, kv


def _sparse_indices():
    _, end = ref.key_bounds(S, T)
    rows = []
    for s in range(S):
        n = int(end[s])
        sel = torch.randperm(n)[:K]
        rows.append(torch.cat([sel, torch.full((K - sel.numel(),), -1)]))
    return torch.stack(rows)[None].expand(B, -1, -1).contiguous().int()


def _dense_lse(q, kv):
    start, end = ref.key_bounds(S, T)
    logits = torch.einsum("bshd,btd->bsht", q, kv) * SCALE
    mask = ref.bounds_mask(start, end, T)[None, :, None, :]
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1)


def _attention(mode, q, kv):
    """The top-k (None: dense) and the attention LSE the KL's target comes from."""
    if mode == "sparse":
        idx = _sparse_indices()
        return idx, ref.sparse_mla(q, kv, idx, SCALE, DV)[1]
    return None, _dense_lse(q, kv)


@pytest.mark.parametrize("mode,heads", [("sparse", H), ("dense", H), ("sparse", 80)])
def test_indexer_kl_forward_backward(interpret, report, mode, heads):
    iq, ik, w, q, kv = _inputs(heads)
    idx, lse = _attention(mode, q, kv)
    grad_rows = torch.rand(B, S)
    loss = indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx)
    assert last_path("indexer_kl")[0] == "triton"
    got = torch.autograd.grad(loss, (iq, ik, w), grad_rows)
    target = ref.attention_target(q.double(), kv.double(), lse.double(), SCALE, idx)
    leaves = [x.detach().double().requires_grad_() for x in (iq, ik, w)]
    want_loss = ref.indexer_kl(*leaves, target.double(), idx)
    want = torch.autograd.grad(want_loss, leaves, grad_rows.double())
    assert report(f"{mode} loss", loss, want_loss) < 1e-4
    for name, g, r in zip(("d index_q", "d index_k", "d index_w"), got, want):
        assert report(f"{mode} {name}", g, r) < 1e-4


def test_target_is_a_distribution():
    _, _, _, q, kv = _inputs()
    idx = _sparse_indices()
    lse = ref.sparse_mla(q, kv, idx, SCALE, DV)[1]
    p = ref.attention_target(q, kv, lse, SCALE, idx)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, S))
    assert (p[idx < 0] == 0).all()


def _train_step(monkeypatch, tiny_dsa, kernels: str):
    monkeypatch.setenv("DSAFORGE_KERNELS", kernels)
    torch.manual_seed(1)
    layer = tiny_dsa()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x, y = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    out, kl, _ = layer(x)
    loss = torch.nn.functional.mse_loss(out, y) + kl
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    return loss.detach(), grads, layer


def test_training_step_through_fused_kernels(interpret, monkeypatch, report, tiny_dsa):
    loss, grads, layer = _train_step(monkeypatch, tiny_dsa, "interpret")
    assert last_path("sparse_mla_fwd")[0] == "triton" and last_path("sparse_mla_bwd")[0] == "triton"
    assert last_path("indexer_topk")[0] == "triton" and last_path("indexer_kl")[0] == "triton"
    want_loss, want_grads, _ = _train_step(monkeypatch, tiny_dsa, "reference")
    assert last_path("sparse_mla_fwd")[0] == "reference"
    assert report("loss", loss, want_loss) < 1e-5
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        assert report(f"grad {name}", g, want_grads[name]) < 1e-4


@pytest.mark.parametrize("heads", [H, 80])
def test_sparse_target_mass_kernel(interpret, report, heads):
    from dsaforge.kernels.kl import sparse_target_mass
    _, _, _, q, kv = _inputs(heads)
    idx = _sparse_indices()
    lse = ref.sparse_mla(q, kv, idx, SCALE, DV)[1]
    mass = sparse_target_mass(q, kv, lse, idx, SCALE, DV)
    want = ref.attention_target(q.double(), kv.double(), lse.double(), SCALE, idx)
    assert report("target", mass / mass.sum(-1, keepdim=True), want) < 1e-5


def test_memo_lets_a_recomputation_skip_both_kernels(interpret, monkeypatch):
    """indexer_kl(..., memo=d) twice on the same inputs (a forward and its checkpoint recomputation): the second call
    launches neither the target nor the loss kernel, returns its own tensor, and its backward is the plain call's."""
    from dsaforge.kernels import kl
    iq, ik, w, q, kv = _inputs()
    idx = _sparse_indices()
    lse = ref.sparse_mla(q, kv, idx, SCALE, DV)[1]
    launches = {"target": 0, "kernel": 0}
    real_target, real_launch = kl.sparse_target_mass, kl._launch

    def target(*a, **k):
        launches["target"] += 1
        return real_target(*a, **k)

    def launch(*a, **k):
        launches["kernel"] += 1
        return real_launch(*a, **k)

    monkeypatch.setattr(kl, "sparse_target_mass", target)
    monkeypatch.setattr(kl, "_launch", launch)
    grad_rows = torch.rand(B, S)
    plain = torch.autograd.grad(indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx), (iq, ik, w), grad_rows)
    assert launches == {"target": 1, "kernel": 2}                       # forward (target + loss), backward
    memo = {}
    first = indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, memo=memo)
    again = indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, memo=memo)
    assert launches == {"target": 2, "kernel": 3}                       # the second call launched nothing
    assert again is not first and torch.equal(again, first)
    for g, p in zip(torch.autograd.grad(again, (iq, ik, w), grad_rows), plain):
        assert torch.equal(g, p)


def test_target_from_the_forward_launches_no_target_kernel(interpret, monkeypatch, report):
    """indexer_kl(..., target=mass) with the mass sparse_mla's forward returned: no target kernel runs, and loss and
    gradients equal the call that computes its own target (and the float64 reference)."""
    from dsaforge.kernels import kl
    iq, ik, w, q, kv = _inputs()
    idx = _sparse_indices()
    _, lse, mass = sparse_mla(q, kv, idx, SCALE, DV, target=True)
    own = indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx)
    want = torch.autograd.grad(own.sum(), (iq, ik, w))
    monkeypatch.setattr(kl, "sparse_target_mass", lambda *a, **k: pytest.fail("the target kernel ran"))
    given = indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, target=mass)
    assert last_path("indexer_kl")[0] == "triton"
    assert report("loss", given, own) < 1e-5
    for g, r in zip(torch.autograd.grad(given.sum(), (iq, ik, w)), want):
        assert report("grad", g, r) < 1e-5
    with pytest.raises(KernelInputError, match="target must be"):
        indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, target=mass[:, :1])


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_backward_starts_from_the_forwards_row_statistics(interpret, mode):
    """The backward reads each row's statistics (indexer LSE, target mass) from the forward instead of streaming
    the keys again: shifting the saved LSE shifts the gradient, and the untouched statistics reproduce it."""
    iq, ik, w, q, kv = _inputs()
    idx, lse = _attention(mode, q, kv)
    grad_rows = torch.rand(B, S)
    plain = torch.autograd.grad(indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx), (iq, ik, w), grad_rows)
    memo = {}
    indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, memo=memo)
    assert tuple(memo["stats"].shape) == (B, S, 2)
    same = torch.autograd.grad(indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, memo=memo), (iq, ik, w),
                               grad_rows)
    for g, p in zip(same, plain):
        assert torch.equal(g, p)
    memo["stats"][..., 0] += 1.0            # softmax(I) scaled by e^-1: a different gradient if it is read
    shifted = torch.autograd.grad(indexer_kl(iq, ik, w, q, kv, lse, SCALE, DV, indices=idx, memo=memo), (iq, ik, w),
                                  grad_rows)
    assert not torch.allclose(shifted[2], plain[2])
