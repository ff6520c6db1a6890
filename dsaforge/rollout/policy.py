"""What a multi-turn rollout talks to: a policy that continues conversations one assistant segment at a time.

Two implementations share this interface:
- `EnginePolicy` (in-process `dsaforge.model.engine.Engine`): token-level. Records per-token log-probs, kept-token
  sets and MoE routing (what RL's Keep Sampling Mask / Keep Routing replay), and extends a conversation's cache
  when only tool outputs arrive.
- `dsaforge.rollout.openai.OpenAIPolicy` (an OpenAI-compatible server: vLLM, SGLang): message-level. No routing or
  kept-set capture; log-probs only when the server returns them.

    policy.begin(key, messages, tools)       # start (or restart, after a context reset) a conversation window
    policy.extend(key, tool_messages)        # tool outputs arrived: continue the same assistant turn
    for key, turn in policy.poll(): ...      # segments that ended (waits until at least one has, if any are running)
    window = policy.end(key)                 # close the window: its tokens / log-probs / routing
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Protocol, Sequence

import numpy as np

from dsaforge.data.chat import AssistantTurn, ChatTemplate
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams, seed_of


@dataclass
class Turn:
    """One generated assistant segment."""
    parsed: AssistantTurn
    finish_reason: str                 # "stop" | "length" | "context" | "error"
    n_tokens: int = 0


@dataclass
class Window:
    """One contiguous context: what a trainer scores. mask marks the policy's own tokens (1) against prompt and
    tool-output tokens (0); logprobs are the sampler's (0 where mask is 0). Empty token lists for message-level
    policies."""
    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kept: Optional[list[Optional[np.ndarray]]] = None     # per policy token
    routing: Optional[np.ndarray] = None                  # [len(tokens) - 1, n_moe, k]


class Policy(Protocol):
    captures: frozenset        # subset of {"logprobs", "kept", "routing"}
    max_context: int           # tokens a window may hold

    def begin(self, key: int, messages: list[dict], tools: list[dict]) -> None: ...
    def extend(self, key: int, tool_messages: list[dict]) -> None: ...
    def poll(self) -> list[tuple[int, Turn]]: ...
    def end(self, key: int) -> Window: ...
    def context_used(self, key: int, tool_messages: list[dict]) -> int: ...
    def prompt_tokens(self, messages: list[dict], tools: list[dict]) -> int: ...


class EnginePolicy:
    """The in-process engine behind the Policy interface; one engine sequence per open window.

    Each window samples from its own key, seed_of(params.seed, the episode's seed, the key's window number), where
    the episode's seed is seeds[key] (by the runner's episode index) or, without seeds, the index itself. An
    episode's tokens then depend on its own transcript alone, never on which other episodes share the engine's
    decode steps or on when their tool outputs arrived, so a rollout of the same episodes repeats exactly. Window
    numbers count over the policy's life: a new policy per batch of episodes repeats, a reused one moves on."""

    def __init__(self, engine: Engine, chat: ChatTemplate, params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None):
        self.engine, self.chat, self.seeds = engine, chat, seeds
        eos = chat.eos_id()
        # EOS ends every assistant segment: it is always a stop token here
        self.params = params if eos in params.stop_token_ids else replace(
            params, stop_token_ids=params.stop_token_ids + (eos,))
        self.captures = frozenset({"logprobs"} | ({"kept"} if engine.capture_kept else set())
                                  | ({"routing"} if engine.capture_routing else set()))
        self.max_context = engine.max_len
        self._sid: dict[int, int] = {}
        self._win: dict[int, Window] = {}
        self._params: dict[int, SamplingParams] = {}       # per open window, its seed set
        self._windows: dict[int, int] = {}                 # windows begun per key

    def _add(self, key: int, ids: list[int], mask: int, logprobs=None, kept=None) -> None:
        w = self._win[key]
        w.tokens += ids
        w.mask += [mask] * len(ids)
        w.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        if self.engine.capture_kept:
            w.kept = (w.kept or []) + (kept if kept is not None else [None] * len(ids))

    def begin(self, key, messages, tools):
        ids = self.chat.encode(messages, tools)
        self._win[key] = Window()
        self._add(key, ids, 0)
        window = self._windows.get(key, 0)
        self._windows[key] = window + 1
        episode = self.seeds[key] if self.seeds is not None else key
        self._params[key] = replace(self.params, seed=seed_of(self.params.seed, episode, window))
        self._sid[key] = self.engine.submit(ids, self._params[key])

    def extend(self, key, tool_messages):
        ids = self.chat.encode_text(self.chat.continuation(tool_messages))
        self._add(key, ids, 0)
        self.engine.submit(ids, self._params[key], sid=self._sid[key])

    def prompt_tokens(self, messages, tools):
        return len(self.chat.encode(messages, tools))

    def context_used(self, key, tool_messages):
        """Tokens the window would hold after these tool outputs (before the next segment)."""
        return len(self._win[key].tokens) + len(self.chat.encode_text(self.chat.continuation(tool_messages)))

    def poll(self):
        keys = {sid: key for key, sid in self._sid.items()}
        out = []
        while not out and self.engine.busy:
            for sid, seg in self.engine.step():
                key = keys[sid]
                self._add(key, seg.tokens, 1, seg.logprobs, seg.kept)
                text = self.chat.decode(seg.tokens)
                out.append((key, Turn(self.chat.parse(text), seg.finish_reason, len(seg.tokens))))
            if not out and not self.engine.running:
                break       # more episodes than slots, every slot held by one awaiting its tool outputs
        return out

    def end(self, key):
        sid = self._sid.pop(key)
        w = self._win.pop(key)
        self._params.pop(key, None)
        w.routing, _ = self.engine.captured(sid)
        self.engine.release(sid)
        return w
