"""Building blocks shared by MLA, the lightning indexer and the FFNs: norms, YaRN RoPE, Hadamard, FP8 simulation.

Math follows DeepSeek's reference `inference/model.py` (V3.2, with the Nov-2025 indexer RoPE fix).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dsaforge import kernels
from dsaforge.config.model import ModelConfig
from dsaforge.kernels.reference import rotate  # the torch rotation: model.infer and the CPU path use it

FP8_E4M3_MAX = 448.0


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (the reference upcasts before the reduction)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused op (`F.rms_norm`, fp32 statistics); x and the weight in different dtypes (bf16 activations,
        fp32 master weights) are normalised in fp32 and returned in x's dtype."""
        w = self.weight
        if x.dtype != w.dtype:
            return F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Dense layers, each routed expert and the shared expert."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)   # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)   # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------- YaRN RoPE

def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[qk_rope_head_dim/2] inverse frequencies of the RoPE variant `cfg.applied_rope_type`. YaRN (the reference's
    `precompute_freqs_cis`) interpolates low frequencies by rope_factor and keeps high ones; linear interpolates all."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rope = cfg.applied_rope_type
    if rope == "linear":
        return (inv_freq / cfg.rope_factor).float()
    if rope == "default":
        return inv_freq.float()

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp                                              # 1 = keep (extrapolate), 0 = interpolate
    return (inv_freq / cfg.rope_factor * (1 - smooth) + inv_freq * smooth).float()


def yarn_softmax_scale(cfg: ModelConfig) -> float:
    """MLA softmax scale: qk_head_dim^-1/2, times mscale^2 when YaRN is applied (0.1 ln(factor) + 1)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.applied_rope_type == "yarn":
        m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale = scale * m * m
    return scale


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, qk_rope_head_dim/2] (one angle per rotated pair). Under YaRN both carry
    `rope_attention_factor` (transformers' attention_factor; 1 in DeepSeek's reference), so every rotated q.k
    product, MLA's and the indexer's, is scaled by its square."""
    inv_freq = yarn_inv_freq(cfg).to(device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if cfg.applied_rope_type == "yarn" and cfg.rope_attention_factor != 1.0:
        cos, sin = cos * cfg.rope_attention_factor, sin * cfg.rope_attention_factor
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, S, ..., D] with cos/sin [S, D/2].

    interleaved=True pairs (x0,x1),(x2,x3),... (MLA, as DeepSeek's checkpoints were trained);
    interleaved=False pairs (x_i, x_{i+D/2}) ("rotate half"): the indexer. Mixing them up is the RoPE trap
    DeepSeek fixed in Nov 2025; q and k must use the same layout or the scores lose their relative-position form.
    """
    if x.shape[1] != cos.shape[0] or x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"apply_rope: x {tuple(x.shape)} does not match cos {tuple(cos.shape)} "
                         "(want x [B, S, ..., 2*P] with cos [S, P])")
    if x.is_cuda:   # one Triton pass (read x once, write once) instead of the fp32 copy, complex product and cast
        return kernels.rope(x, cos, sin, interleaved)
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    return rotate(x, torch.complex(cos, sin).view(shape), interleaved)


# ---------------------------------------------------------------- indexer numerics

@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)   # Sylvester construction
    return h / math.sqrt(n)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dim (power of two). Leaves dot products unchanged; it spreads
    outliers across dims before FP8 quantisation (the reference's `rotate_activation`)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two width, got index_head_dim={n}")
    h = _hadamard_matrix(n).to(device=x.device)
    return (x.float() @ h).to(x.dtype)   # Sylvester H is symmetric, so x @ H == (H x^T)^T


def fp8_block_quant(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Simulate DeepSeek's `act_quant` (e4m3, one scale per `block` values along the last dim, scale = amax/448
    rounded up to a power of two: UE8M0) and dequantise. Straight-through gradient, so the indexer still trains.

    Dequantising first is exact w.r.t. the reference's folded form: each (token, head) has one positive scale
    (index_head_dim == block), and relu(a*z) = a*relu(z) for a > 0.
    """
    d = x.shape[-1]
    block = min(block, d)
    if d % block:
        raise ValueError(f"FP8 simulation needs index_head_dim ({d}) to be a multiple of the block ({block})")
    xf = x.float().unflatten(-1, (d // block, block))                            # [..., nb, block]
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_E4M3_MAX)))              # UE8M0 power-of-two scale
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    q = q.flatten(-2).to(x.dtype)
    return x + (q - x).detach()
