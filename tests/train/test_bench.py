"""The training benchmark (`python -m dsaforge.model.train.bench`) end to end at tiny sizes on CPU, so the GPU run
is not the first time its code executes; its micro-batch choice, time budget and kernel attribution."""
import importlib
import json

import pytest

from dsaforge.config import preset
from dsaforge.model.train import bench


def test_bench_rows_at_equal_tokens_per_step_with_profile_and_report(tmp_path, capsys):
    out = tmp_path / "train_tiny"
    res = bench.main(["--rows", "tiny:32,64:dense,sparse", "--tokens-per-step", "64", "--steps", "1", "--warmup", "0",
                      "--set", "train.activation_checkpointing=true", "--profile", "64:sparse", "--out", str(out)])
    rows = res["rows"]
    assert [(r["seq_len"], r["mode"]) for r in rows] == [(32, "dense"), (32, "sparse"), (64, "dense"), (64, "sparse")]
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        assert r["tokens_per_step"] == 64 and r["sequences"] * r["seq_len"] == 64
        assert r["micro_batch"] == r["sequences"] and r["micro_steps"] == 1      # CPU: no memory limit
        assert r["recompute_flops_per_token"] > 2 * 64 * 2048                     # blocks again, not just the head
        assert r["mfu"] is None and r["step_s"] > 0 and r["plan_gib"] > 0
    prof = rows[-1]
    assert prof["device_busy_s"] > 0 and sum(prof["shares"].values()) == pytest.approx(1.0)
    assert "profile" in prof and (tmp_path / prof["profile"]).exists()
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["rows"]) == 4 and saved["overrides"] == ["train.activation_checkpointing=true"]
    md = out.with_suffix(".md").read_text()
    assert "| tiny | 64 | sparse | 1 x 1 |" in md and "## Where the step goes: tiny, sparse, 64" in md
    assert "activation checkpointing on" in md


def test_micro_batches_accumulate_variants_and_the_budget_skips_rows(tmp_path):
    res = bench.main(["--rows", "tiny:32:dense", "tiny:32:dense:train.activation_checkpointing=true",
                      "--tokens-per-step", "64", "--micro-batch", "1", "--steps", "1", "--warmup", "0",
                      "--out", str(tmp_path / "v")])
    plain, variant = res["rows"]
    assert (plain["sequences"], plain["micro_batch"], plain["micro_steps"]) == (2, 1, 2)
    assert variant["variant"] == "train.activation_checkpointing=true"
    assert plain["recompute_flops_per_token"] < variant["recompute_flops_per_token"]   # the head only, then blocks
    assert "| tiny (train.activation_checkpointing=true) | 32 | dense |" in (tmp_path / "v.md").read_text()
    res = bench.main(["--preset", "tiny", "--seq-lens", "32", "--steps", "1", "--time-budget", "0"])
    assert all(r["skipped"].startswith("skipped") for r in res["rows"])
    # the prediction scales the last measured row of the preset and mode by the step's FLOPs
    cfg = preset("tiny")
    done = [{"preset": "tiny", "mode": "dense", "seq_len": 32, "tokens_per_step": 64, "step_s": 2.0}]
    assert bench.predicted_s(done, cfg, "dense", 32, 64, 3) == pytest.approx(6.0)
    assert bench.predicted_s(done, cfg, "dense", 32, 128, 1) == pytest.approx(4.0)
    assert bench.predicted_s(done, cfg, "sparse", 32, 64, 3) == 0.0


def test_micro_batch_is_the_most_the_plan_fits():
    cfg = preset("h200")
    assert bench.choose_micro_batch(cfg, "dense", 4096, 16, None) == 16
    assert bench.choose_micro_batch(cfg, "dense", 4096, 16, 141) == 16
    small = bench.choose_micro_batch(cfg, "dense", 4096, 16, 50)
    assert 1 <= small < 16 and 16 % small == 0
    assert bench.plan_gib(cfg, "dense", 4096, small, 16) <= 0.9 * 50 < bench.plan_gib(cfg, "dense", 4096, 16, 16)
    assert bench.choose_micro_batch(cfg, "sparse", 65536, 1, 1) == 1              # nothing fits: one at a time


def test_rows_spec_and_profile_selection():
    assert bench.parse_rows(["h200:4096,16384:dense,sparse", "small:4096:dense:train.replay_topk=false"]) == [
        ("h200", 4096, "dense", ()), ("h200", 4096, "sparse", ()), ("h200", 16384, "dense", ()),
        ("h200", 16384, "sparse", ()), ("small", 4096, "dense", ("train.replay_topk=false",))]
    for bad in ("h200:4096", "h200:4k:dense", "h200:4096:sparce", "h200:4096:dense:replay"):
        with pytest.raises(ValueError, match="row spec"):
            bench.parse_rows([bad])
    assert not bench.wants_profile(None, 4096, "dense")
    assert bench.wants_profile([], 4096, "dense")
    assert bench.wants_profile(["65536:sparse"], 65536, "sparse")
    assert not bench.wants_profile(["65536:sparse"], 65536, "dense")


def test_indexer_side_kernels_exist_and_are_attributed():
    mod = {n: importlib.import_module(f"dsaforge.kernels.{n}") for n in ("indexer", "topk", "kl", "lse", "sparse_mla",
                                                                             "sparse_mla_bwd", "sparse_mla_target")}
    for name in bench.INDEXER_KERNELS:
        assert any(hasattr(m, name) for m in mod.values()), name
    for module, name in [("sparse_mla", "_sparse_mla_fwd_kernel"), ("sparse_mla_bwd", "_sparse_mla_bwd_kernel"),
                         ("sparse_mla_bwd", "_sparse_mla_bwd_dq_kernel"), ("sparse_mla_bwd", "_segment_sum_kernel")]:
        assert hasattr(mod[module], name) and bench.kernel_group(name) == "sparse attention", name
    assert bench.kernel_group("_sparse_mla_bwd_sm90_kernel") == "sparse attention"
    shares = bench.kernel_shares([("_indexer_kl_kernel", 0.2), ("_select_kernel", 0.1), ("_indexer_kl_kernel", 0.1),
                                  ("_sparse_mla_bwd_kernel", 0.3), ("cudnn_generated_fort_native_sdpa_sm90", 0.1),
                                  ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 0.1),
                                  ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel", 0.05),
                                  ("void at::native::vectorized_elementwise_kernel", 0.05)])
    assert shares["device_busy_s"] == pytest.approx(1.0)
    assert shares["groups_s"]["indexer"] == pytest.approx(0.4)
    assert shares["shares"] == pytest.approx({"indexer": 0.4, "sparse attention": 0.3, "dense attention": 0.1,
                                              "matmul": 0.1, "optimizer": 0.05, "other": 0.05})
    assert shares["top_kernels"][0] == {"name": "_indexer_kl_kernel", "s": pytest.approx(0.3), "calls": 2,
                                        "group": "indexer"}
