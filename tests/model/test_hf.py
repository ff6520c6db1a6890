"""HF interop: our export loads in transformers' DeepseekV32ForCausalLM with matching logits and top-k indices;
transformers-saved directories import back. CPU, fp32, random tiny configs of several shapes."""
import json

import pytest
import torch

from dsaforge.kernels import topk_indices
from dsaforge.model import Indexer
from dsaforge.model.hf import export_hf, from_hf_config, hf_name, import_hf, to_hf_config
from tests.model.model_helpers import make_model, quantize_fp8_blocks, rand_tokens, tiny_cfg

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer  # noqa: E402

SHAPES = {
    # top-k < sequence length, YaRN active (max_seq_len > original_seq_len), 1 dense + 1 MoE layer
    # (16 indexer heads: with few heads many keys score exactly 0 after the ReLU, and ties at the k-th place let
    # the two implementations legitimately pick different keys)
    "tiny-yarn-topk8": dict(index_topk=8, index_n_heads=16, max_seq_len=1024, original_seq_len=256, rope_factor=4.0),
    # all-MoE, 2 shared experts, wider groups, narrow heads, v_head_dim != qk_nope_head_dim, no YaRN
    "moe-narrow": dict(dim=32, n_heads=2, n_dense_layers=0, n_routed_experts=16, n_expert_groups=4,
                       n_limited_groups=2, n_activated_experts=3, n_shared_experts=2, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, index_n_heads=8,
                       index_head_dim=8, index_topk=4, inter_dim=48, moe_inter_dim=8),
    # all dense FFN, one expert group, top-k >= L (dense-equivalent), mscale 0.5
    "dense-ffn-k-ge-L": dict(n_dense_layers=2, n_expert_groups=1, n_limited_groups=1, index_topk=64,
                             max_seq_len=2048, original_seq_len=512, rope_factor=8.0, mscale=0.5),
}
S = 20
TOL = 1e-4


def _hf(path):
    return transformers.DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                               dtype=torch.float32).eval()


def _capture(model, cls):
    out = []
    hooks = [m.register_forward_hook(lambda mod, a, o: out.append(o)) for m in model.modules() if isinstance(m, cls)]
    return out, hooks


def _untied_rows_agree(scores, hf_idx, k):
    """Compare selected sets row by row where the k-th and (k+1)-th scores are not tied."""
    compared = 0
    ours = topk_indices(scores, k)
    for b in range(scores.shape[0]):
        for t in range(scores.shape[1]):
            visible = t + 1
            theirs = {int(i) for i in hf_idx[b, t] if int(i) < visible}   # HF may list masked slots when t+1 < k
            mine = {int(i) for i in ours[b, t] if int(i) >= 0}
            if visible > k:
                top = scores[b, t, :visible].sort(descending=True).values
                if (top[k - 1] - top[k]).abs() <= 1e-6 * top[k - 1].abs().clamp_min(1):
                    continue
            assert mine == theirs, (b, t)
            compared += 1
    return compared


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_loads_in_transformers_with_matching_logits_and_topk(name, tmp_path):
    model = make_model(seed=3, **SHAPES[name])
    tokens = rand_tokens(2, S, vocab=model.cfg.vocab_size)
    export_hf(model, tmp_path)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "deepseek_v32"
    hf = _hf(tmp_path)

    ours_scores, h1 = _capture(model, Indexer)
    hf_idx, h2 = _capture(hf, DeepseekV32Indexer)
    with torch.no_grad():
        ours = model(tokens, mode="sparse").logits
        theirs = hf(tokens).logits
    for h in h1 + h2:
        h.remove()
    assert len(ours_scores) == len(hf_idx) == model.cfg.n_layers
    k = model.cfg.index_topk
    compared = sum(_untied_rows_agree(s, i, k) for s, i in zip(ours_scores, hf_idx))
    # Logits can only agree if no row has a tie at the k-th place (else either choice is right); the seeds
    # above are chosen so that every row is untied, and this says so if a change breaks that.
    assert compared == model.cfg.n_layers * 2 * S, "tied index scores at the top-k boundary: change the seed"
    err = (ours - theirs).abs().max().item()
    print(f"\n[{name}] max |logits - transformers| = {err:.2e}")
    assert err <= TOL

    # and back: import gives the very same model
    again = import_hf(tmp_path)
    assert again.cfg == model.cfg
    mine = model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, mode="sparse").logits, ours, atol=1e-5, rtol=1e-5)


