"""The v2 indexer score kernel (Q resident, keys streamed; `indexer.SCORE_KERNEL[dtype] = "v2"`) through Triton's
interpreter: the dense scores and the fused top-k against the references and the v1 kernel, for both head layouts
(Hi 16 packs 4x the rows of Hi 64 into the GEMM's columns), key ranges split across programs, and packed documents."""
import pytest
import torch

from dsaforge.kernels import indexer
from dsaforge.kernels import reference as ref
from dsaforge.kernels import indexer_fp8_inputs, indexer_scores, indexer_topk, last_path
from dsaforge.kernels._dispatch import poison_outputs
from dsaforge.kernels.indexer import _reference_indexer_topk


@pytest.fixture
def v2(interpret, monkeypatch):
    """Select v2 with small key tiles and ranges, so a program sees several tiles and rows span several programs."""
    monkeypatch.setattr(indexer, "SCORE_KERNEL", {"fp8": "v2", "bf16": "v2"})
    monkeypatch.setitem(indexer.SCORE_CONFIG_V2, "bf16", (2, 32, 96, 4, 2))
    monkeypatch.setitem(indexer.SCORE_CONFIG_V2, "fp8", (2, 32, 96, 4, 2))


def _inputs(s, t, hi, d, b=1):
    return torch.randn(b, s, hi, d), torch.randn(b, t, d), torch.randn(b, s, hi) * hi ** -0.5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,t,hi,d", [(70, 260, 16, 32), (37, 300, 64, 16), (20, 150, 12, 16)])
def test_v2_scores_match_reference(v2, report, causal, s, t, hi, d):
    q, k, w = _inputs(s, t, hi, d, b=2)
    with poison_outputs():                              # every element written: NaN would survive the comparison
        got = indexer_scores(q, k, w, causal=causal)
    assert last_path("indexer_scores")[0] == "triton"
    want = ref.indexer_scores(q.double(), k.double(), w.double(), causal=causal)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    assert report("v2 scores", got, want) < 1e-4


def test_v2_workspace_matches_v1_inside_bounds(v2, report, monkeypatch):
    """indexer_topk's launch (no MASK_OUT, rows from an offset, fp8 with k_scale): inside [start, end) of each row
    v2 writes what v1 writes."""
    s, t, row0, n = 90, 400, 20, 64
    q, k, w = _inputs(s, t, 16, 32)
    q8, k8, ks, wf = indexer_fp8_inputs(q, k, w)
    start = ref.key_bounds(t, t, torch.tensor([0, 150, 151, 330, 400]))[0][-s:]    # documents: rows start late
    end = ref.key_bounds(s, t)[1]
    mask = ref.bounds_mask(start, end, t)[row0:row0 + n]
    outs = []
    for kernel in ("v1", "v2"):
        monkeypatch.setattr(indexer, "SCORE_KERNEL", {"fp8": kernel, "bf16": kernel})
        ws = torch.full((n, t), float("nan"))
        indexer._launch_scores(q8[0], k8[0], wf[0], ks[0], ws, start, end, row0, n, False)
        assert not ws[mask].isnan().any()
        outs.append(ws[mask])
    assert report("v2 - v1 workspace", outs[1], outs[0]) < 1e-4


@pytest.mark.parametrize("hi,d", [(16, 32), (64, 16)])
def test_v2_topk_packed_documents(v2, hi, d):
    q, k, w = _inputs(200, 200, hi, d)
    cu = torch.tensor([0, 45, 46, 130, 200])
    got = indexer_topk(q, k, w, 24, cu_seqlens=cu, workspace_bytes=64 * 4 * 200)     # 3 chunks of 64 rows
    assert last_path("indexer_topk")[0] == "triton"
    start, end = ref.key_bounds(200, 200, cu)
    assert torch.equal(got, _reference_indexer_topk(q, k, w, 24, None, start, end))


def test_v2_fp8_scores_and_topk(v2, report):
    q, k, w = _inputs(64, 256, 16, 32)
    q8, k8, ks, wf = indexer_fp8_inputs(q, k, w)
    got = indexer_scores(q8, k8, wf, k_scale=ks)
    assert report("v2 fp8 scores", got, ref.indexer_scores_fp8(q8, k8, ks, wf)) < 1e-4
    start, end = ref.key_bounds(64, 256)
    idx = indexer_topk(q8, k8, wf, 32, k_scale=ks)
    assert torch.equal(idx, _reference_indexer_topk(q8, k8, wf, 32, ks, start, end))


def test_sweep_scores_runs_tiny(interpret, monkeypatch):
    """The benchmark's v1-vs-v2 score sweep at tiny sizes: every configuration runs and matches v1."""
    from dsaforge.kernels import bench
    kernel = indexer.SCORE_KERNEL
    monkeypatch.setitem(bench.SHAPES, "v32", dict(bench.SHAPES["v32"], hi=16, di=32))
    res = bench.sweep_scores("cpu", bench.Clock(600), s_q=48, sizes=(160,), max_reps=1,
                             configs=((4, 64, 128, 4, 3), (2, 32, 64, 4, 2)))
    assert [r["kernel"] for r in res["runs"]] == ["v1", "v2", "v2"]
    assert all(r.get("match") for r in res["runs"][1:]), res["runs"]
    assert indexer.SCORE_KERNEL == kernel and res["best"][160] is not None
