"""Run: python -m pytest tests/model/test_autocast.py -q

Training runs the model under bf16 autocast; the references promise fp32 scores and selections, so every mode must
run there, and the index scores must stay fp32 (a bf16 top-k picks a different set on near-ties)."""
import pytest
import torch

from dsaforge.config import preset
from dsaforge.kernels import reference
from dsaforge.model import Transformer


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_every_mode_runs_under_bf16_autocast(mode):
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.autocast("cpu", torch.bfloat16):
        out = model(tokens, mode=mode)
    assert torch.isfinite(out.logits.float()).all()
    assert (out.indexer_loss is None) == (mode == "dense")


def test_references_stay_fp32_under_autocast():
    q, k, w = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 16), torch.rand(1, 8, 2)
    with torch.autocast("cpu", torch.bfloat16):
        scores = reference.indexer_scores(q, k, w)
        out, lse = reference.sparse_mla(torch.randn(1, 8, 2, 24), torch.randn(1, 8, 24),
                                        reference.topk_indices(scores, 4), 0.2, 16)
    assert scores.dtype == torch.float32 and lse.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(scores, reference.indexer_scores(q, k, w))
