"""Text generation for the suites that sample completions (code, reasoning, lm-eval's generate_until): prompts in,
n completions each out, through the rollout engine (`dsaforge.model.engine.Engine`: continuous batching, dense or
sparse attention without the indexer KL, CUDA-graph decode on GPUs).

The engine stops on EOS; stop strings (HumanEval's top-level statements, `</answer>`) are applied to the decoded
text afterwards, so a completion is exactly what a server honouring them would have returned.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from dsaforge.eval.extract import cut_at_stops
from dsaforge.progress import Progress


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[list[str]]: ...


class EngineGenerator:
    def __init__(self, em, mode: str = "sparse", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 max_batch: int = 64, desc: str = "generate"):
        self.em, self.mode, self.temperature, self.top_p = em, mode, temperature, top_p
        self.seed, self.max_batch, self.desc = seed, max_batch, desc

    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[list[str]]:
        from dsaforge.model.engine import Engine
        from dsaforge.model.sampling import SamplingParams

        em = self.em
        # The prompt's tail when it is longer than the window leaves room for the completion.
        keep = max(1, em.max_len - max_new_tokens)
        ids = [([em.bos] + em.encode(p))[-keep:] for p in prompts]
        flat = [x for x in ids for _ in range(n)]
        if not flat:
            return [[] for _ in prompts]
        max_len = min(em.max_len, max(len(x) for x in flat) + max_new_tokens)
        engine = Engine(em.model, self.mode, max_batch=min(self.max_batch, len(flat)), max_len=max_len,
                        seed=self.seed)
        params = [SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                 max_new_tokens=max(1, min(max_new_tokens, max_len - len(x))),
                                 stop_token_ids=(em.eos,)) for x in flat]
        with Progress(self.desc, total=len(flat), unit="completion") as bar:
            done = engine.generate(flat, params, on_step=lambda _new, ended: bar.update(ended))
        texts = [cut_at_stops(em.decode(c.tokens), stop) for c in done]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def make_generator(em, cfg, mode: str = "sparse", desc: str = "generate") -> EngineGenerator:
    e = cfg.eval
    return EngineGenerator(em, mode=mode, temperature=e.temperature, top_p=e.top_p, seed=e.seed, desc=desc)
