"""The in-process rollout engine: continuous batching of variable-length sequences over a slot cache, dense or
sparse (DSA) attention, sampling with per-token log-probs, and capture of what RL replays (MoE routing, the
kept-token sets of truncation) and of the indexer's top-k.

    engine = Engine(model, mode="sparse", max_batch=64, max_len=4096, capture_routing=True)
    outs = engine.generate([prompt_ids, ...], SamplingParams(temperature=1.0, top_p=0.95, stop_token_ids=(eos,)))
    outs[0].tokens, outs[0].logprobs, outs[0].routing      # routing: [positions, MoE layers, k] int32

Multi-turn use (`dsaforge.model.rollout`) keeps a sequence's slot between segments:

    sid = engine.submit(prompt_ids, params)        # queue: prefill the tokens, then generate one segment
    for sid, seg in engine.step(): ...             # each step admits, prefills and decodes; returns ended segments
    engine.submit(tool_output_ids, params, sid=sid)  # continue the same sequence: its cache is extended, not redone
    engine.release(sid)                            # free the slot for a waiting sequence

Each step prefills the sequences with pending input (right-padded, per-row positions), samples their first token,
then runs one decode step over all slots (free and paused slots write to a spare cache column). On a GPU the
decode step is replayed from a CUDA graph per bucket of visible length (`cuda_graphs`); if capture fails the
engine says why in `stats["cuda_graphs"]` and stays eager.

Sampling is per sequence: the token at position p of a sequence is a function of its context and of (engine seed,
the sequence's key, p) alone (`dsaforge.model.sampling`), never of the other sequences in the batch or of when
they arrived. The key is `SamplingParams.seed` when set (the same seed and prompt give the same tokens whatever the
order, batch size or timing), else the sequence's submission number (a fresh engine given the same prompts in the
same order repeats itself).

Positions: sequence token p is written at cache column p. The last token of a segment is fed (and its routing
captured) only when the sequence continues, so `routing`/`topk` cover positions 0 .. len(tokens) - 2: the output
at the last position is never scored.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dsaforge.model.infer import Capture, SlotCache, forward_rows, stack_experts
from dsaforge.model.sampling import SamplingParams, draw_bits, sample, seed_of, sequence_stream, to_uniforms
from dsaforge.model.transformer import Transformer

MODES = ("dense", "sparse")


@dataclass
class Segment:
    """The tokens one `submit` generated."""
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str                          # "stop" | "length" (max_new_tokens) | "context" (cache full)
    kept: Optional[list[np.ndarray]] = None     # per token: kept token ids (int32), None where nothing was cut


@dataclass
class Completion:
    """A whole sequence as `generate` returns it."""
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    kept: Optional[list[Optional[np.ndarray]]] = None
    routing: Optional[np.ndarray] = None        # [P + G - 1, n_moe_layers, k] int32
    topk: Optional[np.ndarray] = None           # [P + G - 1, n_layers, index_topk] int32, -1 = empty slot


@dataclass
class _Row:
    sid: int
    tokens: list[int]                           # the whole sequence so far
    pending: list[int]                          # tokens to prefill (not yet in the cache)
    params: SamplingParams
    stream: int = 0                             # its random stream (engine seed, key)
    slot: int = -1
    length: int = 0                             # tokens in the cache
    state: str = "waiting"                      # waiting | prefill | decode | paused
    seg: Optional[Segment] = None
    routing: list = field(default_factory=list)  # per cached position: [n_moe, k]
    topk: list = field(default_factory=list)     # per cached position: [n_layers, K]


class Engine:
    def __init__(self, model: Transformer, mode: str = "sparse", max_batch: int = 64, max_len: Optional[int] = None,
                 capture_routing: bool = False, capture_kept: bool = False, capture_topk: bool = False,
                 cuda_graphs: Optional[bool] = None, prefill_tokens: int = 16384, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.cfg
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        # The model's train/eval mode is left alone (a trainer may share it); the inference path depends on neither.
        self.model, self.mode, self.max_batch, self.max_len = model, mode, max_batch, max_len
        self.capture_routing, self.capture_kept, self.capture_topk = capture_routing, capture_kept, capture_topk
        self.prefill_tokens = prefill_tokens
        self.device = model.embed.weight.device
        self.cache = SlotCache.allocate(model, max_batch, max_len, with_indexer=mode == "sparse" or capture_topk)
        self.seed = seed
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, tuple] = {}
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "generated_tokens": 0,
                      "cuda_graphs": "on" if self.use_graphs else "off"}
        self._rows: dict[int, _Row] = {}
        self._waiting: deque[int] = deque()
        self._free = list(range(max_batch))[::-1]
        self._slot_row: list[Optional[int]] = [None] * max_batch
        self._ids = itertools.count()
        self.refresh_weights()

    def refresh_weights(self) -> None:
        """Re-read derived weights (the stacked experts); call after the model's parameters change."""
        self.stacked = stack_experts(self.model)
        self._graphs.clear()

    # ---------------------------------------------------------------- sequence API
    def submit(self, tokens: Sequence[int], params: SamplingParams, sid: Optional[int] = None) -> int:
        """Queue `tokens` for prefill followed by one generated segment. Without sid a new sequence starts; with
        the sid of a paused sequence, the tokens extend it (its cache is kept). A sequence samples from the stream
        of params.seed (or, when None, of its sid); a continuation with a seed switches to that seed's stream."""
        tokens = [int(t) for t in tokens]
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in tokens):
            raise ValueError(f"token ids must be in [0, {vocab})")
        total = len(tokens) + (len(self._rows[sid].tokens) if sid in self._rows else 0)
        if total >= self.max_len:
            raise ValueError(f"sequence would hold {total} tokens; the engine's max_len is {self.max_len}")
        if sid is None:
            if not tokens:
                raise ValueError("a new sequence needs at least one prompt token")
            sid = next(self._ids)
            key = params.seed if params.seed is not None else seed_of("sequence", sid)
            row = _Row(sid, list(tokens), list(tokens), params, sequence_stream(self.seed, key))
            self._rows[sid] = row
            self._waiting.append(sid)
        else:
            row = self._rows.get(sid)
            if row is None or row.state != "paused":
                raise ValueError(f"sequence {sid} is not paused (state {row.state if row else 'unknown'})")
            row.tokens += tokens
            row.pending += tokens
            row.params, row.state = params, "prefill"
            if params.seed is not None:
                row.stream = sequence_stream(self.seed, params.seed)
        return sid

    def release(self, sid: int) -> None:
        row = self._rows.pop(sid, None)
        if row is None:
            return
        if row.sid in self._waiting:
            self._waiting.remove(row.sid)
        if row.slot >= 0:
            self._slot_row[row.slot] = None
            self._free.append(row.slot)

    def tokens(self, sid: int) -> list[int]:
        return list(self._rows[sid].tokens)

    def captured(self, sid: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(routing [positions, n_moe, k], indexer top-k [positions, n_layers, K]) of the cached positions."""
        row = self._rows[sid]
        routing = np.stack(row.routing).astype(np.int32) if self.capture_routing and row.routing else None
        topk = np.stack(row.topk).astype(np.int32) if self.capture_topk and row.topk else None
        return routing, topk

    @property
    def busy(self) -> bool:
        return any(r.state in ("waiting", "prefill", "decode") for r in self._rows.values())

    @property
    def running(self) -> bool:
        """Some sequence holds a slot and has input to prefill or tokens to decode: `step()` will make progress.
        False while busy means every waiting sequence waits for a slot that a paused sequence holds."""
        return any(r.state in ("prefill", "decode") for r in self._rows.values())

    def step(self) -> list[tuple[int, Segment]]:
        """Admit waiting sequences into free slots, prefill pending input, decode one token for every generating
        sequence. Returns the segments that ended in this step (their sequences are paused)."""
        while self._waiting and self._free:
            row = self._rows[self._waiting.popleft()]
            row.slot = self._free.pop()
            self._slot_row[row.slot] = row.sid
            row.state, row.length = "prefill", 0
        done: list[tuple[int, Segment]] = []
        # A row whose input exceeds prefill_tokens is prefilled in chunks: one chunk per row per step, its first token
        # sampled after the last chunk (long prompts never materialise [S, T] scores for all of S at once).
        prefill = [r for r in self._rows.values() if r.state == "prefill"]
        for batch in self._prefill_batches(prefill):
            done += self._prefill(batch)
        if any(r.state == "decode" for r in self._rows.values()):
            done += self._decode()
        return done

    # ---------------------------------------------------------------- prefill
    def _chunk(self, r: _Row) -> int:
        return min(len(r.pending), self.prefill_tokens)

    def _prefill_batches(self, rows: list[_Row]) -> list[list[_Row]]:
        rows = sorted(rows, key=self._chunk)
        batches, cur = [], []
        for r in rows:
            width = max([self._chunk(x) for x in cur] + [self._chunk(r)])
            if cur and width * (len(cur) + 1) > self.prefill_tokens:
                batches.append(cur)
                cur = []
            cur.append(r)
        return batches + ([cur] if cur else [])

    def _prefill(self, rows: list[_Row]) -> list[tuple[int, Segment]]:
        dev = self.device
        counts = [self._chunk(r) for r in rows]
        tok = torch.zeros(len(rows), max(counts), dtype=torch.long)
        for i, (r, c) in enumerate(zip(rows, counts)):
            tok[i, :c] = torch.tensor(r.pending[:c])
        start = torch.tensor([r.length for r in rows], device=dev)
        n = torch.tensor(counts, device=dev)
        slots = torch.tensor([r.slot for r in rows], device=dev)
        cap = self._capture()
        logits = forward_rows(self.model, self.cache, tok.to(dev), start, n, slots, self.mode, self.stacked, cap)
        self._record(cap, rows, counts)
        ready = []
        for i, (r, c) in enumerate(zip(rows, counts)):
            self.stats["prefill_tokens"] += c
            r.length += c
            r.pending = r.pending[c:]
            if not r.pending:
                r.seg, r.state = Segment([], [], ""), "decode"
                ready.append(i)
        if not ready:
            return []
        ready_rows = [rows[i] for i in ready]
        return self._sample(ready_rows, logits[torch.tensor(ready, device=dev)],
                            torch.from_numpy(self._draws(ready_rows)).to(dev))

    # ---------------------------------------------------------------- decode
    def _decode(self) -> list[tuple[int, Segment]]:
        dev, n_slots = self.device, self.max_batch
        active = [r for r in self._rows.values() if r.state == "decode"]
        # One host-to-device copy per step: row 0 the input tokens, row 1 the positions (idle slots write to the
        # spare column), row 2 the active slots (whose logits are sampled), row 3 their random draws.
        host = np.zeros((4, n_slots), dtype=np.int64)
        host[1] = self.max_len
        slots = [r.slot for r in active]
        host[0, slots] = [r.tokens[-1] for r in active]
        host[1, slots] = [r.length for r in active]
        host[2, :len(slots)] = slots
        host[3, :len(slots)] = self._draws(active)
        t = max(r.length for r in active) + 1
        graph = self._graph_for(t) if self.use_graphs else None
        if graph is not None:
            g, static, cap = graph
            inputs = static["inputs"]
            inputs.copy_(torch.from_numpy(host))         # straight into the graph's input buffer
            g.replay()
            logits = static["logits"]
        else:
            inputs = torch.from_numpy(host).to(dev)
            cap = self._capture()
            logits = forward_rows(self.model, self.cache, inputs[0, :, None], inputs[1],
                                  torch.ones(n_slots, dtype=torch.long, device=dev), None, self.mode, self.stacked,
                                  cap, t=t)
        self.stats["decode_steps"] += 1
        for r in active:
            r.length += 1
        # the capture is read back once the sampling kernels are queued: their launches overlap the step's tail
        return self._sample(active, logits[inputs[2, :len(slots)]], inputs[3, :len(slots)],
                            then=lambda: self._record(cap, active, [1] * len(active), index=slots))

    def _bucket(self, t: int) -> int:
        b = 256
        while b < t:
            b *= 2
        return min(b, self.max_len + 1)

    def _graph_for(self, t: int):
        """The CUDA graph of a decode step over all slots with `bucket(t)` visible keys (captured on first use)."""
        t = self._bucket(t)
        if t in self._graphs:
            return self._graphs[t]
        dev, n_slots = self.device, self.max_batch
        inputs = torch.zeros(4, n_slots, dtype=torch.long, device=dev)      # as `_decode` lays them out
        inputs[1] = self.max_len
        static = {"inputs": inputs, "tok": inputs[0, :, None], "start": inputs[1],
                  "n": torch.ones(n_slots, dtype=torch.long, device=dev)}
        try:
            stream = torch.cuda.Stream(device=dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):   # warm-up: kernel autotuning and lazy initialisation happen outside capture
                    forward_rows(self.model, self.cache, static["tok"], static["start"], static["n"], None,
                                 self.mode, self.stacked, self._capture(), t=t)
            torch.cuda.current_stream(dev).wait_stream(stream)
            g, cap = torch.cuda.CUDAGraph(), self._capture()
            with torch.cuda.graph(g):
                static["logits"] = forward_rows(self.model, self.cache, static["tok"], static["start"], static["n"],
                                                None, self.mode, self.stacked, cap, t=t)
        except Exception as e:   # a kernel that syncs the host cannot be captured: stay eager, say why
            self.use_graphs = False
            self.stats["cuda_graphs"] = f"off: capture failed ({type(e).__name__}: {str(e)[:200]})"
            return None
        self._graphs[t] = (g, static, cap)
        return self._graphs[t]

    # ---------------------------------------------------------------- shared
    def _capture(self) -> Optional[Capture]:
        if not (self.capture_routing or self.capture_topk):
            return None
        return Capture(routing=self.capture_routing, topk=self.capture_topk)

    def _record(self, cap: Optional[Capture], rows: list[_Row], counts: list[int],
                index: Optional[list[int]] = None) -> None:
        """Append each row's captured routing / top-k for the positions this forward ran."""
        if cap is None:
            return
        idx = index if index is not None else list(range(len(rows)))
        if self.capture_routing and cap.moe_indices:
            rt = torch.stack(cap.moe_indices, 2).cpu().numpy()          # [B, S, n_moe, k]
            for r, i, c in zip(rows, idx, counts):
                r.routing.extend(rt[i, :c])
        if self.capture_topk and cap.topk_indices:
            tk = torch.stack(cap.topk_indices, 2).cpu().numpy()         # [B, S, n_layers, K]
            for r, i, c in zip(rows, idx, counts):
                r.topk.extend(tk[i, :c])

    @staticmethod
    def _draws(rows: list[_Row]) -> np.ndarray:
        """[rows] int64: each row's draw for the token it samples next (at position len(tokens) of its sequence)."""
        return draw_bits([r.stream for r in rows], [len(r.tokens) for r in rows])

    def _sample(self, rows: list[_Row], logits: torch.Tensor, bits: torch.Tensor,
                then: Optional[Callable[[], None]] = None) -> list[tuple[int, Segment]]:
        """Draw each row's next token from its own draw (`bits`, on the device); `then` runs after the sampling
        kernels are queued, before the host waits."""
        toks, lps, kept = sample(logits, [r.params for r in rows], to_uniforms(bits), want_kept=self.capture_kept)
        both = torch.stack((toks.double(), lps.double()))
        if then is not None:
            then()
        both = both.tolist()                                             # one device-to-host copy (and sync)
        toks, lps = [int(x) for x in both[0]], both[1]
        kept_rows = kept.cpu().numpy() if kept is not None else None
        done = []
        for i, r in enumerate(rows):
            tok, seg = toks[i], r.seg
            seg.tokens.append(tok)
            seg.logprobs.append(lps[i])
            if self.capture_kept:
                seg.kept = seg.kept if seg.kept is not None else []
                seg.kept.append(np.flatnonzero(kept_rows[i]).astype(np.int32)
                                if kept_rows is not None and r.params.truncates else None)
            r.tokens.append(tok)
            self.stats["generated_tokens"] += 1
            reason = ("stop" if tok in r.params.stop_token_ids else
                      "length" if len(seg.tokens) >= r.params.max_new_tokens else
                      "context" if len(r.tokens) >= self.max_len else "")
            if reason:
                seg.finish_reason, r.state, r.seg = reason, "paused", None
                # the segment's last token is fed only if the sequence continues
                r.pending = [tok]
                done.append((r.sid, seg))
        return done

    # ---------------------------------------------------------------- one-shot generation
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_step: Optional[Callable[[int, int], None]] = None) -> list[Completion]:
        """Complete every prompt (continuous batching: a finished sequence's slot takes the next prompt).
        on_step(new_tokens, finished_sequences) is called after each step (progress)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        sids = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        order = {s: i for i, s in enumerate(sids)}
        out: list[Optional[Completion]] = [None] * len(sids)
        while self.busy:
            before = self.stats["generated_tokens"]
            ended = self.step()
            for sid, seg in ended:
                routing, topk = self.captured(sid)
                i = order[sid]
                out[i] = Completion(list(prompts[i]), seg.tokens, seg.logprobs, seg.finish_reason, seg.kept,
                                    routing, topk)
                self.release(sid)
            if on_step:
                on_step(self.stats["generated_tokens"] - before, len(ended))
        return out   # type: ignore[return-value]
