"""The gates reject what they exist to reject: leaks, nondeterministic verifiers, unsolvable tasks."""
import random
from pathlib import Path

from dsaforge.synth.base import AgentClass, Candidate, EnvDraft
from dsaforge.synth.gates import BaselineSolver, prompt_leaks, validate_env
from dsaforge.synth.task import GATES, Verdict, load_tasks, write_manifest


class Toy(AgentClass):
    """Answer = 7. Knobs make the verifier flaky, the reference wrong, or the solver useless."""
    name = "toy"

    def __init__(self, flaky=False, bad_reference=False, solver_hits=True, accept_empty=False):
        self.flaky, self.bad_reference, self.solver_hits, self.accept_empty = flaky, bad_reference, solver_hits, accept_empty
        self.rng = random.Random(0)

    def reference(self, env_dir, keys, sandbox):
        return [{"answer": 6 if self.bad_reference else 7} for _ in keys]

    def verify(self, env_dir, keys, subs, sandbox):
        out = []
        for s in subs:
            ok = s.get("answer") == 7 or (self.accept_empty and s.get("answer") is None)
            if self.flaky and self.rng.random() < 0.5:
                ok = not ok
            out.append(Verdict(ok, float(ok)))
        return out

    def reset_ok(self, env_dir, keys, sandbox):
        return True

    def attempts(self, env_dir, keys, k, seed, sandbox):
        return [[{"answer": 7 if self.solver_hits and i == k - 1 else 0} for i in range(k)] for _ in keys]


def _draft(prompt="What is three plus four?", leaks=("7",)):
    return EnvDraft("toy-0", "toy", "fam", Path("."), "v.py", [Candidate(f"k{i}", "fam", 1, prompt, [], list(leaks)) for i in range(8)])


def test_a_good_task_passes_every_gate():
    r = validate_env(Toy(), _draft(), None, BaselineSolver(), 3, 0)
    assert len(r.kept) == 8 and all(t.gates == {g: True for g in GATES} for t in r.kept)
    assert all(t.pass_c == 1 and t.pass_k == 3 for t in r.kept)


def test_each_gate_rejects():
    assert validate_env(Toy(bad_reference=True), _draft(), None, BaselineSolver(), 2, 0).rejected == {"reference_passes": 8}
    assert validate_env(Toy(accept_empty=True), _draft(), None, BaselineSolver(), 2, 0).rejected == {"empty_fails": 8}
    assert validate_env(Toy(solver_hits=False), _draft(), None, BaselineSolver(), 2, 0).rejected == {"solvable": 8}
    assert validate_env(Toy(), _draft("Seven: is it 7?"), None, BaselineSolver(), 2, 0).rejected == {"prompt_clean": 8}
    flaky = validate_env(Toy(flaky=True), _draft(), None, BaselineSolver(), 2, 0)
    assert flaky.rejected.get("deterministic", 0) > 0 and len(flaky.kept) < 8


def test_prompt_leak_rules():
    assert prompt_leaks("the total is 1234 units", ["1234"]) == "1234"
    assert prompt_leaks("in 2017 it rained", ["17"]) is None            # short values match whole tokens only
    assert prompt_leaks("answer 17.", ["17"]) == "17"
    assert prompt_leaks("see the hidden tests", []) == "hidden"
    assert prompt_leaks("Plan a trip to Suzhou", ["Lotus River Kitchen of Suzhou"]) is None


def test_manifest_roundtrip(tmp_path):
    r = validate_env(Toy(), _draft(), None, BaselineSolver(), 2, 0)
    write_manifest(r.kept, tmp_path / "tasks.parquet")
    back = load_tasks(tmp_path)
    assert [t.row() for t in back] == [t.row() for t in r.kept]
    assert back[0].root == tmp_path and back[0].key == "k0"
