"""Text generation for the suites that sample completions (code, reasoning): prompts in, n completions each out.

`Generator` is the interface the suites use. `CacheDecoder` decodes with the model's KV cache, one prompt at a time
with its n samples as the batch (rows of one prompt share their length, so the cache's single position serves them
all): greedy at temperature 0, else temperature + top-p sampling; stops at EOS or when every row produced a stop
string.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[list[str]]: ...


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p            # the smallest prefix reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


class CacheDecoder:
    def __init__(self, em, mode: str = "sparse", temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        self.em, self.mode, self.temperature, self.top_p = em, mode, temperature, top_p
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[list[str]]:
        return [self._one(p, n, max_new_tokens, stop) for p in prompts]

    def _one(self, prompt: str, n: int, max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        em, model = self.em, self.em.model
        ids = [em.bos] + em.encode(prompt)
        budget = min(max_new_tokens, em.max_len - len(ids))
        if budget <= 0:
            return [""] * n
        ids = ids[-(em.max_len - 1):]
        cache = model.new_cache(n, len(ids) + budget)
        tokens = torch.tensor([ids] * n, device=em.device)
        out = model(tokens, mode=self.mode, cache=cache, return_hidden=True)
        logits = model.head(out.hidden[:, -1])                                   # [n, V]
        new: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        pos = len(ids)
        for _ in range(budget):
            nxt = sample_next(logits.cpu(), self.temperature, self.top_p, self.gen)
            for r in range(n):
                if not done[r]:
                    t = int(nxt[r])
                    if t == em.eos:
                        done[r] = True
                    else:
                        new[r].append(t)
                        if stop and any(s in em.decode(new[r][-16:]) for s in stop):
                            done[r] = True
            if all(done) or pos >= cache.max_len:
                break
            out = model(nxt.view(n, 1).to(em.device), mode=self.mode, cache=cache, start_pos=pos, return_hidden=True)
            logits = model.head(out.hidden[:, -1])
            pos += 1
        return [em.decode(r) for r in new]


def make_generator(em, cfg, mode: str = "sparse", seed: Optional[int] = None) -> Generator:
    e = cfg.eval
    return CacheDecoder(em, mode=mode, temperature=e.temperature, top_p=e.top_p, seed=e.seed if seed is None else seed)
