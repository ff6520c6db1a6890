"""Tiny random configs for the model tests (2 layers, hidden 32-64; all CPU, fp32). Imported by the test modules."""
from __future__ import annotations

import pytest
import torch

from dsaforge.config.model import ModelConfig
from dsaforge.config.presets import preset
from dsaforge.model import MoE, Transformer


def tiny_cfg(**overrides) -> ModelConfig:
    """The tiny preset's model section with overrides, validated."""
    data = preset("tiny").model.model_dump()
    data.update(overrides)
    return ModelConfig.model_validate(data)


def randomize(model: Transformer, std: float = 0.15, seed: int = 0) -> Transformer:
    """Weights large enough that attention, index scores and routing are far from uniform (the 0.006 init
    makes every distribution nearly flat, which would let wrong masks pass unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("k_norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.bias.copy_(0.05 * torch.randn(m.gate.bias.shape, generator=g))
    return model


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return randomize(Transformer(tiny_cfg(**overrides)), seed=seed).eval()


def rand_tokens(b: int = 2, s: int = 20, vocab: int = 2048, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128):
    """DeepSeek's FP8 weight format, written independently: e4m3 values and one fp32 scale per 128x128 block."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module (or a conftest) to run it on one intra-op thread: decode steps and tiny models are
    many small matmuls, and on a shared 2-core machine the threads only spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_prompts(lengths, vocab: int, seed: int = 5) -> list[list[int]]:
    """Token-id prompts of the given lengths, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
