"""General agent: tools over a real SQLite database, verifiers over answer + final state, tool-only solutions."""
import json
import sqlite3
import textwrap

import pytest

from dsaforge.synth.gates import BaselineSolver, validate_env
from dsaforge.synth.general import GeneralAgent, family_module, tool_schemas
from dsaforge.synth.general.harness import tool_only_problems

from .conftest import requires_bwrap

pytestmark = requires_bwrap


@pytest.fixture(scope="module")
def agent():
    return GeneralAgent()


@pytest.mark.parametrize("family", ["trip", "calendar", "ledger"])
def test_reference_passes_and_gates_hold(agent, sandbox, tmp_path, family):
    draft = agent.build_env(f"g-{family}", family, 7, 3, tmp_path / family, {})
    assert draft.candidates and (tmp_path / family / "db.sqlite").exists()
    keys = [c.key for c in draft.candidates]
    refs = agent.reference(draft.dir, keys, sandbox)
    assert all(r is not None for r in refs)
    assert all(v.passed for v in agent.verify(draft.dir, keys, refs, sandbox))
    empty = agent.verify(draft.dir, keys, [{"answer": None, "calls": []}] * len(keys), sandbox)
    assert not any(v.passed for v in empty)
    report = validate_env(agent, draft, sandbox, BaselineSolver(), 3, 7)
    for t in report.kept:
        assert all(t.gates.values()) and t.gates["solution_tool_only"] and t.pass_c >= 1


def test_toolset_grows_with_difficulty():
    fam = family_module("trip")
    names = [{t["function"]["name"] for t in tool_schemas(fam, d)} for d in (1, 2, 3)]
    assert names[0] < names[1] < names[2]
    assert "get_inter_city_transport" in names[2] and "get_rating" not in names[0]


def test_trip_verifier_checks_constraints_against_the_database(agent, sandbox, tmp_path):
    draft = agent.build_env("g-trip", "trip", 3, 2, tmp_path / "t", {})
    key = draft.candidates[-1].key
    ref = agent.reference(draft.dir, [key], sandbox)[0]
    params = json.loads((draft.dir / "tasks.json").read_text())[key]["params"]
    conn = sqlite3.connect(draft.dir / "db.sqlite")
    city = params["route"][0]
    # Independent check of the reference plan's cost, straight from SQL.
    cost = sum(conn.execute("SELECT price FROM hotel WHERE name=?", (d["hotel"],)).fetchone()[0]
               + conn.execute("SELECT price FROM restaurant WHERE name=?", (d["restaurant"],)).fetchone()[0]
               + conn.execute("SELECT ticket FROM attraction WHERE name=?", (d["attraction"],)).fetchone()[0]
               for d in ref["answer"])
    assert cost <= params["budget"]
    pricey = conn.execute("SELECT name FROM hotel WHERE city=? ORDER BY price DESC", (city,)).fetchone()[0]
    over = json.loads(json.dumps(ref))
    over["answer"][0]["hotel"] = pricey
    repeat = json.loads(json.dumps(ref))
    repeat["answer"][1]["restaurant"] = repeat["answer"][0]["restaurant"]
    wrong_city = json.loads(json.dumps(ref))
    wrong_city["answer"][0]["city"] = "Atlantis"
    v = agent.verify(draft.dir, [key] * 3, [over, repeat, wrong_city], sandbox)
    expensive = conn.execute("SELECT price FROM hotel WHERE name=?", (pricey,)).fetchone()[0]
    cheap = conn.execute("SELECT price FROM hotel WHERE name=?", (ref["answer"][0]["hotel"],)).fetchone()[0]
    if cost - cheap + expensive > params["budget"]:
        assert not v[0].passed and "budget" in v[0].detail
    assert not v[1].passed and "repeats" in v[1].detail
    assert not v[2].passed


def test_calendar_final_state_is_what_counts(agent, sandbox, tmp_path):
    draft = agent.build_env("g-cal", "calendar", 5, 1, tmp_path / "c", {})
    key = draft.candidates[0].key
    ref = agent.reference(draft.dir, [key], sandbox)[0]
    assert any(c["name"] == "book_meeting" for c in ref["calls"])
    answer_only = {"answer": ref["answer"], "calls": [c for c in ref["calls"] if c["name"] != "book_meeting"]}
    later = json.loads(json.dumps(ref))
    for c in later["calls"]:
        if c["name"] == "book_meeting":
            c["arguments"]["start"] += 15          # a valid-looking booking that is not the earliest slot
    v = agent.verify(draft.dir, [key] * 3, [ref, answer_only, later], sandbox)
    assert v[0].passed and not v[1].passed and not v[2].passed


def test_tool_calls_are_served_statelessly(agent, sandbox, tmp_path):
    draft = agent.build_env("g-led", "ledger", 2, 1, tmp_path / "l", {})
    key = draft.candidates[0].key
    accounts = agent.call_tool(draft.dir, key, [], {"name": "list_accounts", "arguments": {}}, sandbox)
    conn = sqlite3.connect(draft.dir / "db.sqlite")
    assert [a["id"] for a in accounts] == [r[0] for r in conn.execute("SELECT id FROM account ORDER BY id")]
    bad = agent.call_tool(draft.dir, key, [], {"name": "drop_tables", "arguments": {}}, sandbox)
    assert "error" in bad


def test_solutions_may_only_call_tools(tmp_path, sandbox):
    fam = family_module("ledger")
    assert tool_only_problems(fam) == []
    cheat = tmp_path / "cheat.py"
    cheat.write_text(open(fam.__file__).read() + textwrap.dedent('''

        def solve(tools, params, rng):
            rows = open("db.sqlite", "rb").read()
            return {"vendor": "x", "flagged": len(rows)}
    '''))
    import importlib.util

    spec = importlib.util.spec_from_file_location("cheat", cheat)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert any("open" in p for p in tool_only_problems(mod))
    # At run time the harness refuses it as well (and would find no `open` in the solution's globals).
    agent = GeneralAgent()
    draft = agent.build_env("g-led", "ledger", 2, 1, tmp_path / "l", {})
    (draft.dir / "family.py").write_text(cheat.read_text())
    assert agent.reference(draft.dir, [draft.candidates[0].key], sandbox) == [None]
