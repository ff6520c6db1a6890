"""The GPU benchmark script runs end to end at tiny sizes on the CPU (so an H200 run cannot die on a typo)."""
import json

import pytest
import torch

from dsaforge.model import bench_generate

pytestmark = pytest.mark.slow


def test_bench_generate_tiny(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench_generate.main(["--tiny", "--out", str(tmp_path / "gen")]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "gen.json").read_text())
    ro = res["rollout"]
    assert ro["transformers"]["tokens_per_s"] > 0 and ro["engine_sparse_eager"]["new_tokens"] == 4 * 16
    assert ro["engine_dense_eager"]["vs_transformers"] > 0
    assert set(res["sparse_decode"]) == {"b1", "b2"} and "| 1 |" in (tmp_path / "gen.md").read_text()


def test_bench_generate_profile_tiny(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench_generate.main(["--tiny", "--profile", "--out", str(tmp_path / "gen")]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "gen_profile.json").read_text())
    assert set(res["steps_profile"]) == {"sparse_b1", "dense_b1", "sparse_b4", "dense_b4"}
    row = res["steps_profile"]["sparse_b4"]
    assert row["launches_per_layer_per_step"] > 10 and row["top"] and 0 < row["top"][0]["share"] <= 1
    assert "aten::view" not in {r["name"] for r in row["top"]}
    assert set(res["decode_kernel"]) == {"b1_unsorted", "b1_ascending", "b2_unsorted", "b2_ascending"}
    assert "top kernels" in (tmp_path / "gen_profile.md").read_text()
