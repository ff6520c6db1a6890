"""The one-pass rotary kernel through Triton's interpreter against the model's torch rotation (`layers.apply_rope`
on CPU)."""
import pytest
import torch

from dsaforge.kernels import last_path, rope
from dsaforge.model.layers import apply_rope as _model_rotation    # CPU tensors: the torch rotation


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("heads", [None, 3, 20])
def test_rope_matches_the_model_rotation_and_its_gradient(interpret, report, interleaved, heads):
    b, s, d = 2, 7, 16
    # the rope slice of a wider projection, as MLA's q_pe is: strided rows, unit last stride
    full = torch.randn(b, s, *(() if heads is None else (heads,)), 3 * d)
    x = full[..., 2 * d:].requires_grad_()
    angles = torch.rand(s, d // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    got = rope(x, cos, sin, interleaved)
    assert last_path("rope")[0] == "triton" and got.is_contiguous() and got.shape == x.shape
    xr = x.detach().clone().requires_grad_()
    want = _model_rotation(xr, cos, sin, interleaved)
    assert report("rope", got, want) < 1e-6
    g = torch.randn_like(got)
    (dx,) = torch.autograd.grad(got, x, g, retain_graph=True)
    (dxr,) = torch.autograd.grad(want, xr, g)
    assert report("d rope", dx, dxr) < 1e-6
    # a rotation keeps norms: its inverse (the backward) undoes it
    assert report("inverse", torch.autograd.grad(got, x, got.detach())[0], x.detach()) < 1e-5


def test_rope_falls_back_on_cpu_and_checks_shapes():
    x = torch.randn(1, 4, 2, 8)
    angles = torch.rand(4, 4)
    got = rope(x, angles.cos(), angles.sin(), True)
    assert last_path("rope")[0] == "reference"
    assert torch.allclose(got, _model_rotation(x, angles.cos(), angles.sin(), True), atol=1e-6)
    from dsaforge.kernels import KernelInputError
    with pytest.raises(KernelInputError, match="cos/sin must be"):
        rope(x, angles[:3].cos(), angles[:3].sin(), True)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_into_a_slice_of_a_larger_tensor(interpret, report, inverse):
    """rope_into writes the rotation (or its inverse) into a strided slice and leaves the rest untouched."""
    from dsaforge.kernels import rope_into
    x = torch.randn(2, 5, 3, 8)
    angles = torch.rand(5, 4) * 6
    out = torch.full((2, 5, 3, 20), 7.0)
    rope_into(out[..., 12:], x, angles.cos(), angles.sin(), True, inverse=inverse)
    assert last_path("rope")[0] == "triton"
    want = _model_rotation(x, angles.cos(), -angles.sin() if inverse else angles.sin(), True)
    assert report("rope_into", out[..., 12:], want) < 1e-6
    assert (out[..., :12] == 7.0).all()
