"""The synthesize stage end to end on the tiny preset: manifest, gates, held-out split, scoring through Task."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsaforge.config import presets
from dsaforge.stages import STAGES, Stage, StageContext, run_stage
from dsaforge.synth.registry import agent_class
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.stage import run
from dsaforge.synth.task import GATES, MANIFEST_SCHEMA, load_tasks
from dsaforge.tracking import NullTracker

from .conftest import requires_bwrap

pytestmark = requires_bwrap


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = presets.tiny()
    tracker = NullTracker()
    summary = run(StageContext(cfg=cfg, out_dir=out, tracker=tracker))
    return cfg, out, tracker, summary


def test_tiny_preset_meets_its_targets(tiny_run):
    cfg, out, tracker, summary = tiny_run
    table = pq.read_table(out / "tasks.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    tasks = load_tasks(out)
    assert len(tasks) == summary["tasks"] == cfg.synth.tasks_per_class * 4
    for cls in cfg.synth.agent_classes:
        mine = [t for t in tasks if t.agent_class == cls]
        assert len(mine) == cfg.synth.tasks_per_class
        assert {t.difficulty for t in mine} == set(range(1, cfg.synth.max_difficulty + 1))
    for t in tasks:
        assert set(GATES) <= set(t.gates) and all(t.gates.values()), t.task_id
        assert 0 < t.pass_c <= t.pass_k == cfg.synth.pass_k
        assert (out / t.verifier.split("::")[0]).exists()
    train = {t.env_id for t in tasks if t.split == "train"}
    held = {t.env_id for t in tasks if t.split == "heldout"}
    assert held and train and not (held & train)
    assert {t.agent_class for t in tasks if t.split == "heldout"} == set(cfg.synth.agent_classes)
    assert tracker.metrics["tasks"][0][1] == len(tasks)
    assert tracker.metrics["general.tasks_per_min"][0][1] > 0
    assert "synth/samples.json" in tracker.artifacts
    assert (out / "swe_instances.jsonl").read_text().count("FAIL_TO_PASS") == cfg.synth.tasks_per_class


def test_tasks_score_through_their_own_contract(tiny_run):
    _, out, _, _ = tiny_run
    sandbox = Sandbox(hide=[str(out)])
    for cls in ("general", "code", "search", "code_interpreter"):
        t = next(t for t in load_tasks(out) if t.agent_class == cls)
        ref = agent_class(cls).reference(t.env_dir, [t.key], sandbox)[0]
        assert t.evaluate(ref, sandbox).passed and t.reward(ref, sandbox) == 1.0
        assert t.reward(agent_class(cls).empty(t.key), sandbox) == 0.0


def test_registered_stage_reads_the_data_stage_documents(tmp_path, monkeypatch):
    docs = tmp_path / "data"
    docs.mkdir()
    texts = [f"Document {i}: notes on river trade, harbour tolls and the guild ledgers of town {i}. " * 3 for i in range(80)]
    pq.write_table(pa.table({"id": [str(i) for i in range(80)], "text": texts, "source": ["t"] * 80,
                             "bytes": [len(t) for t in texts], "sha256": ["0"] * 80}), docs / "documents.parquet")
    monkeypatch.setitem(STAGES, "synthesize", Stage("synthesize", "dsaforge.synth.stage:run", ("prepare-data",), "test"))
    cfg = presets.tiny()
    cfg.synth.agent_classes = ["search"]
    summary = run_stage("synthesize", cfg, tmp_path / "out", inputs={"prepare-data": docs})
    assert summary["tasks"] == cfg.synth.tasks_per_class
    info = json.loads((tmp_path / "out" / "summary.json").read_text())["corpus"]
    assert info["source"] == "prepare-data" and info["documents"] == 80


def test_module_cli_per_class_targets(tmp_path):
    from dsaforge.synth.__main__ import PAPER_SCALE, main

    assert sum(t for t, _ in PAPER_SCALE.values()) >= 85_000 and sum(e for _, e in PAPER_SCALE.values()) >= 1_800
    summary = main(["--out", str(tmp_path), "--targets", "general=3:1,search=5:2", "--max-difficulty", "2"])
    assert summary["classes"]["general"]["tasks"] == 3 and summary["classes"]["search"]["tasks"] == 5
    assert set(summary["classes"]) == {"general", "search"}


def test_stage_reads_per_class_targets_and_corpus_size_from_config(tmp_path):
    from dsaforge.config import load_config

    cfg = load_config("tiny", overrides=["synth.agent_classes=[general, search]", "synth.targets={general: [3, 1]}",
                                         "synth.corpus_documents=60"])
    summary = run(StageContext(cfg=cfg, out_dir=tmp_path / "out", tracker=NullTracker()))
    full = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["per_class"]["general"]["tasks"] == 3 and full["classes"]["general"]["envs"] == 1
    assert summary["per_class"]["search"]["tasks"] == cfg.synth.tasks_per_class
    assert full["corpus"]["documents"] <= 60


def test_chat_solver_needs_an_endpoint():
    from dsaforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="solver=chat needs solver_endpoint"):
        load_config("tiny", overrides=["synth.solver=chat"])
    with pytest.raises(ConfigError, match="synth.targets.generl"):
        load_config("tiny", overrides=["synth.targets={generl: [3, 1]}"])