def test_published_names_mtp_layout_and_sharding(tmp_path):
    from safetensors import safe_open
    model = make_model(seed=4, index_topk=6, n_mtp_layers=1)
    export_hf(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    for key in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.self_attn.indexer.k_norm.bias", "model.layers.0.self_attn.indexer.weights_proj.weight",
                "model.layers.1.mlp.experts.7.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                "model.layers.1.mlp.shared_experts.up_proj.weight",
                # MTP module = layer n_layers, with its own embedding/head copies (DeepSeek's layout)
                "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
                "model.layers.2.shared_head.norm.weight", "model.layers.2.shared_head.head.weight",
                "model.layers.2.embed_tokens.weight", "model.layers.2.self_attn.indexer.wq_b.weight",
                "model.layers.2.mlp.experts.0.gate_proj.weight"]:
        assert key in index, key
    with safe_open(str(tmp_path / index["model.layers.1.mlp.gate.e_score_correction_bias"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    tokens = rand_tokens(1, 12)
    hf = _hf(tmp_path)                     # MTP tensors are ignored by transformers, the rest must load
    with torch.no_grad():
        ref = model(tokens, mode="sparse")
        assert (ref.logits - hf(tokens).logits).abs().max() <= TOL
        again = import_hf(tmp_path)(tokens, mode="sparse")
    torch.testing.assert_close(again.mtp_logits[0], ref.mtp_logits[0], atol=1e-5, rtol=1e-5)


def test_import_of_a_transformers_saved_checkpoint(tmp_path):
    hf_cfg = transformers.DeepseekV32Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, index_n_heads=16, index_head_dim=16, index_topk=5,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 1024})
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    tokens = rand_tokens(2, 16, vocab=300)
    ours_scores, h1 = _capture(ours, Indexer)
    hf_idx, h2 = _capture(hf, DeepseekV32Indexer)
    with torch.no_grad():
        err = (ours(tokens, mode="sparse").logits - hf(tokens).logits).abs().max().item()
    for h in h1 + h2:
        h.remove()
    compared = sum(_untied_rows_agree(s, i, 5) for s, i in zip(ours_scores, hf_idx))
    assert compared == 2 * 2 * 16, "tied index scores at the top-k boundary: change the seed"
    print(f"\n[transformers-saved] max |logits - transformers| = {err:.2e}")
    assert err <= TOL


def test_config_round_trip_and_unexportable_settings():
    cfg = tiny_cfg(index_fp8=True, seq_aux_loss_alpha=1e-4, max_seq_len=1024, original_seq_len=256)
    assert from_hf_config(to_hf_config(cfg)) == cfg
    with pytest.raises(ValueError, match="sigmoid"):
        to_hf_config(tiny_cfg(score_func="softmax"))
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({"model_type": "llama"})


def test_import_names_missing_unused_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    from dsaforge.model.hf import UnsupportedCheckpoint
    model = make_model(seed=5, n_mtp_layers=1)
    export_hf(model, tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(str(f))

    def rewrite(tensors):
        save_file(tensors, str(f), metadata={"format": "pt"})

    rewrite({k: v for k, v in good.items() if k != "model.layers.0.self_attn.o_proj.weight"})
    with pytest.raises(UnsupportedCheckpoint, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.o_proj\.weight"):
        import_hf(tmp_path)
    rewrite(good | {"model.layers.0.self_attn.o_proj.bias": torch.zeros(model.cfg.dim)})
    with pytest.raises(UnsupportedCheckpoint, match=r"does not use: model\.layers\.0\.self_attn\.o_proj\.bias"):
        import_hf(tmp_path)
    rewrite(good | {"model.norm.weight": torch.ones(3)})
    with pytest.raises(UnsupportedCheckpoint, match=r"model\.norm\.weight has shape \(3,\)"):
        import_hf(tmp_path)
    # the MTP module's copy of the embedding must be the embedding dsaforge shares with it
    rewrite(good | {"model.layers.2.embed_tokens.weight": good["model.embed_tokens.weight"] + 1})
    with pytest.raises(UnsupportedCheckpoint, match=r"model\.layers\.2\.embed_tokens\.weight differs"):
        import_hf(tmp_path)


def test_tied_embeddings_import_as_a_copy_and_a_differing_stored_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from dsaforge.model.hf import UnsupportedCheckpoint
    model = make_model(seed=5)
    export_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedCheckpoint, match="tie_word_embeddings=True but lm_head.weight differs"):
        import_hf(tmp_path)
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="imported as a copy of the embedding"):
        tied = import_hf(tmp_path)
    assert torch.equal(tied.head.weight, model.embed.weight)


def test_fp8_indexer_export_warns_and_names_it_in_the_model_card(tmp_path):
    model = make_model(seed=3, index_fp8=True)
    with pytest.warns(UserWarning, match="index_fp8=True"):
        export_hf(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "`index_fp8=True`" in card and "select different keys" in card
    assert import_hf(tmp_path).cfg.index_fp8      # and dsaforge reads it back from config.json's dsaforge key
    plain = tmp_path / "plain"
    export_hf(make_model(seed=3), plain)
    assert "None: transformers computes this model's logits as dsaforge does." in (plain / "README.md").read_text()


def test_fp8_block_dequantisation_against_a_blockwise_loop():
    from dsaforge.model.hf import dequantize_fp8
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_fp8_blocks(w)
    ref = torch.empty_like(w)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            ref[sl] = q[sl].float() * scale[i, j]
    assert torch.equal(dequantize_fp8(q, scale, torch.float32), ref)
    assert (ref - w).abs().max() <= 0.07 * w.abs().max()          # e4m3: 3 mantissa bits


def test_import_of_deepseeks_fp8_block_scaled_layout(tmp_path):
    from safetensors.torch import load_file, save_file
    model = make_model(seed=6, dim=256, moe_inter_dim=160)        # some weights span several 128-blocks
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    quantised = [k for k, v in tensors.items() if v.dim() == 2 and k.startswith("model.layers.")
                 and (".mlp." in k or "_proj" in k) and "gate.weight" not in k and "weights_proj" not in k]
    expected = {}
    for k in quantised:
        q, s = quantize_fp8_blocks(tensors[k])
        tensors[k], tensors[k + "_scale_inv"] = q, s
        expected[k] = q.float() * s.repeat_interleave(128, 0)[:q.shape[0]].repeat_interleave(128, 1)[:, :q.shape[1]]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = import_hf(tmp_path, dtype=torch.float32)
    names = {hf_name(n, ours.cfg.n_layers): n for n in ours.state_dict()}
    state = ours.state_dict()
    assert len(quantised) > 20 and all(torch.equal(state[names[k]], v) for k, v in expected.items())
    assert import_hf(tmp_path).embed.weight.dtype == torch.float32     # the unquantised tensors keep theirs
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config=.*weight_block_size \[128, 128\]"):
        import_hf(tmp_path)


def test_a_run_starting_from_a_checkpoint_must_compute_its_architecture():
    from dsaforge.model.hf import UnsupportedCheckpoint, check_run_config
    ckpt = tiny_cfg()
    check_run_config(tiny_cfg(), ckpt, "ckpt")                      # the same: silent
    with pytest.raises(UnsupportedCheckpoint, match=r"model\.norm_topk_prob=False vs True"):
        check_run_config(tiny_cfg(norm_topk_prob=False), ckpt, "ckpt")
    with pytest.warns(UserWarning, match=r"model\.max_seq_len=1024 \(checkpoint: 512\)"):
        check_run_config(tiny_cfg(max_seq_len=1024), ckpt, "ckpt")   # context extension is deliberate
