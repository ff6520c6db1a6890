"""The benchmark harness (`python -m dsaforge.kernels.bench`) runs end to end at tiny sizes on CPU, every row
filled and none failed, so the GPU run is not the first time its code executes."""
from dsaforge.kernels import bench


def test_bench_tiny_runs_every_row_without_errors(capsys):
    res = bench.main(["--tiny", "--budget-s", "600"])
    assert len(res["kernels"]) == 4 and len(res["layers"]) == 4 and len(res["decode"]) == 2
    for row in res["kernels"] + res["layers"] + res["decode"]:
        assert not [k for k in row if "error" in k], row
    for row in res["kernels"]:
        for key in ("fwd_ms", "bwd_ms", "indexer_topk_fp8_ms", "indexer_topk_rerank_ms", "topk_ms",
                    "kl_sparse_fwdbwd_ms"):
            assert row.get(key, 0) > 0, (key, row)
    for row in res["layers"]:
        for key in ("dsa_fwd_ms", "dsa_fwd_rerank_ms", "dsa_fwdbwd_kl_ms", "sdpa_fwd_ms", "speedup_fwd_rerank"):
            assert row.get(key, 0) > 0, (key, row)
    assert "| shape | L |" in capsys.readouterr().out
