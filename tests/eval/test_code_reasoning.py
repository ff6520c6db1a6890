"""HumanEval in the bubblewrap sandbox (canonical solutions pass, empty and hostile completions fail) and reasoning-gym
answers scored by their own verifiers through the suite's extraction."""
import pytest

from dsaforge.config import SandboxConfig
from dsaforge.eval import code, reasoning
from dsaforge.synth import sandbox as sbx

requires_bwrap = pytest.mark.skipif(sbx.bwrap_problem() is not None, reason=f"bwrap unusable: {sbx.bwrap_problem()}")
CFG = SandboxConfig(wall_seconds=5)


@requires_bwrap
def test_humaneval_harness_separates_right_wrong_and_hostile():
    problems = code.load_problems(3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    p = problems[0]
    completions = [[p["canonical_solution"],                                       # passes
                    "    return False\n",                                          # wrong
                    "    while True:\n        pass\n",                             # killed by the wall clock
                    "    import socket\n    socket.create_connection(('1.1.1.1', 53), 1)\n    return True\n",
                    "    open('/etc/hostile', 'w').write('x')\n    return True\n",  # read-only root
                    "    return True\n\ndef has_close_elements(*a):\n    return True\n"]]   # cut at the second def
    rows = code.score([p], completions, CFG)
    assert [r["passed"] for r in rows] == [True, False, False, False, False, False]
    assert "wall-clock" in rows[2]["detail"]
    assert "def " not in rows[5]["completion"]
    s = code.summarize_rows(rows, [2, 4])
    assert s["problems"] == 1 and s["pass_at_1"] == pytest.approx(1 / 6)
    assert s["pass_at_2"] == pytest.approx(1 - 10 / 15)


@requires_bwrap
@pytest.mark.slow
def test_humaneval_canonical_164_pass_and_empty_164_fail():
    gate = code.canonical_check(SandboxConfig())
    assert gate["problems"] == 164
    assert gate["canonical_passed"] == 164, gate["canonical_failures"][:3]
    assert gate["empty_passed"] == 0


def test_reasoning_gym_verifiers_score_extracted_answers():
    tasks = reasoning.load_tasks(["leg_counting", "basic_arithmetic"], per_task=3, seed=0)
    for name, ds, entries in tasks:
        right = [[f" {e['answer']}</answer>", f"{e['answer']}\nmore text"] for e in entries]
        wrong = [[" 123456789</answer>", ""] for _ in entries]
        rows = reasoning.score_completions(ds, entries, right, name)
        assert all(r["score"] == 1.0 and r["passed"] for r in rows), rows
        rows = reasoning.score_completions(ds, entries, wrong, name)
        assert not any(r["passed"] for r in rows) and rows[1]["answer"] is None
    prompt = reasoning.PROMPT.format(question=tasks[0][2][0]["question"])
    assert prompt.endswith("<answer>") and str(tasks[0][2][0]["answer"]) not in prompt.split("\n")[-1]


def test_reasoning_answer_extraction():
    assert reasoning.answer_from_completion(" 12 </answer> trailing") == "12"
    assert reasoning.answer_from_completion("\n\n 7 \nsecond line") == "7"
    assert reasoning.answer_from_completion("   ") is None


def test_unknown_reasoning_task_is_a_config_error():
    from dsaforge.config import ConfigError
    with pytest.raises(ConfigError, match="no_such_task"):
        reasoning.load_tasks(["no_such_task"], 1, 0)
