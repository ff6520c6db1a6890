"""Code agent: bug injection, F2P/P2P selection, patch handling and that the fix cannot be read from inside."""
import ast
import importlib.util
import json
import random
import shutil
import subprocess

import pytest

from dsaforge.synth.code import CodeAgent, agent_sandbox
from dsaforge.synth.code import harness as H
from dsaforge.synth.gates import BaselineSolver, validate_env

from .conftest import requires_bwrap

SOURCE = open(importlib.util.find_spec("colorsys").origin).read()


def test_injected_sites_parse_and_change_one_line():
    sites = H.sites(SOURCE)
    assert len(sites) > 20
    rng = random.Random(0)
    for s in rng.sample(sites, 20):
        mutated = H.apply_sites(SOURCE, [s])
        ast.parse(mutated)
        diff = [a for a, b in zip(SOURCE.splitlines(), mutated.splitlines()) if a != b]
        assert len(diff) == 1


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch not installed")
def test_patch_roundtrip_agrees_with_gnu_patch(tmp_path):
    rng = random.Random(1)
    buggy = H.apply_sites(SOURCE, rng.sample(H.sites(SOURCE), 3))
    diff = H.unified_diff(buggy, SOURCE, "colorsys.py")
    assert H.apply_patch(buggy, diff) == SOURCE
    (tmp_path / "colorsys.py").write_text(buggy)
    subprocess.run(["patch", "-p1", "-s"], input=diff.encode(), cwd=tmp_path, check=True)
    assert (tmp_path / "colorsys.py").read_text() == SOURCE     # the independent reference applier agrees
    with pytest.raises(ValueError):
        H.apply_patch(SOURCE, diff)         # removed lines that are not there: refused, not fuzzily applied
    assert H.apply_patch(buggy, "") == buggy


@requires_bwrap
def test_env_selects_f2p_and_hides_the_fix(sandbox, tmp_path):
    agent = CodeAgent()
    draft = agent.build_env("c-colorsys", "colorsys", 11, 2, tmp_path / "c", {"sandbox": sandbox})
    assert draft.candidates
    tasks = json.loads((draft.dir / "hidden" / "tasks.json").read_text())
    keys = [c.key for c in draft.candidates]
    for k in keys:
        t = tasks[k]
        assert t["FAIL_TO_PASS"] and set(t["FAIL_TO_PASS"]).isdisjoint(t["PASS_TO_PASS"])
        inst = t["instance"]
        assert {"instance_id", "repo", "patch", "FAIL_TO_PASS", "PASS_TO_PASS", "base_commit"} <= set(inst)
        assert sorted((draft.dir / k / "repo").iterdir())[0].name == "colorsys.py"   # the agent sees only the repo
    gold = agent.reference(draft.dir, keys, sandbox)
    empty = [agent.empty(k) for k in keys]
    bogus = [{"patch": "--- a/colorsys.py\n+++ b/colorsys.py\n@@ -1,1 +1,1 @@\n-nonsense\n+more\n"}] * len(keys)
    v = agent.verify(draft.dir, keys * 3, gold + empty + bogus, sandbox)
    n = len(keys)
    assert all(x.passed for x in v[:n]) and not any(x.passed for x in v[n:])
    assert "does not apply" in v[-1].detail
    for c in draft.candidates:
        assert c.extra_gates["fix_hidden"] and c.prompt.count("colorsys") >= 2
        assert tasks[c.key]["gold_patch"] not in c.prompt
    # From an agent's sandbox the pristine module is unreadable, while a plain sandbox can read it (control).
    probe = f"print(len(open({importlib.util.find_spec('colorsys').origin!r}).read()))"
    assert agent_sandbox("colorsys", sandbox).run_python(probe).stdout.strip() == "0"
    assert int(sandbox.run_python(probe).stdout.strip()) == len(SOURCE)
    report = validate_env(agent, draft, sandbox, BaselineSolver(), 2, 11)
    assert all(all(t.gates.values()) for t in report.kept)


@requires_bwrap
def test_agent_code_cannot_read_what_it_is_verified_against(sandbox, tmp_path):
    """A correct patch that also looks for the verifier's data (the hidden folder on disk, expected outcomes or the
    gold patch in memory) passes only if it finds nothing: were anything visible, its import would fail."""
    agent = CodeAgent()
    draft = agent.build_env("c-colorsys", "colorsys", 11, 1, tmp_path / "c", {"sandbox": sandbox})
    tasks = json.loads((draft.dir / "hidden" / "tasks.json").read_text())
    key = draft.candidates[0].key
    buggy = (draft.dir / key / "repo" / "colorsys.py").read_text()
    fixed = H.apply_patch(buggy, tasks[key]["gold_patch"])
    probe = ("import gc as _gc, glob as _glob, os as _os\n"
             "assert not _glob.glob('/tmp/hidden*') and not _glob.glob('/tmp/**/tests.json', recursive=True)\n"
             "assert not any(isinstance(_o, dict) and ('expect' in _o or 'gold_patch' in _o) "
             "for _o in _gc.get_objects())\n")
    snooping = H.unified_diff(buggy, probe + fixed, "colorsys.py")
    plain = H.unified_diff(buggy, fixed, "colorsys.py")
    v = agent.verify(draft.dir, [key, key], [{"patch": plain}, {"patch": snooping}], sandbox)
    assert v[0].passed and v[1].passed, [x.detail for x in v]
