"""attention_lse (the dense warm-up's KL normaliser) through Triton's interpreter and its torch fallback, against
a float64 softmax over the whole masked row."""
import pytest
import torch

from dsaforge import kernels
from dsaforge.kernels import KernelInputError, attention_lse, last_path


def _oracle(q, kv, scale, cu_seqlens=None):
    b, s, h, _ = q.shape
    t = kv.shape[1]
    pos = torch.arange(t - s, t)
    seen = torch.arange(t)[None, :] <= pos[:, None]                                   # causal [S, T]
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(t), cu_seqlens[1:], right=True)
        seen &= doc[None, :] == doc[pos][:, None]
    logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * scale
    return logits.masked_fill(~seen[None, :, None], float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("h,s,t,d_v,d_pe", [(4, 37, 37, 32, 16), (16, 20, 70, 16, 8), (3, 50, 50, 32, 0 + 8)])
def test_attention_lse_kernel_matches_float64(interpret, report, h, s, t, d_v, d_pe):
    q = torch.randn(2, s, h, d_v + d_pe)
    kv = torch.randn(2, t, d_v + d_pe)
    scale = (d_v + d_pe) ** -0.5
    got = attention_lse(q, kv, scale, d_v)
    assert last_path("attention_lse")[0] == "triton"
    assert report(f"lse h{h} s{s} t{t}", got, _oracle(q, kv, scale)) < 1e-4


def test_attention_lse_packed_documents(interpret, report):
    q = torch.randn(1, 90, 4, 48)
    kv = torch.randn(1, 90, 48)
    cu = torch.tensor([0, 17, 18, 64, 90])
    got = attention_lse(q, kv, 0.2, 32, cu_seqlens=cu)
    assert last_path("attention_lse")[0] == "triton"
    assert report("lse packed", got, _oracle(q, kv, 0.2, cu)) < 1e-4


def test_attention_lse_reference_path_and_chunking(report):
    q = torch.randn(1, 40, 2, 24)
    kv = torch.randn(1, 40, 24)
    start, end = kernels.key_bounds(40, 40)
    want = _oracle(q, kv, 0.3)
    assert report("lse reference", attention_lse(q, kv, 0.3, 16), want) < 1e-4
    assert last_path("attention_lse")[0] == "reference"
    chunked = kernels.reference.attention_lse(q, kv, 0.3, start, end, budget=2 * 40 * 3)   # 3 query rows a block
    assert report("lse reference chunked", chunked, want) < 1e-4


def test_attention_lse_rejects_bad_shapes():
    with pytest.raises(KernelInputError, match="kv must be"):
        attention_lse(torch.randn(1, 4, 2, 24), torch.randn(1, 4, 16), 0.3, 16)
    with pytest.raises(KernelInputError, match="fewer than"):
        attention_lse(torch.randn(1, 8, 2, 24), torch.randn(1, 4, 24), 0.3, 16)
    with pytest.raises(KernelInputError, match="d_v"):
        attention_lse(torch.randn(1, 4, 2, 24), torch.randn(1, 4, 24), 0.3, 32)
