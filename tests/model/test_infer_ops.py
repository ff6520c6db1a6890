"""The inference path's fused forms of the model's ops (`model.infer`) equal the training layers' own."""
import pytest
import torch

from dsaforge.model.infer import bmm_f32, rms, rope_half, rope_interleaved
from dsaforge.model.layers import RMSNorm, rope_tables, rotate
from tests.model.model_helpers import tiny_cfg


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_and_norm_forms_equal_the_layers(dtype, tol):
    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(tiny_cfg(), "cpu")
    pos = torch.randint(0, cos.shape[0], (3, 5), generator=g)                          # per row and token
    cis = torch.complex(cos[pos], sin[pos])
    x = torch.randn(3, 5, 4, 2 * cos.shape[1], generator=g).to(dtype)               # [B, S, H, R]
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]
    for interleaved, fn in ((True, rope_interleaved), (False, rope_half)):
        want = rotate(x, c, s, interleaved)
        got = fn(x, cis)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)
    # a strided slice, as q_pe is of the query projection
    wide = torch.randn(3, 5, 4, 3 * cos.shape[1], generator=g).to(dtype)
    torch.testing.assert_close(rope_interleaved(wide[..., cos.shape[1]:], cis).float(),
                               rotate(wide[..., cos.shape[1]:], c, s, True).float(), atol=tol, rtol=0)
    norm = RMSNorm(x.shape[-1]).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(x.shape[-1], generator=g))
        torch.testing.assert_close(rms(norm, x).float(), norm(x).float(), atol=tol, rtol=tol)
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
