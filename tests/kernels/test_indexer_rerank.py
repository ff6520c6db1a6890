"""FP8 indexer with exact re-scoring: the re-score kernel against its torch reference, and the two-stage selection
(fp8 pre-selection of top_k + margin, exact re-score, top-k) against the exact top-k of float64 scores."""
import pytest
import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels import indexer as indexer_mod
from dsaforge.kernels import indexer_fp8_inputs, indexer_topk, last_path
from dsaforge.kernels._dispatch import KernelInputError, poison_outputs
from dsaforge.kernels.indexer import _reference_rerank, indexer_rerank, rerank_margin


def _inputs(b=1, s=40, t=70, hi=4, d=16):
    return torch.randn(b, s, hi, d), torch.randn(b, t, d), torch.randn(b, s, hi)


def _recall(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of the exact top-k (valid slots) found in the selection."""
    g, w = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    hits = sum(torch.isin(wr[wr >= 0], gr[gr >= 0]).sum().item() for gr, wr in zip(g, w))
    return hits / max(int((w >= 0).sum()), 1)


def _assert_valid_rows(idx, start, end, top_k):
    """Each row: distinct ascending keys inside [start, end), then -1 padding, as many keys as fit."""
    for r, row in enumerate(idx.reshape(-1, top_k)):
        lo, hi = int(start[r]), int(end[r])
        v = row[row >= 0]
        assert v.numel() == min(top_k, hi - lo), f"row {r}: {v.numel()} keys, {hi - lo} visible"
        assert (row[v.numel():] == -1).all(), f"row {r}: -1 must pad the tail"
        assert (v.diff() > 0).all() and (v >= lo).all() and (v < hi).all(), f"row {r}"


@pytest.mark.parametrize("config", [None, (16, 16, 4, 1)])      # default blocks; several head and candidate blocks
def test_rerank_kernel_matches_reference(interpret, report, monkeypatch, config):
    if config is not None:
        monkeypatch.setattr(indexer_mod, "RERANK_CONFIG", config)
    q, k, w = _inputs(b=2, s=12, t=90, hi=20, d=32)
    cand = torch.randint(0, 90, (2, 12, 40), dtype=torch.int32).sort(-1)[0]
    cand[:, :, 30:] = -1                                  # empty slots
    cand[0, 3] = -1                                       # a row with no candidate at all
    with poison_outputs():
        got = indexer_rerank(q, k, w, cand)
    assert last_path("indexer_rerank")[0] == "triton"
    want = _reference_rerank(q.double(), k.double(), w.double(), cand)
    assert torch.equal(torch.isneginf(got), cand < 0)
    # Independent oracle: the dense float64 scores (every key) gathered at the candidates.
    dense = torch.einsum("bshd,btd->bsht", q.double(), k.double()).relu().mul(w.double()[..., None]).sum(2)
    gathered = dense.gather(-1, cand.clamp_min(0).long()).masked_fill(cand < 0, float("-inf"))
    assert report("reference vs dense", want, gathered) < 1e-9
    assert report("rerank kernel", got, want) < 1e-4


def test_rerank_reference_fallback_on_cpu(monkeypatch):
    monkeypatch.delenv("DSAFORGE_KERNELS", raising=False)
    q, k, w = _inputs()
    cand = torch.randint(-1, 70, (1, 40, 8), dtype=torch.int32)
    got = indexer_rerank(q, k, w, cand)
    assert last_path("indexer_rerank")[0] == "reference"
    assert torch.equal(got, _reference_rerank(q, k, w, cand))


def test_fp8_rerank_recovers_exact_topk(interpret):
    # k / T = 1/8 and the default margin top_k / 4: plain fp8 loses ~3% of the exact top-k to e4m3 rounding.
    s, t, top_k = 16, 2048, 256
    q, k, w = _inputs(s=s, t=t, hi=8, d=128)
    exact = ref.indexer_scores(q.double(), k.double(), w.double())
    want = ref.topk_indices(exact, top_k)
    with poison_outputs():
        plain = indexer_topk(q, k, w, top_k, fp8=True, rerank=0)
        reranked = indexer_topk(q, k, w, top_k, fp8=True)
    assert last_path("indexer_topk")[0] == "triton"
    r_plain, r_rerank = _recall(plain, want), _recall(reranked, want)
    print(f"recall vs float64 top-k ({top_k} of {t}): fp8 {r_plain:.4f}, "
          f"fp8+rerank (margin {rerank_margin(top_k)}) {r_rerank:.4f}")
    assert r_plain < 0.985                                # the case is hard enough for the bar to mean something
    assert r_rerank >= 0.99
    start, end = ref.key_bounds(s, t)
    _assert_valid_rows(reranked[0], start, end, top_k)


@pytest.mark.parametrize("workspace", [None, 16 * 4 * 70])   # one chunk; 16-row chunks with a partial last one
def test_fp8_rerank_kernel_path_matches_reference_path(interpret, monkeypatch, workspace):
    q, k, w = _inputs(b=2)
    kw = {} if workspace is None else {"workspace_bytes": workspace}
    with poison_outputs():
        got = indexer_topk(q, k, w, 16, fp8=True, **kw)
    assert last_path("indexer_topk")[0] == "triton"
    # fp8=True without a margin is exactly the pre-quantized fp8 path.
    q8, k8, ks, wf = indexer_fp8_inputs(q, k, w)
    assert torch.equal(indexer_topk(q, k, w, 16, fp8=True, rerank=0, **kw),
                       indexer_topk(q8, k8, wf, 16, k_scale=ks, **kw))
    monkeypatch.setenv("DSAFORGE_KERNELS", "reference")
    want = indexer_topk(q, k, w, 16, fp8=True)
    assert last_path("indexer_topk")[0] == "reference"
    assert torch.equal(got, want)
    start, end = ref.key_bounds(40, 70)
    for bi in range(2):                                   # causal: rows see 31..70 keys, all re-scored (T <= k+64)
        _assert_valid_rows(got[bi], start, end, 16)
        exact = ref.indexer_scores(q[bi:bi + 1].double(), k[bi:bi + 1].double(), w[bi:bi + 1].double())
        assert _recall(got[bi], ref.topk_indices(exact, 16)[0]) == 1.0


def test_fp8_rerank_packed_documents_and_short_rows(interpret, monkeypatch):
    # Documents of 20, 13, 5 and 92 tokens, top_k 16, margin 64: rows with fewer keys than top_k (-1 padding),
    # rows whose candidate list is part-empty (17..80 keys), and rows with more keys than candidates.
    q, k, w = _inputs(s=130, t=130)
    cu = torch.tensor([0, 20, 33, 38, 130])
    with poison_outputs():
        got = indexer_topk(q, k, w, 16, cu_seqlens=cu, fp8=True, workspace_bytes=48 * 4 * 130)
    start, end = ref.key_bounds(130, 130, cu)
    _assert_valid_rows(got[0], start, end, 16)
    assert got[0, 25].tolist()[:6] == [20, 21, 22, 23, 24, 25] and (got[0, 25, 6:] == -1).all()
    monkeypatch.setenv("DSAFORGE_KERNELS", "reference")
    assert torch.equal(got, indexer_topk(q, k, w, 16, cu_seqlens=cu, fp8=True))
    exact = ref.indexer_scores(q.double(), k.double(), w.double(), causal=False)
    exact = exact.masked_fill(~ref.bounds_mask(start, end, 130)[None], float("-inf"))
    assert _recall(got, ref.topk_indices(exact, 16)) >= 0.99


def test_rerank_ties_go_to_the_lower_key_index(interpret):
    # Zero weights: every re-scored candidate ties at 0, so the first top_k candidates (lowest keys) must win.
    q, k, w = _inputs(s=8, t=200)
    w = torch.zeros_like(w)
    got = indexer_topk(q, k, w, 16, fp8=True)
    assert torch.equal(got[0, -1], torch.arange(16, dtype=torch.int32))


def test_rerank_margin():
    assert rerank_margin(2048) == 512
    assert rerank_margin(16) == 64                        # rounded up to a multiple of 64
    assert rerank_margin(2048, 100) == 128
    assert rerank_margin(2048, 0) == 0
    with pytest.raises(KernelInputError, match=">= 0"):
        rerank_margin(2048, -1)


def test_rerank_validation():
    q, k, w = _inputs()
    q8, k8, ks, wf = indexer_fp8_inputs(q, k, w)
    with pytest.raises(KernelInputError, match="un-quantized"):
        indexer_topk(q8, k8, wf, 8, k_scale=ks, fp8=True)
    with pytest.raises(KernelInputError, match="no k_scale"):
        indexer_topk(q, k, w, 8, k_scale=ks, fp8=True)
    with pytest.raises(KernelInputError, match="pre-quantized"):
        indexer_topk(q8, k8, wf, 8, k_scale=ks, rerank=64)
    with pytest.raises(KernelInputError, match="needs fp8=True"):
        indexer_topk(q, k, w, 8, rerank=64)
    with pytest.raises(KernelInputError, match=">= 0"):
        indexer_topk(q, k, w, 8, fp8=True, rerank=-64)
    cand = torch.zeros(1, 40, 8, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="candidates dtype"):
        indexer_rerank(q, k, w, cand.long())
    with pytest.raises(KernelInputError, match="candidates must be"):
        indexer_rerank(q, k, w, cand[:, :20])
    with pytest.raises(KernelInputError, match="share a dtype"):
        indexer_rerank(q, k.half(), w, cand)
    with pytest.raises(KernelInputError, match="q dtype"):
        indexer_rerank(q8, k, w, cand)


@pytest.mark.parametrize("block,shape", [(16, (3, 5, 2, 16)), (32, (7, 64)), (128, (2, 3, 128))])
def test_act_quant_kernel_is_bit_identical_to_the_reference(interpret, block, shape):
    x = torch.randn(*shape) * 3
    flat = x.view(-1, block)
    flat[0] = 0.0                                    # amax below 1e-4: the clamp decides the scale
    flat[-1, 0] = 448.0 * 2.0 ** -3                  # amax / 448 an exact power of two: no rounding up
    if flat.shape[0] > 2:
        flat[1, 1] = -1e4                            # a large negative amax ...
        flat[1, 2:6] = torch.tensor([-1e-3, 1e-3, -0.0, 2.0])   # ... beside values that round to (-)0
    want_q, want_s = ref.act_quant_fp8(x.bfloat16(), block=block)
    got_q, got_s = indexer_mod.act_quant_fp8(x.bfloat16(), block=block)
    assert got_q.dtype == torch.float8_e4m3fn and got_q.shape == want_q.shape and got_s.shape == want_s.shape
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
