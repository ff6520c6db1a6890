"""The scaling harness (`python -m dsaforge.model.train.scaling`) on CPU: the sparse stage from the tiny chain's
warm-up, in one process and as TP=2 and EP=2 torchrun jobs launched by the stage itself (gloo), fp32. The losses
must agree with the one-process run as in tests/train/test_parallel.py, and the table must say so.

Run: python -m pytest tests/train/test_scaling.py -q
"""
import json

import pytest

from dsaforge.config import ConfigError
from dsaforge.model.train import scaling


def test_layouts_parse_and_bad_ones_are_named():
    assert scaling.parse_layout("1")["world"] == 1
    assert scaling.parse_layout("tp2") == {"tp": 2, "pp": 1, "ep": 1, "dp": 1, "world": 2}
    assert scaling.parse_layout("ep2") == {"tp": 1, "pp": 1, "ep": 2, "dp": 2, "world": 2}
    assert scaling.parse_layout("tp2.ep2.dp4")["world"] == 8
    with pytest.raises(ConfigError, match="'xp2' is not"):
        scaling.parse_layout("tp2.xp2")
    with pytest.raises(ConfigError, match="must divide"):
        scaling.parse_layout("ep4.dp2")


def test_sparse_stage_scales_to_tp2_and_ep2_with_matching_losses(tmp_path, tiny_chain, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "scaling"
    rc = scaling.main(["--preset", "tiny", "--stage", "sparse", "--layouts", "tp2,ep2", "--steps", "3",
                       "--data", str(tiny_chain["data"]), "--init", str(tiny_chain["warmup"]["dir"]),
                       "--set", "train.device=cpu", "--set", "model.index_topk=16",
                       "--set", "train.sparse.batch_size=4", "--set", "train.sparse.micro_batch_size=2",
                       "--set", "train.sparse.seq_len=64", "--set", "train.sparse.eval_batches=1",
                       "--out", str(out)])
    assert rc == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["layout"]: r for r in res["layouts"]}
    assert list(rows) == ["1", "tp2", "ep2"]
    for name in ("tp2", "ep2"):
        print(f"{name}: max |loss diff| {rows[name]['max_abs_loss_diff']:.2e}, "
              f"efficiency {rows[name]['efficiency']:.2f}")
        assert rows[name]["steps"] == 3 and rows[name]["world"] == 2
        assert rows[name]["max_abs_loss_diff"] < 1e-5
        assert (out / f"sparse-{name}" / "config.json").is_file()      # went through the stage's torchrun launcher
    table = out.with_suffix(".md").read_text()
    assert "| tp2 | 2 | 2 | 1 | 1 | 1 |" in table and "reference" in table
