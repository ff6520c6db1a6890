"""Kernel tests: CPU tests run the Triton kernels through the interpreter on float32 inputs at small sizes
(bf16 is not faithful there); `gpu` tests check bf16/fp8 numerics on the GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is imported; the kernels still run only where a test asks
    # for them (the `interpret` fixture sets DSAFORGE_KERNELS=interpret), so other packages keep the reference path.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dsaforge.kernels import indexer_kl, indexer_topk, sparse_mla  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on CPU tensors through Triton's interpreter."""
    pytest.importorskip("triton")
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    if os.environ.get("TRITON_INTERPRET") != "1" or not isinstance(tl_standard.sum, InterpretedFunction):
        pytest.skip("Triton's interpreter needs TRITON_INTERPRET=1 before triton is first imported "
                    "(run tests/kernels in its own pytest process)")
    monkeypatch.setenv("DSAFORGE_KERNELS", "interpret")
    from dsaforge.kernels import _dispatch
    _dispatch.patch_interpreter()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """Print max and mean absolute error and return the max (tests print their error)."""
    diff = (got.double() - want.double()).nan_to_num(0.0, 0.0, 0.0).abs()
    print(f"{name}: max abs err {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    return diff.max().item()


@pytest.fixture
def report():
    return _report





class TinyDSA(torch.nn.Module):
    """A DSA attention layer in MQA/absorbed form, wired the way the model's sparse stage uses the kernels:
    indexer -> top-k (no grad) -> sparse_mla (autograd) -> output; indexer trained by the KL on detached inputs."""

    def __init__(self, dim=32, heads=4, d_v=32, d_pe=16, idx_heads=4, idx_dim=16, top_k=16):
        super().__init__()
        self.heads, self.d_v, self.d_pe, self.top_k = heads, d_v, d_pe, top_k
        self.idx_heads, self.idx_dim = idx_heads, idx_dim
        self.wq = torch.nn.Linear(dim, heads * (d_v + d_pe), bias=False)
        self.wkv = torch.nn.Linear(dim, d_v + d_pe, bias=False)
        self.wo = torch.nn.Linear(heads * d_v, dim, bias=False)
        self.iq = torch.nn.Linear(dim, idx_heads * idx_dim, bias=False)
        self.ik = torch.nn.Linear(dim, idx_dim, bias=False)
        self.iw = torch.nn.Linear(dim, idx_heads, bias=False)
        self.scale = (d_v + d_pe) ** -0.5

    def forward(self, x, indices=None):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.d_v + self.d_pe)                 # [B, S, H, Dqk]
        kv = self.wkv(x)                                                             # [B, S, Dqk]
        xd = x.detach()
        iq = self.iq(xd).view(b, s, self.idx_heads, self.idx_dim)                    # [B, S, Hi, Di]
        ik, iw = self.ik(xd), self.iw(xd) * self.idx_heads ** -0.5
        with torch.no_grad():
            idx = indexer_topk(iq, ik, iw, self.top_k) if indices is None else indices  # [B, S, K]
        out, lse = sparse_mla(q, kv, idx, self.scale, self.d_v)                      # [B, S, H, d_v]
        kl = indexer_kl(iq, ik, iw, q.detach(), kv.detach(), lse.detach(), self.scale, self.d_v, indices=idx)
        return self.wo(out.reshape(b, s, -1)), kl.mean(), idx


@pytest.fixture
def tiny_dsa():
    """The TinyDSA class: a DSA layer wired through the kernels as the model's sparse stage uses them."""
    return TinyDSA
