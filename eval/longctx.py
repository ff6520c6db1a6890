"""The long-context suite: passkey retrieval, multi-key needle-in-a-haystack and variable tracking over a grid of
context lengths x insertion depths, dense vs DSA on the same checkpoint.

Prompts are built at the token level so every cell has exactly its context length: BOS, haystack text with the
needles inserted at their depths, the question; the answer follows. A prompt is correct when greedy decoding
reproduces the answer, i.e. the argmax at every answer position is the answer's token (the same outcome as
decoding len(answer) tokens greedily, without the decode loop). The haystack is real text from the prepared
documents (or user files), cut at a random offset per prompt; the needles' texts follow Mohtashami & Jaggi (2023)
for the passkey and RULER's (Hsieh et al. 2024) multi-key and variable-tracking designs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from dsaforge.config import ConfigError
from dsaforge.eval.results import SuiteResult
from dsaforge.progress import Progress

MODES = ("dense", "sparse")
_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lantern", "meadow", "nectar", "orchid", "pepper", "quartz", "raven", "saffron", "thistle", "umber",
          "velvet", "willow", "yarrow", "zephyr", "cobalt", "falcon", "glacier", "hazel", "ivory")


@dataclass
class Probe:
    task: str
    needles: list[str]          # texts inserted into the haystack
    depths: list[float]         # where each needle goes, as a fraction of the haystack
    question: str
    answer: str


def make_probe(task: str, depth: float, rng: random.Random) -> Probe:
    if task == "passkey":
        v = rng.randint(10000, 99999)
        return Probe(task, [f" The pass key is {v}. Remember it. {v} is the pass key. "], [depth],
                     "\nWhat is the pass key? The pass key is", f" {v}")
    if task == "multikey":
        keys = [f"{a}-{b}" for a, b in zip(rng.sample(_WORDS, 4), rng.sample(_WORDS, 4))]
        values = [rng.randint(1000000, 9999999) for _ in keys]
        needles = [f" One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
        depths = [depth] + [rng.random() for _ in keys[1:]]           # the asked key at `depth`, distractors anywhere
        return Probe(task, needles, depths,
                     f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:",
                     f" {values[0]}")
    if task == "variable-tracking":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        v = rng.randint(10000, 99999)
        needles = [f" VAR {names[0]} = {v}. "] + [f" VAR {b} = {a}. " for a, b in zip(names, names[1:])]
        depths = [depth + (1.0 - depth) * i / len(names) for i in range(len(names))]   # the chain runs forward
        return Probe(task, needles, depths,
                     f"\nQuestion: which variables are assigned the value {v} in the text above? Answer: following "
                     f"the chain of assignments, {len(names)} variables hold {v}. They are:",
                     " " + " ".join(names))
    raise ValueError(f"unknown long-context task {task!r}")


def build_prompt(em, probe: Probe, length: int, haystack: Sequence[int], offset: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) with len(prompt) + len(answer) == length + 1 (the answer's last token is only
    predicted), or ValueError when the needles and question alone do not fit."""
    needles = [em.encode(t) for t in probe.needles]
    question, answer = em.encode(probe.question), em.encode(probe.answer)
    fixed = 1 + sum(map(len, needles)) + len(question) + len(answer) - 1
    filler = length - fixed
    if filler < 0:
        raise ValueError(f"{probe.task} needs {fixed} tokens before any haystack; context {length} is too short")
    hay = [haystack[(offset + i) % len(haystack)] for i in range(filler)]
    # Back to front, so earlier insertions do not shift later positions; at equal positions the later needle goes in
    # first, which keeps the needles in their order.
    placed = [(int(round(d * filler)), i, n) for i, (d, n) in enumerate(zip(probe.depths, needles))]
    for pos, _, needle in sorted(placed, key=lambda x: (-x[0], -x[1])):
        hay[pos:pos] = needle
    return [em.bos] + hay + question, answer


