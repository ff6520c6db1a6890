"""Fan-out of synthesis: shards built apart (as parallel pipeline tasks would) and merged give the same tasks as
one unsharded run, task for task; the merge refuses an incomplete or foreign shard set and publishes atomically.

Run: python -m pytest tests/synth/test_fanout.py -q
"""
import json

import pyarrow.parquet as pq
import pytest

from dsaforge.config import load_config
from dsaforge.synth.generate import SynthesisError, merge_shards, synthesize, synthesize_shard
from tests.synth.conftest import requires_bwrap


def _cfg(*sets):
    # general and search: their gates are deterministic. (The code class's baseline repair search stops after 2 s
    # of wall time, so on a loaded machine its pass@k differs between any two runs, sharded or not.)
    # No over-build: the merge then builds the top-up rounds itself, which the comparison covers too.
    return load_config("tiny", overrides=["synth.agent_classes=[general, search]", "synth.tasks_per_class=7",
                                          "synth.envs_per_class=3", "synth.workers=1", "synth.shard_overbuild=0",
                                          *sets]).synth


def _rows(path):
    table = pq.read_table(path / "tasks.parquet").to_pylist()
    return sorted((json.dumps(r, sort_keys=True, default=str) for r in table))


@requires_bwrap
def test_sharded_equals_unsharded_task_for_task(tmp_path):
    cfg = _cfg()
    whole = synthesize(cfg, tmp_path / "whole")
    shard_dirs = [tmp_path / f"shard-{i}" for i in range(2)]
    for i, d in enumerate(shard_dirs):
        synthesize_shard(cfg, d, i, 2)
    merged = merge_shards(cfg, shard_dirs, tmp_path / "merged")
    assert merged["tasks"] == whole["tasks"] > 0 and merged["shards"] == 2
    assert merged["classes"] == {k: dict(v, wall_s=merged["classes"][k]["wall_s"],
                                         tasks_per_min=merged["classes"][k]["tasks_per_min"])
                                 for k, v in whole["classes"].items()}
    assert _rows(tmp_path / "merged") == _rows(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "merged" / "envs").iterdir()) == \
        sorted(p.name for p in (tmp_path / "whole" / "envs").iterdir())
    assert not (tmp_path / "merged.partial").exists()


@requires_bwrap
def test_merge_refuses_incomplete_or_foreign_shards(tmp_path):
    cfg = _cfg("synth.agent_classes=[general]")
    d0, d1 = tmp_path / "s0", tmp_path / "s1"
    synthesize_shard(cfg, d0, 0, 2)
    with pytest.raises(SynthesisError, match="has no shard.json"):
        merge_shards(cfg, [d0, d1], tmp_path / "out")
    with pytest.raises(SynthesisError, match=r"incomplete or mixed shard set: shards \[0\] of \[2\]"):
        merge_shards(cfg, [d0], tmp_path / "out")
    synthesize_shard(cfg, d1, 1, 2)
    over = _cfg("synth.agent_classes=[general]", "synth.shard_overbuild=1")
    with pytest.raises(SynthesisError, match="another synth config"):        # over-build is part of the config
        merge_shards(over, [d0, d1], tmp_path / "out")
    with pytest.raises(SynthesisError, match="another synth config"):
        merge_shards(_cfg("synth.agent_classes=[general]", "synth.seed=1"), [d0, d1], tmp_path / "out")
    assert not (tmp_path / "out").exists()
