"""RMSNorm, YaRN RoPE (both layouts), Hadamard and the FP8 simulation against naive formulas and transformers."""
import math

import pytest
import torch

from dsaforge.model.layers import (MLP, RMSNorm, apply_rope, fp8_block_quant, hadamard, rope_tables, yarn_inv_freq,
                                   yarn_softmax_scale)
from tests.model.model_helpers import tiny_cfg


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8)
    ref = torch.stack([torch.stack([x[i, j] / math.sqrt((x[i, j] ** 2).mean().item() + 1e-6) * norm.weight
                                    for j in range(5)]) for i in range(3)])
    torch.testing.assert_close(norm(x), ref)


def test_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = MLP(6, 10)
    x = torch.randn(4, 6)
    h = x @ mlp.w1.weight.T
    ref = ((h * torch.sigmoid(h)) * (x @ mlp.w3.weight.T)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), ref)


def _angles(s, p):
    theta = torch.rand(s, p) * 6
    return theta.cos(), theta.sin(), theta


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)                            # [B, S, H, D]
    cos, sin, theta = _angles(5, 4)
    z = torch.view_as_complex(x.view(2, 5, 3, 4, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta)[None, :, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin, interleaved=True), ref)


def test_non_interleaved_rope_rotates_half_split_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)                               # [B, S, D] (indexer key: no head dim)
    cos, sin, _ = _angles(5, 4)
    ref = torch.empty_like(x)
    for i in range(4):
        ref[..., i] = x[..., i] * cos[:, i] - x[..., i + 4] * sin[:, i]
        ref[..., i + 4] = x[..., i + 4] * cos[:, i] + x[..., i] * sin[:, i]
    torch.testing.assert_close(apply_rope(x, cos, sin, interleaved=False), ref)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    cfg = tiny_cfg(max_seq_len=256, original_seq_len=64, rope_factor=4.0)
    cos, sin = rope_tables(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, cfg.qk_rope_head_dim), torch.randn(1, 1, cfg.qk_rope_head_dim)

    def score(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1], interleaved)
                * apply_rope(k, cos[n:n + 1], sin[n:n + 1], interleaved)).sum()
    torch.testing.assert_close(score(10, 3), score(107, 100), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_seq_len,original", [(1024, 256), (163840, 4096), (512, 512)])
def test_yarn_matches_transformers(max_seq_len, original):
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import yarn_apply_mscale

    cfg = tiny_cfg(max_seq_len=max_seq_len, original_seq_len=original, rope_factor=40.0, qk_rope_head_dim=64,
                   index_head_dim=64)
    ours = yarn_inv_freq(cfg)
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2).double() / 64))
    if max_seq_len <= original:      # the reference applies no YaRN below the original length
        torch.testing.assert_close(ours, base.float())
        assert yarn_softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5)
        return
    rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": original}
    hf = DeepseekV32Config(qk_rope_head_dim=64, max_position_embeddings=max_seq_len, rope_parameters=rope)
    inv_freq, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-6, atol=0)
    assert attn_factor == 1.0
    assert yarn_softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(rope, cfg.qk_head_dim ** -0.5))
    from dsaforge.config.model import ModelConfig
    assert yarn_softmax_scale(ModelConfig()) == pytest.approx(0.1352, abs=1e-4)   # V3.2: 192^-1/2 (0.1 ln 40 + 1)^2


def test_hadamard_is_orthonormal_and_matches_sylvester():
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(hadamard(x), torch.tensor([[3.0, -1.0]]) / math.sqrt(2))
    torch.manual_seed(0)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close((hadamard(a) * hadamard(b)).sum(-1), (a * b).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(a)), a, atol=1e-5, rtol=1e-5)   # symmetric + orthonormal
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(2, 12))


def test_fp8_block_quant_matches_per_block_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 256) * torch.tensor([0.01, 1.0, 30.0, 500.0])[None, :, None]
    out = fp8_block_quant(x, block=128)
    ref = torch.empty_like(x)
    for i in range(3):
        for j in range(4):
            for blk in range(2):
                v = x[i, j, blk * 128:(blk + 1) * 128]
                scale = 2.0 ** math.ceil(math.log2(max(v.abs().max().item(), 1e-4) / 448.0))
                ref[i, j, blk * 128:(blk + 1) * 128] = (v / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    rel = ((out - x).abs().amax(-1) / x.abs().amax(-1)).max()
    assert 0 < rel < 2 ** -3                   # e4m3 keeps 3 mantissa bits
    x.requires_grad_(True)
    fp8_block_quant(x).sum().backward()        # straight-through: the indexer still trains
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="multiple of the block"):
        fp8_block_quant(torch.randn(2, 192), block=128)
