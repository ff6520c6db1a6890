"""Episodes served in batches: `step_many` runs the tool calls and `submit_many` the verdicts of an environment's
episodes in one sandboxed run, with the outputs and verdicts of running each alone; a shared run that fails as a
whole is redone one episode at a time, so one episode cannot fail its siblings. The rollout runner uses both."""
import json
import re

import pytest

from dsaforge.data.chat import AssistantTurn, ToolCall
from dsaforge.rollout import RolloutConfig, run_episodes
from dsaforge.rollout.policy import Turn, Window
from dsaforge.synth.episode import make_episode, step_many, submit_many
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import load_tasks
from dsaforge.synth.tiny_rl import write_tiny_rl

from .conftest import requires_bwrap

pytestmark = requires_bwrap


class Counting(Sandbox):
    """A sandbox that counts its runs; with `crash_shared`, a run given more than one item crashes as a whole."""
    runs = 0
    crash_shared = False

    def run(self, argv, files=None, workdir=None, stdin=None, wall_seconds=None):
        type(self).runs += 1
        if self.crash_shared and stdin and len(json.loads(stdin).get("items", [])) > 1:
            files = {**files, "harness.py": "import sys; sys.exit(3)"}
        return super().run(argv, files=files, workdir=workdir, stdin=stdin, wall_seconds=wall_seconds)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lookup")
    write_tiny_rl(out, envs=2, heldout_envs=0)
    by_env: dict[str, list] = {}
    for t in load_tasks(out):
        by_env.setdefault(t.env_id, []).append(t)
    return [t for env in sorted(by_env) for t in by_env[env][:4]], out       # 4 tasks from each of 2 environments


def _name(task) -> str:
    return re.search(r'"([^"]+)"', task.prompt).group(1)


def _played(tasks, box):
    """Episodes that called get_code for their item (every other one asking for the wrong item), and submissions
    answering the code the tool returned (every third one a wrong answer)."""
    eps, subs = [], []
    for i, t in enumerate(tasks):
        ep = make_episode(t, box)
        ep.reset()
        obs = json.loads(ep.step({"name": "get_code", "arguments": {"name": _name(t) if i % 2 == 0 else "nothing"}}))
        code = obs.get("code")
        subs.append({"answer": "wrong" if i % 3 == 2 else code})
        eps.append(ep)
    return eps, subs


def test_submit_many_gives_each_episodes_verdict_with_one_run_per_environment(tasks):
    tasks, root = tasks
    box = Counting(hide=[str(root.resolve())])
    eps, subs = _played(tasks, box)
    alone = [ep.submit(s) for ep, s in zip(eps, subs)]
    assert any(v.passed for v in alone) and not all(v.passed for v in alone)
    Counting.runs = 0
    together = submit_many(eps, subs)
    assert Counting.runs == 2                                       # one verifier run per environment
    assert [(v.passed, v.score, v.detail) for v in together] == [(v.passed, v.score, v.detail) for v in alone]


def test_a_shared_run_that_fails_is_redone_one_episode_at_a_time(tasks):
    tasks, root = tasks
    box = Counting(hide=[str(root.resolve())])
    eps, subs = _played(tasks, box)
    alone = [ep.submit(s) for ep, s in zip(eps, subs)]
    box.crash_shared = True
    Counting.runs = 0
    together = submit_many(eps, subs)
    assert Counting.runs == 2 + len(eps)                            # the two shared runs failed, then each alone
    assert [v.passed for v in together] == [v.passed for v in alone]
    assert not any(v.harness_failed for v in together)


def test_step_many_gives_each_episodes_observations_with_one_run_per_environment_and_round(tasks):
    tasks, root = tasks
    box = Counting(hide=[str(root.resolve())])
    calls = [[{"name": "get_code", "arguments": {"name": _name(t)}}, {"name": "get_code", "arguments": {"name": "x"}},
              {"name": "nope", "arguments": {}}][:1 + i % 3] for i, t in enumerate(tasks)]
    alone, together = [], []
    for t, cs in zip(tasks, calls):
        ep = make_episode(t, box)
        ep.reset()
        alone.append([ep.step(c) for c in cs])
    eps = [make_episode(t, box) for t in tasks]
    for ep in eps:
        ep.reset()
    Counting.runs = 0
    together = step_many(eps, calls)
    assert together == alone and all('"code"' in o[0] for o in together)
    assert "unknown tool" in together[2][2]                         # an invalid call is answered without a run
    assert Counting.runs == 2 * 2                                   # 2 environments x 2 rounds of valid calls
    assert [ep.calls for ep in eps] == [[c for c in cs if c["name"] == "get_code"] for cs in calls]
    box.crash_shared = True
    for ep in eps:
        ep.reset()
    Counting.runs = 0
    assert step_many(eps, calls) == alone
    assert Counting.runs == 2 * 2 + sum(sum(c["name"] == "get_code" for c in cs) for cs in calls)


class LookupPolicy:
    """A scripted message-level policy: call get_code for the prompt's item, then answer the code it returned."""
    captures, max_context = frozenset(), 10_000

    def __init__(self):
        self.ready, self.last = [], {}

    def begin(self, key, messages, tools):
        name = re.search(r'"([^"]+)"', messages[-1]["content"]).group(1)
        self.ready.append((key, Turn(AssistantTurn(tool_calls=[ToolCall("get_code", {"name": name})],
                                                   finished=True), "stop")))

    def extend(self, key, tool_messages):
        code = json.loads(tool_messages[-1]["content"]).get("code")
        self.ready.append((key, Turn(AssistantTurn(content=json.dumps({"answer": code}), finished=True), "stop")))

    def poll(self):
        out, self.ready = self.ready, []
        return out

    def end(self, key):
        return Window()

    def context_used(self, key, tool_messages):
        return 0

    def prompt_tokens(self, messages, tools):
        return 0


def test_the_runner_verifies_each_environments_episodes_in_one_run(tasks):
    tasks, root = tasks
    box = Counting(hide=[str(root.resolve())])
    group = [t for t in tasks for _ in range(3)]                    # 3 samples of each of 8 prompts, 2 environments
    Counting.runs = 0
    trajs = run_episodes(LookupPolicy(), [make_episode(t, box) for t in group], RolloutConfig(max_turns=2))
    assert all(t.passed and t.finish_reason == "answered" for t in trajs), [t.detail for t in trajs]
    assert [t.task_id for t in trajs] == [t.task_id for t in group]
    assert Counting.runs == 2 + 2                   # per environment, one run for its 12 tool calls and one verdict run
    Counting.runs = 0
    run_episodes(LookupPolicy(), [make_episode(t, box) for t in group], RolloutConfig(max_turns=2, sandbox_batch=5))
    assert Counting.runs == 2 * 3 + 2 * 3           # 12 episodes per environment in batches of 5, for both
