"""Radix top-k (sample -> filter -> select) through Triton's interpreter, against `reference.topk_indices`.

The oracle's indices (descending score, -1 for -inf / missing) are brought to the kernel's layout here: a row's
valid indices ascending, then -1. The candidate path is forced on short rows by shrinking the config."""
import pytest
import torch

from dsaforge.kernels import last_path, topk_indices
from dsaforge.kernels import reference as ref
from dsaforge.kernels import topk as topk_mod
from dsaforge.kernels._dispatch import poison_outputs

NEG_INF = float("-inf")


def _oracle(x, k, start=None, end=None):
    """reference.topk_indices (bounds as -inf), valid indices ascending, then -1, padded to k slots."""
    if start is not None:
        x = x.masked_fill(~ref.bounds_mask(start, end, x.shape[-1]), NEG_INF)
    else:
        k = min(k, x.shape[-1])                         # without bounds, never more slots than keys
    idx = ref.topk_indices(x[None], k)[0].long()
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(idx >= 0, idx, big), dim=-1).values
    idx = torch.where(idx == big, -1, idx)
    return torch.cat([idx, idx.new_full((idx.shape[0], k - idx.shape[1]), -1)], -1).to(torch.int32)


def _check(name, x, k, start=None, end=None):
    with poison_outputs():
        got = topk_indices(x, k, start, end)
    assert last_path("topk")[0] == "triton"
    want = _oracle(x, k, start, end)
    bad = (got != want).sum(-1)
    print(f"{name} k={k}: mismatched slots per row {bad.tolist()}")
    assert torch.equal(got, want), name


@pytest.fixture
def candidate_path(monkeypatch):
    """Small blocks, segments and buffer so that 20K-key rows take sample -> filter -> select (several programs
    per row, chunks reordered) and its fallbacks."""
    monkeypatch.setitem(topk_mod.TOPK_CONFIG, "direct", 0)
    monkeypatch.setitem(topk_mod.TOPK_CONFIG, "block", 256)
    monkeypatch.setitem(topk_mod.TOPK_CONFIG, "segment", 2048)
    monkeypatch.setattr(topk_mod, "CAND_MIN", 512)


def _awkward_rows(n=3000):
    x = torch.randn(7, n)
    x[1] = torch.randint(0, 5, (n,)).float()          # heavy ties: lower index must win
    x[2] = -x[2].abs()                                  # all negative
    x[3, 100:] = NEG_INF                                # fewer finite keys than k
    x[4] = 0.0                                          # one value everywhere
    x[5, ::7] = -0.0                                    # signed zeros
    x[6, :n // 2] = NEG_INF                             # -inf first
    return x


@pytest.mark.parametrize("k", [64, 2048, 3000, 5000])
def test_topk_in_registers_matches_reference(interpret, k):
    _check("direct", _awkward_rows(), k)


def _long_rows(n=20000):
    x = torch.randn(8, n)
    x[1] = torch.randint(0, 4000, (n,)).float()        # ties at the k-th key inside the candidates
    x[2, 5000:] = NEG_INF
    x[3] = torch.linspace(-1, 1, n)                     # sorted: every candidate in the last segment
    x[4] += torch.linspace(0, 4, n)                     # top-k mostly near the end (local attention)
    x[5] = torch.randint(0, 3, (n,)).float()            # more keys >= the sample's threshold than the buffer holds
    x[6, ::16][:60] = 10.0                              # the sample sees all 60 tens: fewer than k candidates
    x[7] = (torch.randn(n) * 4).round()
    return x


@pytest.mark.parametrize("k", [64, 100])
def test_topk_candidate_and_fallback_paths(interpret, candidate_path, k):
    _check("candidates", _long_rows(), k)


def test_topk_bounds(interpret, candidate_path):
    x = _long_rows()
    start = torch.tensor([0, 10, 0, 5, 19000, 3, 7, 300], dtype=torch.int32)
    end = torch.tensor([20000, 10, 15000, 20000, 20000, 70, 19999, 300 + 513], dtype=torch.int32)
    _check("bounds, candidate path", x, 64, start, end)          # empty row, n < k, n just over the buffer
    topk_mod.TOPK_CONFIG["direct"] = 8192                      # restored by the fixture
    y = _awkward_rows()
    s = torch.tensor([0, 10, 0, 5, 0, 2900, 1400], dtype=torch.int32)
    e = torch.tensor([3000, 74, 40, 3000, 64, 3000, 1600], dtype=torch.int32)
    _check("bounds, in registers", y, 64, s, e)                # n == k, n < k, -inf inside the bounds


def test_topk_full_rows_default_config(interpret):
    x = torch.randn(2, 9000)                                    # just past `direct`: the default sample and filter
    x[1, 4000:4100] = 5.0
    _check("default config", x, 64)