def haystack_texts(cfg, data_dir) -> list[str]:
    files = cfg.eval.long_context.haystack_files
    if files:
        texts = []
        for f in files:
            p = Path(f)
            if not p.is_file():
                raise ConfigError(f"eval.long_context.haystack_files: no such file: {p}")
            texts.append(p.read_text(errors="replace"))
        return texts
    docs = Path(data_dir) / "documents.parquet"
    if not docs.is_file():
        raise ConfigError(f"long-context haystack: {data_dir} has no documents.parquet (set "
                          "eval.long_context.haystack_files to use your own text)")
    return pq.read_table(docs, columns=["text"]).column("text").to_pylist()


def haystack_tokens(em, texts: list[str], need: int) -> list[int]:
    """Token stream of the haystack texts (separated by blank lines), at least `need` tokens long when they hold that
    much; shorter corpora are repeated."""
    out: list[int] = []
    for t in texts:
        out += em.encode(t + "\n\n")
        if len(out) >= 2 * need:
            break
    if not out:
        raise ConfigError("long-context haystack: the haystack texts are empty")
    return out


def default_lengths(max_len: int) -> list[int]:
    """Doubling from max(256, max_len / 8) up to max_len (shorter contexts cannot hold the multi-key needles)."""
    n, out = max(256, max_len // 8), []
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


def run(em, cfg, data_dir) -> SuiteResult:
    lc = cfg.eval.long_context
    lengths = sorted(set(lc.lengths or default_lengths(em.max_len)))
    too_long = [n for n in lengths if n > em.max_len]
    if too_long:
        raise ConfigError(f"eval.long_context.lengths {too_long} exceed the model's max_seq_len {em.max_len}")
    hay = haystack_tokens(em, haystack_texts(cfg, data_dir), max(lengths))
    rng = random.Random(lc.seed)
    cells, skipped = [], []
    for task in lc.tasks:
        for length in lengths:
            for depth in lc.depths:
                for sample in range(lc.samples):
                    probe = make_probe(task, depth, rng)
                    try:
                        prompt, answer = build_prompt(em, probe, length, hay, rng.randrange(len(hay)))
                    except ValueError as e:
                        skipped.append(str(e))
                        break
                    cells.append((task, length, depth, sample, prompt, answer))
    rows = []
    with Progress("eval long-context", total=len(cells) * len(MODES), unit="prompt") as bar:
        for mode in MODES:
            for start in range(0, len(cells), cfg.eval.batch_size):
                chunk = cells[start:start + cfg.eval.batch_size]
                scored = em.score([c[4] for c in chunk], [c[5] for c in chunk], mode, batch_size=len(chunk))
                for (task, length, depth, sample, prompt, answer), s in zip(chunk, scored):
                    rows.append({"task": task, "length": length, "depth": depth, "sample": sample, "mode": mode,
                                 "correct": s.greedy, "answer_logprob": s.logprob, "answer_tokens": s.n_tokens})
                bar.update(len(chunk), mode=mode)
    summary: dict = {"prompts": len(cells), "lengths": len(lengths), "max_length": max(lengths)}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[f"{mode}/accuracy"] = sum(r["correct"] for r in mine) / max(len(mine), 1)
        for task in lc.tasks:
            t = [r for r in mine if r["task"] == task]
            if t:
                summary[f"{mode}/{task}/accuracy"] = sum(r["correct"] for r in t) / len(t)
                summary[f"{mode}/{task}/answer_logprob"] = sum(r["answer_logprob"] for r in t) / len(t)
        for length in lengths:
            t = [r for r in mine if r["length"] == length]
            if t:
                summary[f"{mode}/length_{length}/accuracy"] = sum(r["correct"] for r in t) / len(t)
    summary["sparse_minus_dense/accuracy"] = summary["sparse/accuracy"] - summary["dense/accuracy"]
    return SuiteResult("long-context", rows, summary, {"lengths": lengths, "depths": list(lc.depths),
                                                       "tasks": list(lc.tasks), "top_k": em.cfg.index_topk,
                                                       "skipped": sorted(set(skipped))})
