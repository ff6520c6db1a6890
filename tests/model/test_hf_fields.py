"""Every field of transformers' DeepseekV32Config, and every rope parameter and rope type, walked programmatically:
a value other than the tiny base's either imports into a model whose logits match DeepseekV32ForCausalLM's within
1e-4 (fp32, CPU), or is refused with an error naming the field. A field the walk finds that dsaforge has not
classified fails the walk, so a new transformers release cannot add a setting dsaforge silently ignores."""
import copy
import dataclasses
import typing
import warnings

import pytest
import torch

from dsaforge.config.model import ModelConfig
from dsaforge.model.hf import UnsupportedCheckpoint, export_hf, import_hf
from dsaforge.model.hf_config import CHECKED, HF_DEFAULTS, MAPPED, NO_EFFECT, unexpressed_settings
from tests.model.model_helpers import make_model, one_thread, rand_tokens, tiny_cfg  # noqa: F401 (one_thread: autouse)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters  # noqa: E402

TOL = 1e-4
S = 16
BASE_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 1024}
BASE = dict(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, index_n_heads=16, index_head_dim=16, index_topk=5,
            max_position_embeddings=4096, rope_parameters=BASE_ROPE)

# Values to try where the generic rule (flip a bool, double a number) would be invalid or too weak to show an
# effect. Lists give several values.
VALUES = {
    "rms_norm_eps": [0.5], "pad_token_id": [3], "eos_token_id": [[1, 2]], "hidden_act": ["gelu", "swish"],
    "num_key_value_heads": [1], "head_dim": [4], "attention_dropout": [0.1], "n_shared_experts": [2, 0],
    "first_k_dense_replace": [0, 2], "mlp_layer_types": [["dense", "dense"], ["sparse", "dense"]],
    "layer_types": [["full_attention"] * 2], "rope_parameters": [{"rope_type": "linear", "factor": 2.0}],
    "dtype": ["float32"], "id2label": [{0: "a", 1: "b"}], "label2id": [{"a": 0, "b": 1}],
    "problem_type": ["regression"], "architectures": [["DeepseekV32ForCausalLM"]], "transformers_version": ["5.0.0"],
    "chunk_size_feed_forward": [2],
}
# Fields another field must follow for transformers itself to run (MLA has as many key heads as query heads).
COMPANIONS = {"num_attention_heads": lambda v: {"num_key_value_heads": v}}
REMOVE = object()   # a rope "value" that removes the key
# Rope parameters on top of BASE_ROPE (yarn).
ROPE_VALUES = {
    "rope_theta": [500.0], "factor": [8.0, None], "original_max_position_embeddings": [8192, 512],
    "attention_factor": [0.7], "beta_fast": [16, 0, 20.5], "beta_slow": [2], "mscale": [0.707, REMOVE],
    "mscale_all_dim": [0.5, REMOVE, 0.0], "truncate": [False], "partial_rotary_factor": [0.5],
    "short_factor": [[1.0] * 4], "long_factor": [[2.0] * 4], "low_freq_factor": [1.0], "high_freq_factor": [4.0],
    "mrope_section": [[2, 2]], "rope_type": ["default"],
}
# Minimal parameters of each rope type transformers knows.
ROPE_TYPES = {
    "default": {}, "linear": {"factor": 2.0}, "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 1024},
    "longrope": {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 1024},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024},
    "proportional": {"partial_rotary_factor": 0.5},
}
# The parameters transformers' yarn reads: changing one must change its logits (else the walk proves nothing),
# except for values its rules make equal to the base's (beta_fast 0 reads as the default 32).
YARN_READS = {"rope_theta", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate"}
SAME_AS_BASE = {("beta_fast", 0)}


def _fields():
    return [f.name for f in dataclasses.fields(transformers.DeepseekV32Config)]


def _other_values(name):
    if name in VALUES:
        return VALUES[name]
    base = BASE.get(name, HF_DEFAULTS.get(name))
    if isinstance(base, bool):
        return [not base]
    if isinstance(base, (int, float)):
        return [base * 2 if base else base + 1]
    raise AssertionError(f"no test value for DeepseekV32Config.{name}: add one to VALUES")


def _hf_config(**overrides):
    return transformers.DeepseekV32Config(**(copy.deepcopy(BASE) | overrides))


def _hf_model(**overrides):
    cfg = _hf_config(**overrides)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.DeepseekV32ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if "norm" in n else 0.15 * r)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def _logits(model, tokens):
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            # return_dict=False breaks DeepseekV32's own forward (5.x); it is an output switch, so read the logits
            # with it on (the saved config.json keeps the value under test)
            saved, model.config.return_dict = model.config.return_dict, True
            try:
                return model(tokens).logits
            finally:
                model.config.return_dict = saved
        return model(tokens, mode="sparse").logits


