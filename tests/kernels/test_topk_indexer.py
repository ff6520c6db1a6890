"""Radix top-k and the fused indexer + top-k through Triton's interpreter, against the references."""
import pytest
import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import indexer_fp8_inputs, indexer_scores, indexer_topk, last_path, topk_indices
from dsaforge.kernels._dispatch import KernelInputError, poison_outputs
from dsaforge.kernels.indexer import _reference_indexer_topk
from dsaforge.kernels.topk import _reference_topk


def _rows():
    x = torch.randn(6, 3000)
    x[1] = torch.randint(0, 5, (3000,)).float()       # heavy ties: lower index must win
    x[2] = -x[2].abs()                                  # all negative
    x[3, 100:] = float("-inf")                          # masked tail
    x[4, :] = 0.0                                       # one value everywhere
    x[5, ::7] = -0.0                                    # signed zeros
    return x


def test_topk_matches_reference_sets(interpret):
    x = _rows()
    with poison_outputs():
        got = topk_indices(x, 64)
    assert last_path("topk")[0] == "triton"
    want = ref.topk_indices(x[None], 64)[0]
    for r in range(x.shape[0]):
        assert sorted(got[r].tolist()) == sorted(want[r].tolist()), f"row {r}"
    for r in range(x.shape[0]):
        v = got[r][got[r] >= 0]
        assert (v.diff() > 0).all()


def test_topk_with_bounds(interpret):
    x = _rows()
    start = torch.tensor([0, 10, 0, 5, 0, 2900], dtype=torch.int32)
    end = torch.tensor([3000, 50, 40, 3000, 64, 3000], dtype=torch.int32)
    got = topk_indices(x, 64, start, end)
    assert torch.equal(got, _reference_topk(x, 64, start, end))
    assert (got[1, 40:] == -1).all() and got[1, 0] == 10


def test_topk_fewer_keys_than_k_keeps_reference_shape(interpret):
    x = torch.randn(2, 3, 10)
    assert topk_indices(x, 20).shape == (2, 3, 10)


def test_topk_validation():
    with pytest.raises(KernelInputError, match="dtype"):
        topk_indices(torch.randn(4, 8).double(), 2)
    with pytest.raises(ValueError, match="both start and end"):
        topk_indices(torch.randn(4, 8), 2, start=torch.zeros(4, dtype=torch.int32))


def _indexer_inputs(b=2, s=40, t=70, hi=4, d=16):
    return torch.randn(b, s, hi, d), torch.randn(b, t, d), torch.randn(b, s, hi)


def test_indexer_scores_match_reference(interpret, report):
    q, k, w = _indexer_inputs()
    with poison_outputs():
        got = indexer_scores(q, k, w)
    assert last_path("indexer_scores")[0] == "triton"
    want = ref.indexer_scores(q.double(), k.double(), w.double())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert report("scores", got, want) < 1e-4


@pytest.mark.parametrize("workspace", [None, 16 * 4 * 70])
def test_indexer_topk_matches_reference(interpret, workspace):
    q, k, w = _indexer_inputs()
    kwargs = {} if workspace is None else {"workspace_bytes": workspace}
    with poison_outputs():
        got = indexer_topk(q, k, w, 16, **kwargs)
    assert last_path("indexer_topk")[0] == "triton"
    start, end = ref.key_bounds(40, 70)
    assert torch.equal(got, _reference_indexer_topk(q, k, w, 16, None, start, end))


def test_indexer_fp8_path(interpret, report):
    q, k, w = _indexer_inputs()
    q8, k8, ks, wf = indexer_fp8_inputs(q, k, w)
    got = indexer_scores(q8, k8, wf, k_scale=ks)
    assert report("fp8 scores", got, ref.indexer_scores_fp8(q8, k8, ks, wf)) < 1e-4
    start, end = ref.key_bounds(40, 70)
    idx = indexer_topk(q8, k8, wf, 16, k_scale=ks)
    assert torch.equal(idx, _reference_indexer_topk(q8, k8, wf, 16, ks, start, end))


def test_indexer_topk_packed_documents(interpret):
    q, k, w = _indexer_inputs(b=1, s=70, t=70)
    cu = torch.tensor([0, 20, 33, 70])
    got = indexer_topk(q, k, w, 16, cu_seqlens=cu)
    start, end = ref.key_bounds(70, 70, cu)
    assert torch.equal(got, _reference_indexer_topk(q, k, w, 16, None, start, end))
    assert got[0, 25].tolist()[:6] == [20, 21, 22, 23, 24, 25] and (got[0, 25, 6:] == -1).all()


def test_fp8_quantization_matches_deepseek_recipe():
    x = torch.randn(3, 5, 128) * 3
    xq, scale = ref.act_quant_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (3, 5, 1)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())          # ue8m0: powers of two
    assert ((xq.float() * scale).sub(x).abs() <= x.abs().amax(-1, keepdim=True) / 8).all()


def test_indexer_validation():
    q, k, w = _indexer_inputs()
    with pytest.raises(KernelInputError, match="w must be"):
        indexer_topk(q, k, w[:, :, :2], 8)
    with pytest.raises(KernelInputError, match="k_scale"):
        q8, k8, _, wf = indexer_fp8_inputs(q, k, w)
        indexer_topk(q8, k8, wf, 8)
    with pytest.raises(KernelInputError, match="must both be fp8"):
        indexer_topk(q8, k, wf, 8)
    with pytest.raises(KernelInputError, match="packed sequences"):
        indexer_topk(q, k, w, 8, cu_seqlens=torch.tensor([0, 70]))


def test_indexer_cpu_fallback(monkeypatch):
    monkeypatch.delenv("DSAFORGE_KERNELS", raising=False)
    q, k, w = _indexer_inputs()
    indexer_topk(q, k, w, 8)
    assert last_path("indexer_topk")[0] == "reference"


def test_topk_sampled_and_fallback_paths_on_long_rows(interpret):
    x = torch.randn(4, 20000)                                # strided sample (stride 5): the candidate path
    x[1] = torch.randint(0, 3, (20000,)).float()            # too many ties for the candidates: full radix path
    x[2, 5000:] = float("-inf")
    x[3] = torch.linspace(-1, 1, 20000)                     # sorted row: the strided sample is still fair
    got = topk_indices(x, 64)
    want = ref.topk_indices(x[None], 64)[0]
    for r in range(4):
        assert sorted(got[r].tolist()) == sorted(want[r].tolist()), f"row {r}"
