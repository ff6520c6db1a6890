"""Bad input to the sft and grpo stages: one clear error naming what is wrong, before any work."""
import pytest

from dsaforge.config import ConfigError, load_config
from dsaforge.stages import run_stage


@pytest.fixture
def dirs(tmp_path):
    d = {n: tmp_path / n for n in ("data", "sparse", "synth", "sft")}
    for p in d.values():
        p.mkdir()
    return d


def test_sft_without_reference_trajectories(dirs):
    from dsaforge.model.train.sft import conversation_rows

    with pytest.raises(ConfigError, match="no reference trajectories"):
        conversation_rows(load_config("tiny"), {"prepare-data": dirs["data"], "sparse": dirs["sparse"],
                                                "synthesize": dirs["synth"]})


def test_grpo_without_an_sft_export_or_with_a_bad_reward_path(dirs, tmp_path):
    inputs = {"prepare-data": dirs["data"], "sft": dirs["sft"], "synthesize": dirs["synth"]}
    with pytest.raises(ConfigError, match="has no hf/ export"):
        run_stage("grpo", load_config("tiny"), tmp_path / "out", inputs)
    with pytest.raises(ConfigError, match="needs the output of sft"):
        run_stage("grpo", load_config("tiny"), tmp_path / "out", {"prepare-data": dirs["data"]})
    (dirs["sft"] / "hf").mkdir()
    (dirs["sft"] / "hf" / "config.json").write_text("{}")
    # data parallel only: a sharded model is refused naming the layout, before torchrun starts
    cfg = load_config("tiny", overrides=["parallel.nproc_per_node=2", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="data parallel only, and parallel.tp=2, ep=1, pp=1"):
        run_stage("grpo", cfg, tmp_path / "out", inputs)
    cfg = load_config("tiny", overrides=["parallel.nproc_per_node=2", "rl.prompts_per_step=3"])
    with pytest.raises(ConfigError, match="prompts_per_step 3 must be a multiple of the data-parallel size 2"):
        run_stage("grpo", cfg, tmp_path / "out", inputs)


def test_rl_config_typos_name_the_field():
    with pytest.raises(ConfigError, match="keep_routnig"):
        load_config("tiny", overrides=["rl.keep_routnig=false"])
    with pytest.raises(ConfigError, match="aggregation"):
        load_config("tiny", overrides=["rl.aggregation=mean"])