@pytest.fixture(scope="module")
def base_logits(one_thread):
    return _logits(_hf_model(), rand_tokens(2, S, vocab=300))


def _check(tmp_path, label, overrides, base_logits, must_change=None):
    """Import what transformers saves with `overrides`: refused naming the field, or equal logits. A value that
    transformers' own forward cannot run must be refused."""
    tokens = rand_tokens(2, S, vocab=300)
    try:
        hf = _hf_model(**overrides)
        theirs = _logits(hf, tokens)
        hf.save_pretrained(tmp_path)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the import must refuse the value
        theirs, why = None, f"{type(e).__name__}: {str(e)[:80]}"
        _hf_config(**overrides).save_pretrained(tmp_path)     # the config alone: no weights to import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = import_hf(tmp_path)
    except UnsupportedCheckpoint as e:
        assert label in str(e), f"refusal of {label} does not name it: {e}"
        return "refused" + ("" if theirs is not None else " (transformers fails too)")
    assert theirs is not None, f"{label}: imported although transformers' forward fails ({why})"
    err = (_logits(ours, tokens) - theirs).abs().max().item()
    assert err <= TOL, f"{label}: max |logits - transformers| = {err:.2e}"
    if must_change is not None and theirs.shape == base_logits.shape:
        changed = not torch.allclose(theirs, base_logits, atol=1e-6, rtol=0)
        assert changed == must_change, f"{label}: transformers' logits {'did not change' if must_change else 'changed'}"
    return f"matched ({err:.1e})"


def test_the_tables_cover_every_field_and_hold_transformers_defaults():
    fields = _fields()
    classified = set(MAPPED) | set(NO_EFFECT) | set(CHECKED) | {"rope_parameters"}
    assert not set(fields) - classified, f"unclassified DeepseekV32Config fields: {set(fields) - classified}"
    defaults = {f.name: f.default for f in dataclasses.fields(transformers.DeepseekV32Config)}
    for name in fields:
        assert HF_DEFAULTS[name] == defaults[name], name


@pytest.mark.parametrize("name", _fields())
def test_every_config_field_matches_transformers_or_is_refused(name, tmp_path, base_logits):
    outcomes = []
    for i, value in enumerate(_other_values(name)):
        # a setting transformers reads at no point of the forward must leave its logits alone
        overrides = {name: value} | COMPANIONS.get(name, lambda v: {})(value)
        outcome = _check(tmp_path / str(i), name, overrides, base_logits,
                         must_change=False if name in NO_EFFECT else None)
        outcomes.append(f"{value!r}: {outcome}")
    print(f"\n[{name}] " + "; ".join(outcomes))


@pytest.mark.parametrize("key", list(RopeParameters.__annotations__))
def test_every_rope_parameter_matches_transformers_or_is_refused(key, tmp_path, base_logits):
    assert key in ROPE_VALUES, f"no test value for rope parameter {key}: add one to ROPE_VALUES"
    outcomes = []
    for i, value in enumerate(ROPE_VALUES[key]):
        rope = dict(BASE_ROPE)
        if value is REMOVE:
            rope.pop(key, None)
        else:
            rope[key] = value
        changes = key in YARN_READS and (key, value) not in SAME_AS_BASE
        outcome = _check(tmp_path / str(i), key, {"rope_parameters": rope}, base_logits,
                         must_change=True if changes else None)
        outcomes.append(f"{'(removed)' if value is REMOVE else repr(value)}: {outcome}")
    print(f"\n[rope {key}] " + "; ".join(outcomes))


