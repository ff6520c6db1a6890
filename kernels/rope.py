"""Rotary embedding in one pass: x [B, S, (H,) D] rotated by cos/sin [S, D/2], fp32 math, out in x's dtype.

The torch form (`reference.rotate`: the model's CPU path and the reference here) runs it as an fp32 copy of x, a
complex multiply and a cast back, three kernels that each read and write the whole tensor; at 128 heads and 64K tokens
MLA's rope part is 0.5G elements a layer, and it runs in the forward, the recomputation and (transposed) the backward.
This kernel reads x once (any strides with a unit last one, e.g. the rope slice of a projection) and writes the
rotated result once, contiguous; its backward is the same kernel rotating by -theta.

Run: CPU falls back to the reference (TRITON_INTERPRET=1 runs the kernel in the interpreter); one GPU runs Triton.
"""
from __future__ import annotations

import torch

from dsaforge.kernels._dispatch import FLOAT_DTYPES, check, next_pow2, record, use_triton
from dsaforge.kernels.reference import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, sxb, sxs, sxh, sob, sos, soh, scs, H, P,
                     P_P: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
        """OUT[b, s, h] = x rotated pairwise by angle(s) (INVERSE: by -angle); pairs (2i, 2i+1) when INTERLEAVED,
        else (i, i + P). OUT [B, S, H, 2P] with any strides but a unit last one."""
        s = tl.program_id(0)
        b = tl.program_id(1)
        offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_p = tl.arange(0, P_P)
        mask = (offs_h < H)[:, None] & (offs_p < P)[None, :]
        cos = tl.load(COS + s * scs + offs_p, mask=offs_p < P, other=1.0).to(tl.float32)[None, :]
        sin = tl.load(SIN + s * scs + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
        if INVERSE:
            sin = -sin
        if INTERLEAVED:
            c1, c2 = 2 * offs_p, 2 * offs_p + 1
        else:
            c1, c2 = offs_p, offs_p + P
        x_row = X + b.to(tl.int64) * sxb + s.to(tl.int64) * sxs + offs_h[:, None].to(tl.int64) * sxh
        x1 = tl.load(x_row + c1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + c2[None, :], mask=mask, other=0.0).to(tl.float32)
        o_row = OUT + b.to(tl.int64) * sob + s.to(tl.int64) * sos + offs_h[:, None].to(tl.int64) * soh
        tl.store(o_row + c1[None, :], (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_row + c2[None, :], (x1 * sin + x2 * cos).to(OUT.dtype.element_ty), mask=mask)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotation in torch (complex product in fp32): `reference.rotate`, as the model's CPU path runs it."""
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    return rotate(x, torch.complex(cos.float(), sin.float()).view(shape), interleaved)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    x4 = x if x.dim() == 4 else x.unsqueeze(2)                                  # [B, S, H, D]
    b, s, h, d = x4.shape
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    o4 = out if out.dim() == 4 else out.unsqueeze(2)
    bh = min(16, next_pow2(h))
    _rope_kernel[(s, b, triton.cdiv(h, bh))](
        x4, cos, sin, o4, x4.stride(0), x4.stride(1), x4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        cos.stride(0), h, d // 2,
        P_P=max(2, next_pow2(d // 2)), BLOCK_H=bh, INTERLEAVED=interleaved, INVERSE=inverse, num_warps=4)
    return out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _launch(x, cos, sin, interleaved, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _launch(grad, cos, sin, ctx.interleaved, True), None, None, None


def _usable(x, cos, sin) -> tuple[bool, str]:
    ok, why = use_triton(x, cos, sin)
    if ok and (x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        ok, why = False, "x, cos or sin is not unit-stride in its last dim (or cos and sin differ in strides)"
    return ok, why


def rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
              inverse: bool = False) -> None:
    """out[...] = x rotated (inverse: by -angle), no autograd: for callers that place the result inside a larger
    tensor themselves (an autograd Function's forward or backward). out: x's shape, unit last stride."""
    check(tuple(out.shape) == tuple(x.shape) and out.stride(-1) == 1, "out must be like x with a unit last stride")
    ok, why = _usable(x, cos, sin)
    record("rope", "triton" if ok else "reference", why)
    if ok:
        _launch(x, cos, sin, interleaved, inverse, out)
    else:
        out.copy_(reference(x, cos, -sin if inverse else sin, interleaved))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, S, D] or [B, S, H, D] rotated by cos/sin [S, D/2] (differentiable in x); contiguous, in x's dtype.
    interleaved: pairs (x0, x1), (x2, x3), ... (MLA); else (x_i, x_{i+D/2}) (the indexer)."""
    check(x.dim() in (3, 4) and x.dtype in FLOAT_DTYPES,
          f"x must be a float [B, S, D] or [B, S, H, D], got {x.dtype} {tuple(x.shape)}")
    check(x.shape[-1] % 2 == 0 and tuple(cos.shape) == (x.shape[1], x.shape[-1] // 2) == tuple(sin.shape),
          f"cos/sin must be [S={x.shape[1]}, D/2={x.shape[-1] // 2}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    ok, why = _usable(x, cos, sin)
    if not ok:
        record("rope", "reference", why)
        return reference(x, cos, sin, interleaved)
    record("rope", "triton", why)
    if torch.is_grad_enabled() and x.requires_grad:
        return RopeFunction.apply(x, cos, sin, interleaved)
    return _launch(x, cos, sin, interleaved, False)


__all__ = ["RopeFunction", "rope", "rope_into"]
