"""Acceptance on the tiny preset: pretraining learns, the warm-up fits the indexer to the attention, sparse
adaptation keeps the dense model's loss; metrics, exports and the long-context option.

Run: python -m pytest tests/train/test_stages.py -q      (about 2 minutes on 2 CPU cores)
"""
import json

import pytest
import torch

from dsaforge.config import ConfigError
from dsaforge.model import Transformer
from dsaforge.model.hf import import_hf
from dsaforge.model.train import stages
from dsaforge.model.train.trainer import Trainer
from dsaforge.stages import StageContext


def test_pretraining_brings_validation_loss_well_below_unigram_entropy(tiny_chain):
    s = tiny_chain["pretrain"]["summary"]
    print(f"\npretrain: val loss {s['start.val/lm_loss']:.3f} -> {s['end.val/lm_loss']:.3f}, "
          f"unigram entropy {s['unigram_entropy']:.3f} nats")
    assert s["end.val/lm_loss"] < 0.9 * s["unigram_entropy"]


def test_warmup_halves_the_indexer_kl_raises_recall_and_freezes_the_backbone(tiny_chain):
    s = tiny_chain["warmup"]["summary"]
    kl0, kl1 = s["start.val/indexer_kl"], s["end.val/indexer_kl"]
    r0, r1 = s["start.val/recall/mean"], s["end.val/recall/mean"]
    print(f"\nwarmup: indexer KL {kl0:.4f} -> {kl1:.4f} ({100 * (1 - kl1 / kl0):.0f}% lower), "
          f"top-k recall {r0:.3f} -> {r1:.3f}")
    assert kl1 <= 0.5 * kl0
    assert r1 > r0 + 0.1
    assert s["end.val/lm_loss"] == s["start.val/lm_loss"]       # nothing but the indexer moved
    before = import_hf(tiny_chain["pretrain"]["dir"] / "hf").state_dict()
    after = import_hf(tiny_chain["warmup"]["dir"] / "hf").state_dict()
    for name, t in before.items():
        assert torch.equal(t, after[name]) != (".indexer." in name), name


def test_sparse_adaptation_stays_within_two_percent_of_the_dense_model(tiny_chain):
    s = tiny_chain["sparse"]["summary"]
    dense, sparse = s["start.val_dense/lm_loss"], s["end.val/lm_loss"]
    print(f"\nsparse: dense val loss {dense:.4f}, sparse before {s['start.val/lm_loss']:.4f}, after {sparse:.4f} "
          f"({100 * (sparse / dense - 1):+.2f}%)")
    assert sparse <= 1.02 * dense


def test_every_step_logs_losses_rates_and_memory(tiny_chain):
    metrics = tiny_chain["sparse"]["tracker"].metrics
    n_layers = tiny_chain["cfg"].model.n_layers
    for key in ["train/lm_loss", "train/indexer_kl", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                "perf/tflops_per_device", "memory/peak_rss_gib",
                *[f"train/indexer_kl/layer{i}" for i in range(n_layers)]]:
        assert [s for s, _ in metrics[key]] == list(range(1, 61)), key
    assert "val/recall/mean" in metrics and "val/indexer_kl" in metrics
    lr = [v for _, v in metrics["train/lr"]]
    assert lr[0] == pytest.approx(3e-4) and lr[-1] == pytest.approx(3e-5)   # cosine to min_lr_ratio


def test_hf_export_loads_back_as_the_trained_model(tiny_chain):
    hf = tiny_chain["sparse"]["dir"] / "hf"
    model = Transformer(tiny_chain["cfg"].model)
    model.load_state_dict(import_hf(hf).state_dict())
    assert json.loads((hf / "config.json").read_text())["model_type"] == "deepseek_v32"
    assert json.loads((hf / "dsaforge_stage.json").read_text())["stage"] == "sparse"
    layout = json.loads((tiny_chain["sparse"]["dir"] / "metrics.json").read_text())["layout"]
    assert layout == {"world": 1, "tp": 1, "ep": 1, "pp": 1}


def test_a_stage_can_start_from_any_earlier_stage_and_needs_one(tiny_chain, tmp_path):
    cfg = tiny_chain["cfg"].model_copy(deep=True)
    cfg.train.sparse.steps, cfg.train.sparse.eval_every = 2, 2
    ctx = StageContext(cfg, tmp_path / "s", {"prepare-data": tiny_chain["data"],
                                             "pretrain": tiny_chain["pretrain"]["dir"]})
    assert stages.sparse(ctx)["steps"] == 2                     # sparse straight from the dense model
    with pytest.raises(ConfigError, match="needs an earlier stage"):
        stages.warmup(StageContext(cfg, tmp_path / "w", {"prepare-data": tiny_chain["data"]}))


def test_long_context_packs_documents_with_boundary_masking(tiny_chain, tmp_path):
    cfg = tiny_chain["cfg"].model_copy(deep=True)
    s = cfg.train.sparse
    s.steps, s.seq_len, s.batch_size, s.eval_every, s.eval_batches = 2, 384, 2, 2, 1
    trainer = Trainer(cfg, "sparse", tiny_chain["data"], tmp_path, tiny_chain["warmup"]["dir"] / "hf", doc_mask=True)
    rows = trainer.train_rows
    several = [i for i in range(len(rows)) if (rows.rows[i, 1:-1] == rows.bos).any()][:2]
    batch = rows.batch(several)
    assert batch.inputs.shape == (2, 384) and (batch.segment_ids.max(1).values >= 1).all()   # 2+ documents a row
    summary = trainer.fit()
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["end"]["val/lm_loss"]))


def test_recall_probe_reports_every_layer_with_the_fused_kernels_on():
    """On a GPU the model trains through the fused DSA path, which never forms the attention probabilities; the
    sampled recall metric must still be there (the probe runs the unfused path and restores the flag)."""
    from dsaforge.config import load_config
    from dsaforge.model.train.metrics import indexer_recall
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    model.fused_dsa = True
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 96))
    with torch.no_grad():
        recall = indexer_recall(model, tokens, None, top_k=16)
    assert model.fused_dsa is True
    assert sorted(recall) == sorted([f"recall/layer{i}" for i in range(cfg.model.n_layers)] + ["recall/mean"])
    assert all(0.0 <= v <= 1.0 for v in recall.values()), recall


def test_recall_probe_stays_within_memory_at_128_heads():
    from dsaforge.model.train.trainer import PROBE_BYTES, recall_probe_len
    assert recall_probe_len(128, 32, 4) == 128                       # tiny: the whole sequence
    assert recall_probe_len(65536, 2048, 16) == 8192                 # small: 4k
    n = recall_probe_len(65536, 2048, 128)                            # h200 / v32: 128 heads
    assert n == 4096 and 4 * 128 * n * n <= PROBE_BYTES
    assert recall_probe_len(65536, 2048, 4096) == 4096                # never below 2k: rows must see > k keys