@pytest.mark.parametrize("rope_type", ["default", *ROPE_INIT_FUNCTIONS])
def test_every_rope_type_matches_transformers_or_is_refused(rope_type, tmp_path, base_logits):
    assert rope_type in ROPE_TYPES, f"no parameters for rope type {rope_type}: add them to ROPE_TYPES"
    rope = {"rope_type": rope_type, "rope_theta": 10000.0} | ROPE_TYPES[rope_type]
    outcome = _check(tmp_path, "rope_type", {"rope_parameters": rope}, base_logits)
    print(f"\n[rope_type {rope_type}] {outcome}")
    assert (outcome == "refused") == (rope_type not in ("default", "linear", "yarn"))


# ---------------------------------------------------------------- export: every ModelConfig field

EXPORT_BASE = dict(index_topk=8, index_n_heads=16, max_seq_len=1024, original_seq_len=256, rope_factor=4.0)
# Overrides to try per field where the generic rule (flip a bool, double a number, every other literal) is invalid
# or too weak; each entry is one case.
EXPORT_CASES = {
    "norm_eps": [{"norm_eps": 0.5}], "n_shared_experts": [{"n_shared_experts": 2}, {"n_shared_experts": 0}],
    "n_expert_groups": [{"n_expert_groups": 2}],
    # YaRN below the original length: transformers applies it whenever rope_type is yarn, and so does "yarn"
    "rope_type": [{"rope_type": "yarn", "original_seq_len": 2048}, {"rope_type": "linear"},
                  {"rope_type": "default"}, {"rope_type": "auto", "original_seq_len": 2048}],
    "mscale": [{"mscale": 2.0}, {"mscale": 0.0}], "rope_attention_factor": [{"rope_attention_factor": 0.7}],
    "n_mtp_layers": [{"n_mtp_layers": 1}, {"n_mtp_layers": 2}],
}


def _export_cases(name):
    if name in EXPORT_CASES:
        return EXPORT_CASES[name]
    field = ModelConfig.model_fields[name]
    base = EXPORT_BASE.get(name, tiny_cfg().model_dump()[name])
    if typing.get_origin(field.annotation) is typing.Literal:
        return [{name: v} for v in typing.get_args(field.annotation) if v != base]
    if isinstance(base, bool):
        return [{name: not base}]
    if isinstance(base, (int, float)):
        return [{name: base * 2 if base else base + 1}]
    raise AssertionError(f"no export case for ModelConfig.{name}: add one to EXPORT_CASES")


@pytest.mark.parametrize("name", list(ModelConfig.model_fields))
def test_every_model_field_exports_what_it_computes(name, tmp_path):
    """Exported, a model either loads in transformers with our logits (and imports back to the same config), is
    refused on export, or uses a setting transformers cannot express: then export warns and the card names it."""
    outcomes = []
    for i, overrides in enumerate(_export_cases(name)):
        out = tmp_path / str(i)
        model = make_model(seed=3, **(EXPORT_BASE | overrides))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                export_hf(model, out)
        except ValueError as e:
            assert name in str(e), f"export refusal does not name {name}: {e}"
            outcomes.append(f"{overrides}: refused")
            continue
        card = (out / "README.md").read_text()
        assert import_hf(out).cfg == model.cfg, f"{overrides}: the export does not import back to its config"
        if name in unexpressed_settings(model.cfg):
            assert any(name in str(w.message) for w in caught), f"{overrides}: export did not warn"
            assert f"`{name}=" in card, f"{overrides}: the model card does not name {name}"
            outcomes.append(f"{overrides}: named in the card and warned")
            continue
        assert not caught or all("dsaforge" not in str(w.message) for w in caught)
        tokens = rand_tokens(2, S, vocab=model.cfg.vocab_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.DeepseekV32ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        err = (_logits(model, tokens) - _logits(hf, tokens)).abs().max().item()
        assert err <= TOL, f"{overrides}: max |logits - transformers| = {err:.2e}"
        outcomes.append(f"{overrides}: matched ({err:.1e})")
    print(f"\n[export {name}] " + "; ".join(outcomes))
