"""Supervised fine-tuning data: reference trajectories rendered with DeepSeek-V3.2's chat template, scored on the
assistant's tokens only.

    dsaforge stage sft --preset tiny --input prepare-data=DATA --input sparse=SPARSE --input synthesize=SYNTH --out SFT

The `sft` stage is the LM training loop (`Trainer`, mode "sparse") over `ConversationRows` instead of packed
pre-training rows: the same model set-up, optimizer step, checkpoints, megatron layouts and HF export. Each row is
one conversation (system, user, the assistant's segments with their tool calls, the tools' real outputs), cut or
padded to train.sft.seq_len + 1 tokens; a target is scored only where the assistant wrote it (its reasoning,
content, tool calls and the EOS closing each segment), never on the prompt or a tool output. The padding is marked
invalid (`Batch.valid`), so the MoE layers leave it out of the experts' load and balance loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dsaforge.config import ConfigError
from dsaforge.model.train.data import IGNORE, Batch


def render_tokens(chat, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None) -> tuple[list[int], list[bool]]:
    """(token ids, sampled) of a whole conversation, `sampled` True on the tokens the assistant generated: what a
    rollout samples after each generation prompt, up to and including the segment's EOS.

    Rendered piece by piece at the template's own boundaries (each generation prompt, each assistant segment).
    Every boundary sits next to a special token, which the tokenizer never merges across, so the pieces' ids
    concatenate to the ids of the whole text (checked)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat.render(messages[:i], tools, add_generation_prompt=True)
        after = chat.render(messages[:i + 1], tools, add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError(f"message {i}: the template re-renders earlier text (thinking dropped by a later user "
                             "message?); such conversations are not one sampled sequence")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = chat.render(messages, tools, add_generation_prompt=False)
    if not full.startswith(done):
        raise ValueError("the rendered conversation does not extend its prefixes")
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    ids, sampled = [], []
    for text, assistant in pieces:
        piece = chat.encode_text(text) if text else []
        ids += piece
        sampled += [assistant] * len(piece)
    if ids != chat.encode_text(full):
        raise ValueError("piecewise tokenization differs from the whole conversation's")
    return ids, sampled


class ConversationRows:
    """Rendered conversations as rows of seq_len + 1 tokens: `.batch(indices)` gives inputs, and targets that are
    IGNORE except on the assistant's tokens (the row source the `Trainer` reads)."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int):
        self.seq_len = seq_len
        # a conversation whose assistant tokens all lie beyond seq_len would be a row with nothing to score
        kept = [(ids, sampled) for ids, sampled in examples if any(sampled[1:seq_len + 1])]
        self.dropped = len(examples) - len(kept)
        examples = kept
        n = len(examples)
        self.ids = np.full((n, seq_len + 1), pad_id, dtype=np.int64)
        self.scored = np.zeros((n, seq_len + 1), dtype=bool)
        self.lengths = np.zeros(n, dtype=np.int64)        # real tokens per row; the rest is padding
        self.truncated = 0
        for r, (ids, sampled) in enumerate(examples):
            k = min(len(ids), seq_len + 1)
            self.lengths[r] = k
            self.truncated += len(ids) > k
            self.ids[r, :k] = ids[:k]
            self.scored[r, :k] = sampled[:k]
        self.assistant_tokens = int(self.scored[:, 1:].sum())

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray) -> Batch:
        rows = torch.from_numpy(self.ids[index])
        targets = rows[:, 1:].clone()
        targets[~torch.from_numpy(self.scored[index, 1:])] = IGNORE
        # the padding is routed like any token but must not count in the experts' load (router-bias update)
        valid = torch.arange(self.seq_len)[None, :] < torch.from_numpy(self.lengths[index])[:, None]
        return Batch(rows[:, :-1].contiguous(), targets, valid=valid)


def conversation_rows(cfg, inputs: dict[str, Path]) -> tuple[ConversationRows, ConversationRows, dict]:
    """(train rows, validation rows, stats) from the synthesize stage's reference trajectories: those that passed
    their verifier, train split for training and held-out for validation (5% of train when there is none)."""
    from dsaforge.data.chat import ChatTemplate
    from dsaforge.data.tokenizer import PAD, load_tokenizer
    from dsaforge.synth.trajectory import load_trajectories

    for need in ("prepare-data", "synthesize"):
        if need not in inputs:
            raise ConfigError(f"stage 'sft' needs the {need} output (--input {need}=DIR)")
    try:
        trajectories = load_trajectories(inputs["synthesize"])
        tokenizer = load_tokenizer(inputs["prepare-data"])
    except FileNotFoundError as e:
        raise ConfigError(f"sft: {e}") from None
    chat = ChatTemplate(tokenizer, thinking=True)
    split: dict[str, list] = {"train": [], "heldout": []}
    for t in trajectories:
        if t["passed"] and t["messages"]:
            split.setdefault(t["split"], []).append(render_tokens(chat, t["messages"], t["tools"]))
    if not split["train"]:
        raise ConfigError(f"sft: {inputs['synthesize']} holds no passing train-split reference trajectory")
    seq_len, pad = cfg.train.sft.seq_len, tokenizer.token_to_id(PAD)
    train_rows = ConversationRows(split["train"], seq_len, pad)
    if not len(train_rows):
        raise ConfigError(f"sft: every train conversation's prompt is longer than train.sft.seq_len={seq_len} "
                          "tokens (no assistant token to score); raise it")
    val_rows = ConversationRows(split["heldout"], seq_len, pad)
    if not len(val_rows):
        val = split["train"][-max(1, len(split["train"]) // 20):]
        val_rows = ConversationRows(val, seq_len, pad)
    lengths = [len(ids) for ids, _ in split["train"]]
    stats = {"sft_conversations": len(train_rows), "sft_val_conversations": len(val_rows),
             "sft_assistant_tokens": train_rows.assistant_tokens, "sft_truncated": train_rows.truncated,
             "sft_dropped_too_long": train_rows.dropped,
             "sft_mean_tokens": float(np.mean(lengths))}
    return train_rows, val_rows, stats
