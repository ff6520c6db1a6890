"""Token batches for the training stages: deterministic, resumable, sharded over data-parallel ranks.

The prepare-data shards hold rows of data.seq_len + 1 tokens cut back to back from one token stream (documents
as BOS ... EOS). A stage whose seq_len differs (the long-context option) re-cuts that stream into rows of
stage.seq_len + 1. With `doc_mask`, each row carries segment ids (a new segment at every BOS) so attention and
indexer selection never cross a document boundary, and the target that crosses one (EOS -> next BOS) is ignored.
Every row is full, so these rows carry no padding (`Batch.valid` is None; sft's padded rows set it).

The batch of optimizer step i is a pure function of (seed, i): samples [i*B, (i+1)*B) of an endless sequence of
per-epoch permutations. Resuming at step i therefore needs no loader state beyond i itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dsaforge.data.prepare import load_manifest, read_rows
from dsaforge.data.tokenizer import BOS

IGNORE = -100


@dataclass
class Batch:
    inputs: torch.Tensor                        # [b, S] token ids
    targets: torch.Tensor                       # [b, S] next tokens, IGNORE where nothing is scored
    segment_ids: Optional[torch.Tensor] = None  # [b, S] document index within the row (doc_mask only)
    valid: Optional[torch.Tensor] = None        # [b, S] bool, False on padding (padded rows only: sft)

    def to(self, device) -> "Batch":
        seg, valid = (None if t is None else t.to(device, non_blocking=True) for t in (self.segment_ids, self.valid))
        return Batch(self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True), seg,
                     valid)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


class TokenRows:
    """All rows of one split as an [N, seq_len + 1] int64 array, re-cut when seq_len differs from the shards'."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, doc_mask: bool = False):
        manifest = load_manifest(data_dir)
        self.bos = manifest["special_tokens"][BOS]
        self.seq_len, self.doc_mask = seq_len, doc_mask
        flat = read_rows(data_dir, split).combine_chunks()
        stream = flat.values.to_numpy(zero_copy_only=False).astype(np.int64)   # the packed token stream
        row = seq_len + 1
        n = len(stream) // row
        if n == 0:
            raise ValueError(f"{data_dir}: the {split} split has {len(stream)} tokens, fewer than one row of "
                             f"{row} (stage seq_len {seq_len} + 1)")
        self.rows = stream[: n * row].reshape(n, row)
        self.vocab_size = manifest["vocab_size"]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray) -> Batch:
        rows = torch.from_numpy(self.rows[index])                                     # [b, S+1]
        inputs, targets = rows[:, :-1], rows[:, 1:].clone()
        seg = None
        if self.doc_mask:
            seg_full = torch.cumsum(rows == self.bos, dim=1)                          # [b, S+1]
            seg = seg_full[:, :-1]
            targets[seg_full[:, 1:] != seg] = IGNORE                                  # EOS -> next document's BOS
        return Batch(inputs.contiguous(), targets, seg)


class StepSampler:
    """Global batch of step i = samples [i*B, (i+1)*B) of per-epoch permutations; rank r of `dp` takes its slice."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if batch_size % dp_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the data-parallel size {dp_size}")
        self.n, self.batch_size, self.seed = n_rows, batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._perm: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm[epoch]

    def indices(self, step: int) -> np.ndarray:
        """This rank's sample indices for optimizer step `step`."""
        per_rank = self.batch_size // self.dp_size
        start = step * self.batch_size + self.dp_rank * per_rank
        out = np.empty(per_rank, dtype=np.int64)
        for j in range(per_rank):
            epoch, pos = divmod(start + j, self.n)
            out[j] = self._permutation(epoch)[pos]
        return out

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n


def micro_batches(batch: Batch, micro_batch_size: int) -> list[Batch]:
    b = batch.inputs.shape[0]
    return [Batch(*(None if t is None else t[i:i + micro_batch_size]
                    for t in (batch.inputs, batch.targets, batch.segment_ids, batch.valid)))
            for i in range(0, b, micro_batch_size)]


def unigram_entropy(rows: TokenRows) -> float:
    """Entropy (nats/token) of the split's unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(rows.rows[:, 1:].ravel(), minlength=rows.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
