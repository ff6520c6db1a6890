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


def test_tiny_rl_config_takes_the_small_preset_model_for_the_gpu_run():
    from dsaforge.config import load_config
    from dsaforge.model.rl.tiny import tiny_rl_config

    small, tiny = tiny_rl_config("small", **{"rl.lr": 1e-4}), tiny_rl_config()
    preset = load_config("small").model
    for name in ("dim", "n_layers", "n_heads", "n_routed_experts", "q_lora_rank", "kv_lora_rank", "v_head_dim"):
        assert getattr(small.model, name) == getattr(preset, name), name
    assert small.model.vocab_size == tiny.model.vocab_size == 1024
    assert (small.train.dtype, small.train.device, small.rl.lr) == ("bfloat16", "auto", 1e-4)
    assert (tiny.train.dtype, tiny.train.device, tiny.model.dim) == ("float32", "cpu", 64)
    assert small.data.seq_len == tiny.data.seq_len and small.rl.steps == tiny.rl.steps   # the same tasks and loop
    with pytest.raises(ValueError, match="model must be"):
        tiny_rl_config("medium")
    with pytest.raises(ValueError, match="unknown setting"):
        tiny_rl_config("small", **{"rl.lrr": 1.0})


def test_gain_in_standard_errors_is_zero_without_gain_or_spread():
    import math

    from dsaforge.model.rl.tiny import gain_in_se

    assert gain_in_se(0.4, 0.7, 0.03, 0.04) == pytest.approx(0.3 / 0.05)
    assert gain_in_se(0.5, 0.4, 0.03, 0.04) == pytest.approx(-2.0)
    assert gain_in_se(0.0, 0.0, 0.0, 0.0) == 0.0          # every episode failed before and after: no gain, not inf
    assert gain_in_se(0.0, 1.0, 0.0, 0.0) == math.inf
    assert gain_in_se(1.0, 0.0, 0.0, 0.0) == -math.inf
