"""Exact scorers: pass@k and pass^k against the closed forms, and answer extraction's edge cases."""
import math

import pytest

from dsaforge.eval.extract import HUMANEVAL_STOPS, boxed, cut_at_stops, extract_answer, extract_code, strip_thinking
from dsaforge.eval.passk import mean_pass_at_k, pass_at_k, pass_hat_k, summarize


def test_pass_at_k_equals_the_binomial_closed_form():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
                assert pass_hat_k(n, c, k) == pytest.approx(math.comb(c, k) / math.comb(n, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_stays_exact():
    # C(200, 100) overflows a float; the product form does not need it
    want = 1 - math.comb(150, 100) / math.comb(200, 100)
    assert pass_at_k(200, 50, 100) == pytest.approx(want, rel=1e-9)
    assert pass_hat_k(200, 199, 100) == pytest.approx(math.comb(199, 100) / math.comb(200, 100), rel=1e-9)


def test_pass_at_k_edge_cases_and_reductions():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_hat_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0 and pass_hat_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0                          # fewer than k failures: every draw holds a pass
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7) == pass_hat_k(7, 3, 1)   # k = 1: both are c / n
    assert pass_hat_k(4, 2, 3) == 0.0
    for bad in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summaries_average_tasks_and_skip_k_above_n():
    counts = [(4, 1), (4, 4), (4, 0)]
    s = summarize(counts, [1, 2, 8])
    assert set(s) == {"pass_at_1", "pass_hat_1", "pass_at_2", "pass_hat_2"}
    assert s["pass_at_1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert s["pass_at_2"] == pytest.approx(mean_pass_at_k(counts, 2)) == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["pass_hat_2"] == pytest.approx((0 + 1 + 0) / 3)


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", "42"),
    ("<think>maybe 7</think>\nFinal answer: 12", "12"),
    ("<think>I think the answer is 3", None),                        # cut mid-thought: no answer
    ("<answer>first</answer> then <answer> second </answer>", "second"),
    ("<answer></answer>", ""),
    ("so \\boxed{\\frac{1}{2}} and again \\boxed{x^{2}}", "x^{2}"),
    ("\\boxed{unbalanced", "\\boxed{unbalanced"),                    # no box: falls back to the last line
    ("line one\n\n  last line  \n", "last line"),
    ("", None),
    (None, None),
    ("<think>a</think><think>b</think>answer: 5", "5"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_boxed_and_thinking_helpers():
    assert boxed("\\boxed {a{b}c}") == "a{b}c"
    assert boxed("no box") is None
    assert strip_thinking("plain") == "plain" and strip_thinking("<think>x") is None


def test_code_extraction_and_stops():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"                 # unterminated fence runs to the end
    assert extract_code("x = 2") == "x = 2"
    body = "    return a + b\n\n\ndef other():\n    pass\n"
    assert cut_at_stops(body, HUMANEVAL_STOPS) == "    return a + b\n\n"
    assert cut_at_stops("    x = 1\nif __name__ == '__main__':\n    f()", HUMANEVAL_STOPS) == "    x = 1"
    assert cut_at_stops("no stop", HUMANEVAL_STOPS) == "no stop"
