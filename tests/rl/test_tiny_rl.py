"""The tiny-RL task set: hundreds of held-out prompts, and reference trajectories that replay through the real
episode interface (tool call and verifier in the sandbox) to the same observations and a passing verdict."""
import pytest

from dsaforge.config import SandboxConfig
from dsaforge.synth import sandbox as sbx
from dsaforge.synth.episode import make_episode
from dsaforge.synth.task import load_tasks
from dsaforge.synth.tiny_rl import write_tiny_rl
from dsaforge.synth.trajectory import load_trajectories

pytestmark = pytest.mark.skipif(sbx.bwrap_problem() is not None, reason=f"bwrap unusable: {sbx.bwrap_problem()}")


def test_tiny_rl_tasks_replay_through_the_episode_interface(tmp_path):
    summary = write_tiny_rl(tmp_path, envs=60, heldout_envs=20)
    tasks = load_tasks(tmp_path)
    assert summary["heldout_tasks"] >= 200 and len(tasks) == summary["tasks"]
    assert {t.env_id for t in tasks if t.split == "heldout"}.isdisjoint({t.env_id for t in tasks if t.split == "train"})
    refs = {r["task_id"]: r for r in load_trajectories(tmp_path)}
    for task in [tasks[0], tasks[-1]]:
        ref = refs[task.task_id]["messages"]
        with make_episode(task, SandboxConfig()) as ep:
            assert ep.reset() == ref[:2]
            assert ep.step(ref[2]["tool_calls"][0]) == ref[3]["content"]       # the sandboxed tool's real output
            assert ep.submit(ep.submission_from_text(ref[4]["content"])).passed
            assert not ep.submit({"answer": -1}).passed
