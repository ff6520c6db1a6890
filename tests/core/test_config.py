"""Run: python -m pytest tests/core/test_config.py -q"""
import json

import pytest

from dsaforge.config import (PRESETS, Config, ConfigError, config_hash, diff, flatten, load_config, preset,
                             to_yaml)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(name, tmp_path):
    cfg = preset(name)
    assert cfg.preset == name
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(None, [path]) == cfg


def test_presets_differ_where_they_should():
    tiny, small, v32 = preset("tiny"), preset("small"), preset("v32")
    assert (tiny.model.n_layers, tiny.model.dim) == (2, 64)
    assert (v32.model.dim, v32.model.n_layers, v32.model.n_routed_experts, v32.model.index_topk) == (7168, 61, 256, 2048)
    assert small.model.dim < v32.model.dim
    assert len({config_hash(tiny), config_hash(small), config_hash(v32)}) == 3


def test_set_overrides_parse_yaml_scalars():
    cfg = load_config("tiny", overrides=["model.n_layers=4", "data.sources=[a.txt, b.jsonl]", "train.dtype=bfloat16",
                                         "synth.llm_endpoint=http://127.0.0.1:9/v1", "data.dedup=false"])
    assert cfg.model.n_layers == 4 and cfg.data.sources == ["a.txt", "b.jsonl"] and cfg.train.dtype == "bfloat16"
    assert cfg.data.dedup is False and cfg.synth.llm_endpoint == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize("override, expected", [
    ("model.n_headz=3", "unknown key 'n_headz'; allowed: vocab_size"),
    ("modle.n_heads=3", "no section 'modle'; allowed: preset, data, model"),
    ("model.n_heads=-1", "model.n_heads: Input should be greater than 0 (got -1)"),
    ("model.score_func=relu", "model.score_func: Input should be 'sigmoid' or 'softmax'"),
    ("model.n_heads", "expected KEY=VALUE"),
    ("model.n_dense_layers=9", "n_dense_layers (9) exceeds n_layers (2)"),
    ("parallel.tp=3", "world size 1 is not divisible by tp*pp = 3"),
])
def test_bad_overrides_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("tiny", overrides=[override])
    assert expected in str(e.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layerz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.n_layerz: unknown key; allowed: vocab_size"):
        load_config("tiny", [bad])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("tiny", [broken])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("tiny", [tmp_path / "missing.yaml"])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("tiny", [listy])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; available: tiny, small, h200, v32, base"):
        load_config("huge")


def test_yaml_layer_names_its_preset(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: small\ntrain:\n  sparse:\n    lr: 1.0e-5\n")
    cfg = load_config(None, [f])
    assert cfg.preset == "small" and cfg.model.dim == 1024 and cfg.train.sparse.lr == 1e-5
    assert cfg.train.sparse.steps == preset("small").train.sparse.steps


def test_schema_is_strict_json_schema():
    schema = Config.model_json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {"data", "model", "train", "parallel", "rl", "synth", "eval", "tracking",
                                         "pipeline"}
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values() if d.get("type") == "object")


def test_diff_and_flatten():
    rows = dict((k, (a, b)) for k, a, b in diff(preset("tiny"), load_config("tiny", overrides=["model.dim=96"])))
    assert rows == {"model.dim": (64, 96)}
    assert flatten(preset("tiny"))["train.sparse.lr"] == 3e-4


def test_hash_ignores_tracking_only():
    a = preset("tiny")
    b = load_config("tiny", overrides=["tracking.experiment=other"])
    c = load_config("tiny", overrides=["train.seed=1"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
