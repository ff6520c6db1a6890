"""Code interpreter: generator answers cross-checked by brute force, kernel execution, numeric verification."""
import random

import pytest

from dsaforge.synth.gates import BaselineSolver, validate_env
from dsaforge.synth.interpreter import CodeInterpreterAgent
from dsaforge.synth.interpreter.families import modular_count, series_sum
from dsaforge.synth.interpreter.harness import close

from .conftest import requires_bwrap


@pytest.mark.parametrize("seed", range(6))
def test_modular_count_period_formula_matches_brute_force(seed):
    p = modular_count(random.Random(seed), 1 + seed % 3)
    ns = {}
    exec(p["reference"], ns)            # the reference program, run here by plain Python as an oracle
    assert ns["answer"] == p["expect"]


def test_numeric_tolerance():
    assert close(1.0000000001, 1.0) and close("42", 42) and not close(1.001, 1.0)
    assert not close(None, 0) and not close("abc", 1) and not close(float("nan"), 1) and not close(float("inf"), 1)


@requires_bwrap
def test_kernel_runs_reference_and_rejects_mistakes(sandbox, tmp_path):
    agent = CodeInterpreterAgent()
    draft = agent.build_env("ci-sales", "sales_data", 3, 2, tmp_path / "ci", {})
    keys = [c.key for c in draft.candidates]
    refs = agent.reference(draft.dir, keys, sandbox)
    assert all(r is not None for r in refs)
    assert all(v.passed for v in agent.verify(draft.dir, keys, refs, sandbox))
    res = agent.run_cells(draft.dir, keys[:1] * 3, ["answer = 1/0", "import os\nanswer = len(os.listdir('.'))",
                                                    "import socket\nsocket.create_connection(('1.1.1.1', 80), 2)"], sandbox)
    assert "ZeroDivisionError" in res[0]["error"]
    assert res[1]["answer"] >= 1                     # the task's data files are in the kernel's directory
    assert res[2]["error"] and "OSError" in res[2]["error"] or "unreachable" in res[2]["error"]
    report = validate_env(agent, draft, sandbox, BaselineSolver(), 2, 3)
    assert report.kept and all(all(t.gates.values()) for t in report.kept)


def test_series_prompt_does_not_leak_answer():
    p = series_sum(random.Random(0), 2)
    assert f"{p['expect']:.6g}" not in p["prompt"]
