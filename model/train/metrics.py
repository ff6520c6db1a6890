"""Per-step training measurements: throughput and MFU from the model's FLOP accounting, memory, and the
indexer's top-k recall against the true attention's top-k."""
from __future__ import annotations

import os
import resource
from typing import Optional

import torch

from dsaforge.model.train import seam

# Dense tensor-core peaks (FLOP/s) by GPU name fragment and training dtype; fp32 without TF32 uses the CUDA cores.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989.4e12, ("H100", "bfloat16"): 989.4e12, ("A100", "bfloat16"): 312e12,
    ("H200", "float32"): 66.9e12, ("H100", "float32"): 66.9e12, ("A100", "float32"): 19.5e12,
}


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """Per-device peak for MFU; $DSAFORGE_PEAK_TFLOPS overrides; None when unknown (CPUs): MFU is then not logged."""
    if os.environ.get("DSAFORGE_PEAK_TFLOPS"):
        return float(os.environ["DSAFORGE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for (gpu, dt), v in PEAK_FLOPS.items() if gpu in name and dt == dtype), None)


def memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def topk_recall(p: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, k: int) -> Optional[float]:
    """Mean over query rows with more than k visible keys of |top-k(p) ∩ top-k(indexer)| / k; None if no such row.

    p [B, S, T] head-summed attention, logits [B, S, T] index scores, valid [B, S, T] visible keys."""
    rows = valid.sum(-1) > k                                                      # [B, S]
    if not rows.any():
        return None
    p, logits, valid = p[rows].float(), logits[rows].float(), valid[rows]         # [R, T]
    true_top = p.masked_fill(~valid, -1.0).topk(k, dim=-1).indices
    idx_top = logits.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices
    chosen = torch.zeros_like(valid).scatter_(-1, true_top, True)
    return float(chosen.gather(-1, idx_top).float().sum(-1).mean() / k)


@torch.no_grad()
def indexer_recall(model: torch.nn.Module, inputs: torch.Tensor, segment_ids: Optional[torch.Tensor],
                   top_k: int) -> dict[str, float]:
    """Top-k recall per layer on one batch, from a dense-attention (warm-up mode) forward. The probe runs the
    unfused path even where training runs the fused kernels: only it forms the attention probabilities and index
    scores that the recall compares (keep the batch short: they are [B, S, H, S])."""
    fused = getattr(model, "fused_dsa", False)
    model.fused_dsa = False
    try:
        with seam.capture_indexer_targets() as captured:
            model(inputs, mode="warmup", segment_ids=segment_ids)
    finally:
        model.fused_dsa = fused
    out = {}
    for i, (p, logits, valid) in enumerate(captured):
        r = topk_recall(p, logits, valid.expand_as(p), top_k)
        if r is not None:
            out[f"recall/layer{i}"] = r
    if out:
        out["recall/mean"] = sum(out.values()) / len(out)
    return out
