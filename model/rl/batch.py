"""What GRPO keeps of an episode, how episodes become padded training tensors, and their Parquet form.

An `EpisodeRecord` is one sampled episode as the trainer needs it: the whole token sequence (prompt, the assistant's
segments, the tools' outputs), which tokens the policy sampled, the engine's log-probability of each (pi_old, after
temperature and truncation), and optionally what the engine recorded per token for the stabilisers: each MoE layer's
experts (Keep Routing) and the kept set of top-p/top-k truncation (Keep Sampling Mask).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


@dataclass
class EpisodeRecord:
    task_id: str
    agent_class: str
    group: int                                  # index of its prompt within the step (G episodes share one)
    tokens: list[int]
    sampled: list[bool]                         # aligned with tokens
    logprobs: list[float]                       # engine log-prob of each token, aligned with tokens (0 if not sampled)
    score: float = 0.0                          # the verifier's score in [0, 1]
    passed: bool = False
    well_formed: bool = True
    tool_calls: int = 0
    turns: int = 0
    finish: str = ""                            # why the episode ended (answer, turn limit, budget, ...)
    reward: float = 0.0
    advantage: float = 0.0
    routing: Optional[np.ndarray] = None        # [n_moe_layers, len(tokens) - 1, k] int
    kept: Optional[list[list[int]]] = None      # per sampled token, in order: its kept set ([] = whole vocabulary)
    messages: list[dict] = field(default_factory=list)
    sample: int = 0                             # its index within the group (0 .. G-1)

    @property
    def response_tokens(self) -> int:
        return int(sum(self.sampled))


@dataclass
class TrainBatch:
    tokens: torch.Tensor                        # [B, S] padded
    sampled: torch.Tensor                       # [B, S] bool
    old_logp: torch.Tensor                      # [B, S-1], aligned with tokens[:, 1:]
    advantages: torch.Tensor                    # [B]
    kl_coef: torch.Tensor                       # [B]
    routing: Optional[list[torch.Tensor]]       # per MoE layer [B, S-1, k]
    keep: Optional[torch.Tensor]                # [N sampled tokens, V] bool
    lengths: Optional[torch.Tensor] = None      # [B] each row's length before padding

    @property
    def mask(self) -> torch.Tensor:
        return self.sampled[:, 1:]


def collate(episodes: list[EpisodeRecord], pad_id: int, vocab_size: int, kl_coef: list[float],
            keep_routing: bool, keep_sampling_mask: bool, n_activated: int) -> TrainBatch:
    """Pad a micro-batch of episodes into tensors. Padding positions get a valid stand-in route (experts 0..k-1):
    attention is causal, so nothing real ever attends to them."""
    b, s = len(episodes), max(len(e.tokens) for e in episodes)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    sampled = torch.zeros(b, s, dtype=torch.bool)
    old = torch.zeros(b, s - 1)
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        tokens[i, :n] = torch.tensor(e.tokens)
        sampled[i, :n] = torch.tensor(e.sampled)
        old[i, :n - 1] = torch.tensor(e.logprobs[1:], dtype=old.dtype)
    routing = None
    if keep_routing and all(e.routing is not None for e in episodes):
        n_layers = episodes[0].routing.shape[0]
        filler = torch.arange(n_activated)
        routing = [filler.expand(b, s - 1, n_activated).clone() for _ in range(n_layers)]
        for i, e in enumerate(episodes):
            r = torch.from_numpy(np.asarray(e.routing, dtype=np.int64))            # [L, n-1, k]
            for layer in range(n_layers):
                routing[layer][i, :r.shape[1]] = r[layer]
    keep = None
    if keep_sampling_mask and all(e.kept is not None for e in episodes):
        sets = [k for e in episodes for k in e.kept]
        keep = torch.zeros(len(sets), vocab_size, dtype=torch.bool)
        for j, kset in enumerate(sets):
            if kset:
                keep[j, kset] = True
            else:
                keep[j] = True
    return TrainBatch(tokens, sampled, old, torch.tensor([e.advantage for e in episodes], dtype=torch.float32),
                      torch.tensor(kl_coef, dtype=torch.float32), routing, keep,
                      torch.tensor([len(e.tokens) for e in episodes]))


ROLLOUT_SCHEMA = pa.schema([
    ("step", pa.int32()), ("task_id", pa.string()), ("agent_class", pa.string()), ("group", pa.int32()),
    ("reward", pa.float64()), ("advantage", pa.float64()), ("score", pa.float64()), ("passed", pa.bool_()),
    ("well_formed", pa.bool_()), ("tool_calls", pa.int32()), ("turns", pa.int32()), ("finish", pa.string()),
    ("response_tokens", pa.int32()), ("tokens", pa.list_(pa.int32())), ("sampled", pa.list_(pa.bool_())),
    ("logprobs", pa.list_(pa.float32())), ("messages", pa.string()),
])


def write_rollouts(episodes: list[EpisodeRecord], step: int, path: Path) -> None:
    """One Parquet file per step (written to a temporary name, then renamed: a killed run leaves no torn file)."""
    rows = [{"step": step, "task_id": e.task_id, "agent_class": e.agent_class, "group": e.group, "reward": e.reward,
             "advantage": e.advantage, "score": e.score, "passed": e.passed, "well_formed": e.well_formed,
             "tool_calls": e.tool_calls, "turns": e.turns, "finish": e.finish, "response_tokens": e.response_tokens,
             "tokens": e.tokens, "sampled": e.sampled, "logprobs": e.logprobs,
             "messages": json.dumps(e.messages, ensure_ascii=False, default=str)} for e in episodes]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA), tmp)
    tmp.replace(path)
