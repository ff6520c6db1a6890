"""GPU checks (bf16/fp8 numerics, poisoned outputs, float64 references) and a training step on the GPU.

Run on one GPU: pytest -m gpu tests/kernels -rA
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from dsaforge.kernels import checks


def _show(res):
    print(res)
    return res


@pytest.mark.parametrize("shape", ["v32", "small"])
def test_sparse_mla_fwd_bwd(shape):
    res = _show(checks.check_sparse_mla(shape))
    assert res["passed"], res


@pytest.mark.parametrize("schedule", [("pingpong", 2), ("serial", 2), ("prefetch", 2), ("ws3", 3)])
def test_sm90_forward_schedules(schedule):
    """Every Hopper forward schedule against float64 at V3.2's shape (empty slots, an empty row, poisoned outputs)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is for sm_90")
    res = _show(checks.check_sparse_mla_fwd_config(("sm90", 64, schedule[1], schedule[0])))
    assert res["passed"], res


@pytest.mark.parametrize("h,k,config", [(128, 2048, None), (64, 2048, None), (128, 512, None), (64, 256, None),
                                        (128, 2048, ("sm90", 64, 1)), (128, 2048, ("sm90-fused", 64, 128)),
                                        (64, 256, ("sm90-fused", 64, 128)), (128, 512, ("sm90-fused", 64, 64))])
def test_sm90_backward(h, k, config):
    """The backward with the Hopper dq kernel (or that kernel forming dKV too) against float64 and against the
    Triton split backward (empty slots, a row with no valid key, head-major dO, rows in chunks), at 64 and 128 heads
    and a few top-k."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon backward is for sm_90")
    res = _show(checks.check_sparse_mla_bwd_sm90(h, k, config))
    assert res["passed"], res


@pytest.mark.parametrize("shape,sm90", [("v32", "1"), ("v32", "0"), ("small", "1")])
def test_sparse_mla_forward_with_kl_target(monkeypatch, shape, sm90):
    """The KL target from the forward's own probabilities (Hopper `prefetch` kernel with stored P at V3.2's shape,
    the Triton kernel otherwise) against float64."""
    monkeypatch.setenv("DSAFORGE_SM90_FWD", sm90)
    res = _show(checks.check_sparse_mla_target(shape))
    assert res["passed"], res


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_kernel_matches_the_torch_rotation(interleaved):
    """The one-pass rotary kernel on bf16 against the torch rotation, at MLA's q rope slice shape (128 heads)."""
    from dsaforge.kernels import last_path, rope
    from dsaforge.kernels.rope import reference
    full = torch.randn(1, 4096, 128, 192, device="cuda", dtype=torch.bfloat16)
    x = full[..., 128:].requires_grad_()
    angles = torch.rand(4096, 32, device="cuda") * 100
    got = rope(x, angles.cos(), angles.sin(), interleaved)
    assert last_path("rope")[0] == "triton"
    want = reference(x.detach().double(), angles.cos().double(), angles.sin().double(), interleaved)
    g = torch.randn_like(got)
    (dx,) = torch.autograd.grad(got, x, g)
    xr = x.detach().double().requires_grad_()
    (dxr,) = torch.autograd.grad(reference(xr, angles.cos().double(), angles.sin().double(), interleaved), xr,
                                 g.double())
    errs = [checks.rel_err(got, want), checks.rel_err(dx, dxr)]
    print("rope rel err fwd/bwd", errs)
    assert max(errs) <= checks.BF16_TOL


@pytest.mark.parametrize("shape", ["v32", "small"])
def test_sparse_decode(shape):
    res = _show(checks.check_decode(shape))
    assert res["passed"], res


def test_topk_exact_at_128k():
    res = _show(checks.check_topk())
    assert res["passed"], res


def test_fp8_quantization_bit_identical():
    res = _show(checks.check_act_quant())
    assert res["passed"], res


@pytest.mark.parametrize("shape", ["v32", "small"])
def test_indexer_topk(shape):
    res = _show(checks.check_indexer(shape))
    assert res["passed"], res


@pytest.mark.parametrize("shape", ["v32", "small"])
def test_attention_lse(shape):
    res = _show(checks.check_attention_lse(shape))
    assert res["passed"], res


@pytest.mark.parametrize("shape", ["v32", "small"])
def test_indexer_kl(shape):
    res = _show(checks.check_kl(shape))
    assert res["passed"], res


def _step(monkeypatch, tiny_dsa, kernels, indices):
    monkeypatch.setenv("DSAFORGE_KERNELS", kernels)
    torch.manual_seed(3)
    layer = tiny_dsa(dim=256, heads=16, d_v=256, d_pe=64, idx_heads=16, idx_dim=128, top_k=128)
    layer = layer.cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(2, 1024, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    losses = []
    for _ in range(3):
        out, kl, idx = layer(x, indices)
        loss = torch.nn.functional.mse_loss(out.float(), y.float()) + kl
        opt.zero_grad()
        loss.backward()
        if not losses:
            grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
        opt.step()
        losses.append(loss.item())
        indices = idx if indices is None else indices
    return losses, grads, indices


def test_training_step_on_gpu(monkeypatch, tiny_dsa):
    from dsaforge.kernels import last_path
    losses, grads, idx = _step(monkeypatch, tiny_dsa, "", None)
    assert last_path("sparse_mla_bwd")[0] == "triton" and last_path("indexer_kl")[0] == "triton"
    ref_losses, ref_grads, _ = _step(monkeypatch, tiny_dsa, "reference", idx)
    print("losses fused", losses, "reference", ref_losses)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - ref_losses[0]) <= 1e-2 * abs(ref_losses[0])
    for name, g in grads.items():
        r = ref_grads[name]
        rel = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
        print(f"grad {name}: rel err {rel:.3e}")
        assert torch.isfinite(g).all() and rel <= 2e-2, name
