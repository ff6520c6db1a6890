"""A checkpoint under evaluation: the model of a training stage's HF export, its tokenizer, and the scoring
primitives every suite shares (token log-probs of continuations, greedy agreement), in dense or sparse mode.

The same weights answer in both modes, so dense-vs-DSA differences are the attention's alone (paper §2.2).
Log-probs never materialise [S, vocab] logits for long inputs: the output head runs only where a continuation
is scored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dsaforge.config import Config, ConfigError

MODEL_STAGES = ("grpo", "sft", "sparse", "warmup", "pretrain")    # the newest checkpoint a pipeline made, first


def model_input(inputs: dict[str, Path]) -> tuple[str, Path]:
    """(stage name, HF export directory) of the model stage among a stage's inputs (`hf-checkpoint` = any export)."""
    for name in (*MODEL_STAGES, "hf-checkpoint"):
        if name in inputs:
            path = Path(inputs[name])
            hf = path if name == "hf-checkpoint" else path / "hf"
            if not (hf / "config.json").is_file():
                raise ConfigError(f"evaluate: input {name}={path} has no HF export ({hf}/config.json is missing; "
                                  "did that stage finish?)")
            return name, hf
    raise ConfigError("evaluate needs a model: pass --input sparse=DIR (or pretrain=, warmup=, sft=, grpo=, or "
                      "hf-checkpoint=DIR for any exported checkpoint)")


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Scored:
    logprob: float          # sum of log p(continuation token | everything before it)
    greedy: bool            # every continuation token is the argmax: greedy decoding would produce it
    n_tokens: int


class EvalModel:
    """`EvalModel.load(hf_dir, tokenizer, device)`; `score(prefixes, continuations, mode)`."""

    def __init__(self, model, tokenizer, device: torch.device, source: str = ""):
        self.model, self.tokenizer, self.device, self.source = model, tokenizer, device, source
        self.cfg = model.cfg
        from dsaforge.data.tokenizer import BOS, EOS
        self.bos, self.eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)

    @classmethod
    def load(cls, hf_dir: Path, tokenizer_path: Path, device: torch.device) -> "EvalModel":
        from dsaforge.data.tokenizer import load_tokenizer
        from dsaforge.model.hf import import_hf

        tokenizer = load_tokenizer(tokenizer_path)
        model = import_hf(hf_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
        model.eval()
        model.fused_dsa = device.type == "cuda"
        if tokenizer.get_vocab_size() > model.cfg.vocab_size:
            raise ConfigError(f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens, more than the "
                              f"model's vocab_size {model.cfg.vocab_size}: they were not trained together")
        return cls(model, tokenizer, device, str(hf_dir))

    @property
    def max_len(self) -> int:
        return self.cfg.max_seq_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, mode: str) -> torch.Tensor:
        """[B, S] -> final-norm hidden states [B, S, dim]."""
        return self.model(tokens.to(self.device), mode=mode, return_hidden=True).hidden

    @torch.no_grad()
    def score(self, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], mode: str,
              batch_size: int = 4) -> list[Scored]:
        """Log-likelihood of each continuation after its prefix, and whether greedy decoding reproduces it.

        Sequences are right-padded into batches of equal length; causal attention keeps padding out of every scored
        position (padding only follows them), in dense and sparse mode alike."""
        items = [(list(p), list(c)) for p, c in zip(prefixes, continuations)]
        for p, c in items:
            if not p or not c:
                raise ValueError("score needs a non-empty prefix and continuation")
            if len(p) + len(c) > self.max_len + 1:
                raise ValueError(f"prefix + continuation is {len(p) + len(c)} tokens; the model's max_seq_len is "
                                 f"{self.max_len}")
        out: list[Optional[Scored]] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [(items[i][0] + items[i][1])[:-1] for i in chunk]       # the last token is only a target
            width = max(len(s) for s in seqs)
            tokens = torch.full((len(seqs), width), self.eos, dtype=torch.long)
            for r, s in enumerate(seqs):
                tokens[r, :len(s)] = torch.tensor(s)
            h = self.hidden(tokens, mode)                                            # [b, S, dim]
            for r, i in enumerate(chunk):
                p, c = items[i]
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=h.device)   # positions predicting c
                logp = F.log_softmax(self.model.head(h[r, pos]).float(), dim=-1)      # [len(c), V]
                target = torch.tensor(c, device=h.device)
                out[i] = Scored(float(logp.gather(-1, target[:, None]).sum()),
                                bool((logp.argmax(-1) == target).all()), len(c))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def rolling_logprob(self, tokens: Sequence[int], mode: str, window: Optional[int] = None) -> tuple[float, int]:
        """Sum of log p over every token after the first, in disjoint windows of at most `window` predicted tokens
        (lm-eval's rolling windows: each conditions on whatever earlier tokens still fit): a long document's
        perplexity."""
        window = min(window or self.max_len, self.max_len)
        ids = list(tokens)
        if len(ids) < 2:
            return 0.0, 0
        total, n, start = 0.0, 0, 1
        while start < len(ids):
            end = min(start + window, len(ids))
            ctx_start = max(0, end - window - 1)
            scored = self.score([ids[ctx_start:start]], [ids[start:end]], mode)[0]
            total, n, start = total + scored.logprob, n + scored.n_tokens, end
        return total, n


def load_for_eval(cfg: Config, inputs: dict[str, Path]) -> tuple[EvalModel, str]:
    """The model stage's checkpoint and prepare-data's tokenizer, on the configured device."""
    stage, hf = model_input(inputs)
    if "prepare-data" not in inputs:
        raise ConfigError("evaluate needs the prepare-data output for its tokenizer (--input prepare-data=DIR)")
    tok = Path(inputs["prepare-data"]) / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"evaluate: {inputs['prepare-data']} has no tokenizer.json (not a prepared dataset)")
    meta = hf / "dsaforge_stage.json"
    stage_mode = json.loads(meta.read_text()).get("mode", "") if meta.is_file() else ""
    return EvalModel.load(hf, tok, resolve_device(cfg)), f"{stage}{f' ({stage_mode})' if stage_mode else ''}"
