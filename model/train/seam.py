"""The one place the training code reaches into MLA: the head-summed attention the indexer KL is fitted to.

`MLA.forward` hands `attention.indexer_kl(p, logits, valid)` the attention mass p summed over *its* heads. Two
training concerns need that call: under tensor parallelism each rank holds a slice of the heads, so p must be
summed across the tensor-parallel group before the KL (megatron's `compute_dsa_indexer_loss` all-reduces it the
same way); and the top-k recall probe reads p and the indexer logits to compare their top-k sets. Installing one
wrapper here keeps both outside the model code; the model sees an unchanged function when neither is active.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from dsaforge.model import attention

_base = attention.indexer_kl
_reduce_heads: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
_captured: Optional[list] = None


def _indexer_kl(p: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if _reduce_heads is not None:
        p = _reduce_heads(p)
    if _captured is not None:
        _captured.append((p.detach(), logits.detach(), valid))
    return _base(p, logits, valid)


attention.indexer_kl = _indexer_kl


def set_head_reduction(fn: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """fn(p) -> p summed over all heads (the tensor-parallel all-reduce); None for single-device heads."""
    global _reduce_heads
    _reduce_heads = fn


@contextmanager
def capture_indexer_targets() -> Iterator[list]:
    """Collect (p [B,S,T], indexer logits [B,S,T], valid [B,S,T]) per layer from the forwards run inside."""
    global _captured
    _captured = []
    try:
        yield _captured
    finally:
        _captured = None
