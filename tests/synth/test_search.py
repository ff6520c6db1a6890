"""Search agent: BM25 retrieval, multi-hop ground truth, distractors, ambiguity rejection."""
import json

import pytest

from dsaforge.synth.search import SearchAgent
from dsaforge.synth.search import harness as SH
from dsaforge.synth.search.corpus import build_corpus

from .conftest import requires_bwrap


def test_bm25_prefers_the_document_with_rare_terms():
    docs = [{"id": "a", "title": "a", "text": "the bridge was built long ago by many people"},
            {"id": "b", "title": "b", "text": "Varnok Bridge was built by Quill Works."},
            {"id": "c", "title": "c", "text": "the the the bridge bridge"}]
    hits = SH.Index(docs).search("Varnok Bridge built by", 3)
    assert hits[0]["id"] == "b"


@pytest.fixture()
def env(tmp_path, sandbox):
    build_corpus(tmp_path / "search" / "corpus.jsonl", None, limit=300)
    agent = SearchAgent()
    draft = agent.build_env("s-1", "landmarks", 4, 3, tmp_path / "envs" / "s-1",
                            {"sandbox": sandbox, "corpus": tmp_path / "search" / "corpus.jsonl"})
    return agent, draft


@requires_bwrap
def test_multi_hop_ground_truth_and_distractors(env, sandbox):
    agent, draft = env
    tasks = json.loads((draft.dir / "tasks.json").read_text())
    keys = [c.key for c in draft.candidates]
    assert [len(tasks[k]["chain"]) for k in keys] == [2, 3, 4]
    for c in draft.candidates:
        assert c.extra_gates == {"ground_truth_checked": True, "distractors_wrong": True}
        assert all(h not in c.prompt for h in tasks[c.key]["hops"])
    refs = agent.reference(draft.dir, keys, sandbox)
    assert [r["answer"] for r in refs] == [tasks[k]["answer"] for k in keys]
    distractors = [{"answer": d} for k in keys for d in tasks[k]["distractors"]]
    dkeys = [k for k in keys for _ in tasks[k]["distractors"]]
    assert not any(v.passed for v in agent.verify(draft.dir, dkeys, distractors, sandbox))
    # Case and punctuation do not matter, the content does.
    loose = [{"answer": " " + tasks[keys[0]]["answer"] + "."}]
    assert agent.verify(draft.dir, keys[:1], loose, sandbox)[0].passed
    hit = agent.call_tool(draft.dir, {"name": "search", "arguments": {"query": tasks[keys[0]]["start"] + " built by"}}, sandbox)
    assert any(tasks[keys[0]]["start"] in h["title"] for h in hit)


@requires_bwrap
def test_conflicting_statement_fails_the_ground_truth_check(env, sandbox):
    agent, draft = env
    tasks = json.loads((draft.dir / "tasks.json").read_text())
    t = tasks["d1-0"]
    with open(draft.dir / "facts.jsonl", "a") as f:   # a second, contradicting statement makes the question ambiguous
        f.write(json.dumps({"id": "x", "title": "x", "text": f"{t['start']} was built by Someone Else Works.\n"}) + "\n")
    r = agent._run(draft.dir, {"op": "check", "items": [{"key": "d1-0"}]}, sandbox)[0]
    assert r["ground_truth_ok"] is False
