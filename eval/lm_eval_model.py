"""A dsaforge checkpoint as an lm-evaluation-harness model, so any lm-eval task runs on it.

    python -m dsaforge.eval.lm_eval_model --model_args checkpoint=SPARSE/hf,tokenizer=DATA/tokenizer.json,mode=sparse \
        --tasks hellaswag --include_path my_tasks/          # any `lm_eval` CLI argument after these
    from dsaforge.eval.lm_eval_model import DsaforgeLM   # in Python: lm_eval.simple_evaluate(model=DsaforgeLM(...))

Registered as lm-eval model "dsaforge". Requests map onto `EvalModel`: `loglikelihood` -> score (sum log-prob and
whether greedy decoding yields the continuation), `loglikelihood_rolling` -> rolling windows of max_seq_len,
`generate_until` -> greedy or sampled decoding with the request's stop strings. `mode` picks dense or sparse (DSA)
attention on the same weights.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dsaforge.eval.checkpoint import EvalModel
from dsaforge.eval.extract import cut_at_stops
from dsaforge.eval.generate import EngineGenerator


@register_model("dsaforge")
class DsaforgeLM(LM):
    def __init__(self, checkpoint: str, tokenizer: str, mode: str = "sparse", batch_size: int | str = 4,
                 device: Optional[str] = None, max_gen_toks: int = 256, em: Optional[EvalModel] = None, **_ignored):
        super().__init__()
        if mode not in ("dense", "sparse"):
            raise ValueError(f"mode must be dense or sparse, got {mode!r}")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.em = em or EvalModel.load(Path(checkpoint), Path(tokenizer), dev)
        self.mode, self.batch_size = mode, int(batch_size) if str(batch_size).isdigit() else 4
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_eval_model(cls, em: EvalModel, mode: str = "sparse", batch_size: int = 4, max_gen_toks: int = 256):
        return cls(checkpoint="", tokenizer="", mode=mode, batch_size=batch_size, max_gen_toks=max_gen_toks, em=em)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation's first token (as lm-eval's HF model does).
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return [self.em.bos] + self.em.encode(context), self.em.encode(continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args[:2]) for r in requests]
        scored = self.em.score([p for p, _ in pairs], [c for _, c in pairs], self.mode, self.batch_size)
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            ids = [self.em.bos] + self.em.encode(r.args[0])
            out.append(self.em.rolling_logprob(ids, self.mode)[0])
        return out

    def generate_until(self, requests) -> list[str]:
        """Requests with the same generation settings go through the engine together."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 else {}
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            key = (until, temperature, float(kwargs.get("top_p", 1.0)),
                   int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            settings.append(key)
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for (until, temperature, top_p, max_toks), idx in groups.items():
            gen = EngineGenerator(self.em, self.mode, temperature, top_p, desc="lm-eval generate")
            texts = gen.generate([requests[i].args[0] for i in idx], 1, max_toks, until)
            for i, t in zip(idx, texts):
                out[i] = cut_at_stops(t[0], until)
        return out


def main(argv=None) -> int:
    """The `lm_eval` command line with the dsaforge model registered: `--model dsaforge` is implied."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        argv = ["--model", "dsaforge", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
