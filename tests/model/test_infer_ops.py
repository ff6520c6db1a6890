"""The ops the training layers and the inference path share (`layers.rotate`, `layers.RMSNorm`, `infer.bmm_f32`)
against plain statements of their math."""
import pytest
import torch

from dsaforge.model.infer import bmm_f32
from dsaforge.model.layers import RMSNorm, rope_tables, rotate
from tests.model.model_helpers import tiny_cfg


def _rotate_pairs(x, c, s, interleaved):
    """The rotation in real arithmetic: pairs (x0, x1), ... (interleaved) or (x_i, x_{i+R/2})."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rotation_norm_and_product_equal_their_math(dtype, tol):
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(tiny_cfg(), "cpu")
    pos = torch.randint(0, cos.shape[0], (3, 5), generator=g)                          # per row and token
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    cis = torch.complex(c, s)
    x = torch.randn(3, 5, 4, 2 * cos.shape[1], generator=g).to(dtype)               # [B, S, H, R]
    for interleaved in (True, False):
        got = rotate(x, cis, interleaved)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got.float(), _rotate_pairs(x, c, s, interleaved), atol=tol, rtol=0)
    # a strided slice, as q_pe is of the query projection
    wide = torch.randn(3, 5, 4, 3 * cos.shape[1], generator=g).to(dtype)
    torch.testing.assert_close(rotate(wide[..., cos.shape[1]:], cis, True).float(),
                               _rotate_pairs(wide[..., cos.shape[1]:], c, s, True), atol=tol, rtol=0)
    for w_dtype in {dtype, torch.float32}:          # the weight in x's dtype, and fp32 master weights
        norm = RMSNorm(x.shape[-1]).to(w_dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(x.shape[-1], generator=g))
            xf = x.float()
            want = norm.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
            got = norm(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    a, b = torch.randn(2, 3, 4, generator=g).to(dtype), torch.randn(2, 4, 6, generator=g).to(dtype)
    assert bmm_f32(a, b).dtype == torch.float32
    torch.testing.assert_close(bmm_f32(a, b), a.float() @ b.float())


@pytest.mark.parametrize("n", [1, 3, 17])
def test_all_experts_equals_the_moe_loop(n):
    """The dense decode form of the routed (and shared) experts equals MoE's one-matmul-per-expert oracle."""
    from dsaforge.model.infer import all_experts, stack
    from dsaforge.model.moe import loop_reference
    from tests.model.model_helpers import make_model

    model = make_model(seed=3)
    moe = next(b.ffn for b in model.layers if b.ffn.__class__.__name__ == "MoE")
    x = torch.randn(1, n, model.cfg.dim, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, idx = loop_reference(moe, x)
        weights, indices, _ = moe.gate(x[0])
        ex = stack(moe)
        assert ex.with_shared and ex.w1.shape[0] == moe.n_experts + 1
        got = all_experts(x[0], weights, indices, ex)
    assert torch.equal(indices, idx[0])
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
