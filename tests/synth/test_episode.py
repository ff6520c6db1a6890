"""The episode interface over the four agent classes: reference trajectories written with the tasks replay through
the tools to passing verdicts, malformed calls get invalid-call observations, per-episode state holds (the
interpreter's live kernel, the code agent's working copy)."""
import json

import pytest

from dsaforge.config import presets
from dsaforge.data.chat import ToolCall
from dsaforge.synth.episode import make_episode
from dsaforge.synth.generate import synthesize
from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import load_tasks
from dsaforge.synth.trajectory import load_trajectories

from .conftest import requires_bwrap

pytestmark = requires_bwrap
CLASSES = ("general", "code", "search", "code_interpreter")


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("episodes")
    cfg = presets.tiny().synth
    cfg.tasks_per_class, cfg.envs_per_class, cfg.max_difficulty, cfg.pass_k = 2, 1, 2, 2
    summary = synthesize(cfg, out)
    return out, summary


@pytest.fixture(scope="module")
def box(synth_out):
    return Sandbox(hide=[str(synth_out[0].resolve())])


def test_reference_trajectories_are_written_with_the_tasks_and_pass(synth_out):
    out, summary = synth_out
    tasks = {t.task_id: t for t in load_tasks(out)}
    trajs = load_trajectories(out)
    assert {t["task_id"] for t in trajs} == set(tasks)
    for cls in CLASSES:
        s = summary["trajectories"][cls]
        assert s["trajectories"] == s["passed"] == 2 and s["tool_calls"] >= 2, (cls, s)
    for t in trajs:
        assert t["passed"], (t["task_id"], t["detail"])
        roles = [m["role"] for m in t["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant" and "tool" in roles


@pytest.mark.parametrize("cls", CLASSES)
def test_reference_trajectory_replays_through_the_episode(synth_out, box, cls):
    """Replay each stored transcript's calls through a fresh episode: the same observations come back and the final
    answer passes."""
    out, _ = synth_out
    tasks = {t.task_id: t for t in load_tasks(out)}
    traj = next(t for t in load_trajectories(out) if t["agent_class"] == cls)
    with make_episode(tasks[traj["task_id"]], box) as ep:
        msgs = ep.reset()
        assert msgs == traj["messages"][:2] and ep.tools == traj["tools"]
        recorded = traj["messages"][2:]
        for m, nxt in zip(recorded, recorded[1:]):
            if m["role"] == "assistant" and m.get("tool_calls"):
                obs = ep.step(m["tool_calls"][0])
                assert nxt["role"] == "tool" and obs == nxt["content"]
        verdict = ep.submit(ep.submission_from_text(recorded[-1]["content"]))
    assert verdict.passed, verdict.detail


@pytest.mark.parametrize("cls", CLASSES)
def test_malformed_calls_get_invalid_call_observations(synth_out, box, cls):
    out, _ = synth_out
    task = next(t for t in load_tasks(out) if t.agent_class == cls)
    with make_episode(task, box) as ep:
        ep.reset()
        for bad in (ToolCall("search", {}, "arguments are not valid JSON"), {"name": "no_such_tool", "arguments": {}},
                    {"name": ep.tool_names[0], "arguments": [1, 2]}, {"arguments": {}}, "not a call"):
            obs = json.loads(ep.step(bad))
            assert obs["error"].startswith("invalid tool call"), obs
        assert ep.calls == []                        # nothing ran
        assert not ep.submit(None).passed            # and an empty submission fails


def test_interpreter_keeps_one_live_kernel_per_episode(synth_out, box):
    out, _ = synth_out
    task = next(t for t in load_tasks(out) if t.agent_class == "code_interpreter")
    with make_episode(task, box) as a, make_episode(task, box) as b:
        a.reset(), b.reset()
        a.step({"name": "python", "arguments": {"code": "x = 41"}})
        assert json.loads(a.step({"name": "python", "arguments": {"code": "print(x + 1)"}}))["stdout"] == "42\n"
        assert "NameError" in json.loads(b.step({"name": "python", "arguments": {"code": "x"}}))["error"]
        err = json.loads(a.step({"name": "python", "arguments": {"code": "1/0"}}))
        assert "ZeroDivisionError" in err["error"]
        assert json.loads(a.step({"name": "python", "arguments": {"code": "x"}}))["result"] == "41"  # state survives
        a.reset()                                           # a new episode: a fresh kernel
        assert "NameError" in json.loads(a.step({"name": "python", "arguments": {"code": "x"}}))["error"]


def test_code_episode_tools_work_on_a_private_copy(synth_out, box):
    out, _ = synth_out
    task = next(t for t in load_tasks(out) if t.agent_class == "code")
    with make_episode(task, box) as ep:
        ep.reset()
        before = json.loads(ep.step({"name": "run_visible_tests", "arguments": {}}))
        assert before["passed"] < before["total"]
        assert "error" in json.loads(ep.step({"name": "read_file", "arguments": {"path": "../hidden/tasks.json"}}))
        assert "error" in json.loads(ep.step({"name": "apply_patch", "arguments": {"patch": "@@ -1 +1 @@\n-nope\n+x\n"}}))
        gold = json.loads((task.env_dir / "hidden" / "tasks.json").read_text())[task.key]["gold_patch"]
        assert json.loads(ep.step({"name": "apply_patch", "arguments": {"patch": gold}}))["applied"]
        after = json.loads(ep.step({"name": "run_visible_tests", "arguments": {}}))
        assert after["passed"] == after["total"]
        assert ep.submit({"done": True}).passed            # no patch given: the working copy's diff is submitted
        ep.reset()
        assert not ep.submit({"done": True}).passed        # reset restored the buggy file


def test_generate_cli_rolls_out_tasks(synth_out, tmp_path, capsys):
    """`dsaforge generate --tasks`: every class through the engine policy and the episodes (a random model: the
    verdicts fail, the rows are complete)."""
    import pyarrow.parquet as pq

    from dsaforge.cli import main
    from dsaforge.data.tokenizer import train_tokenizer
    from dsaforge.model.hf import export_hf
    from tests.model.model_helpers import make_model

    out, _ = synth_out
    export_hf(make_model(seed=1, max_seq_len=2048, original_seq_len=2048), tmp_path / "ckpt")
    train_tokenizer(["search the corpus, patch the file"] * 20, vocab_size=400).save(str(tmp_path / "tok.json"))
    dest = tmp_path / "rollouts.parquet"
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--tasks", str(out), "--out", str(dest), "--device", "cpu", "--max-new-tokens", "8",
                 "--max-turns", "2", "--no-track", "--set", "synth.sandbox.wall_seconds=30"]) == 0
    rows = pq.read_table(dest).to_pylist()
    assert sum(sum(r["mask"]) > 0 for r in rows) >= 4
    assert sorted(r["agent_class"] for r in rows) == sorted(c for c in CLASSES for _ in range(2))
    for r in rows:
        assert r["passed"] is False and r["reward"] == 0.0
        # either the policy wrote something, or the task alone did not fit the 80% budget of 2,048 tokens
        assert sum(r["mask"]) >= 1 or (r["finish_reason"] == "context" and not r["tokens"]), r["finish_reason"]
        assert json.loads(r["messages"])[1]["role"] == "user"
    assert json.loads(capsys.readouterr().out)["pass_rate"] == 0.0
