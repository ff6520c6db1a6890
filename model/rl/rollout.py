"""Multi-turn agent episodes on the rollout engine, recorded for GRPO.

    rollout = Rollout(engine, chat, cfg.rl, sandbox_cfg)
    episodes = rollout(tasks, group_size=8, greedy=False)        # [EpisodeRecord], G per task, in task order

Each episode goes through the one episode interface (`dsaforge.synth.episode`): `reset()` gives the messages, the
policy's segments are parsed with the chat template, every tool call runs in the sandbox through `step`, and the
final reply is scored by the task's own verifier through `submit`. The engine keeps each sequence's cache between
segments: a tool output extends the cache instead of re-prefilling (the thinking-context rule keeps earlier
reasoning while only tool outputs are appended, so nothing before is re-rendered). Tool calls and scoring of the
episodes whose segments ended in the same engine step run concurrently (they wait on sandboxed processes).

An episode ends with its final answer (a segment without tool calls), at rl.max_turns, when its sampled tokens reach
rl.max_new_tokens, or when the context is full; the last two are scored as they stand.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dsaforge.model.rl.batch import EpisodeRecord


@dataclass
class _Live:
    record: EpisodeRecord
    episode: object
    turn_ok: bool = True
    kept: list = field(default_factory=list)


class Rollout:
    def __init__(self, engine, chat, rl, sandbox, workers: int = 8):
        from dsaforge.model.sampling import SamplingParams

        self.engine, self.chat, self.rl, self.sandbox = engine, chat, rl, sandbox
        self.eos = chat.eos_id()
        self.params = lambda greedy, budget: SamplingParams(
            temperature=0.0 if greedy else rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
            max_new_tokens=max(1, budget), stop_token_ids=(self.eos,))
        self.pool = ThreadPoolExecutor(workers)

    def __call__(self, tasks: list, group_size: int, greedy: bool = False) -> list[EpisodeRecord]:
        from dsaforge.synth.episode import make_episode

        eng, rl = self.engine, self.rl
        live: dict[int, _Live] = {}
        order: list[int] = []

        def start(i_task: int, task) -> tuple:
            ep = make_episode(task, self.sandbox)
            messages = ep.reset()
            return ep, messages, self.chat.encode(messages, ep.tools)

        jobs = [(g, t) for g, t in enumerate(tasks) for _ in range(group_size)]
        finished: dict[int, EpisodeRecord] = {}
        too_long: list[tuple[int, object]] = []
        for n, ((group, task), (ep, messages, prompt)) in enumerate(zip(jobs, self.pool.map(lambda j: start(*j), jobs))):
            rec = EpisodeRecord(task.task_id, task.agent_class, group, list(prompt), [False] * len(prompt),
                                [0.0] * len(prompt), messages=list(messages))
            if len(prompt) + 1 >= eng.max_len:      # the prompt alone fills the context: scored as it stands
                rec.finish, sid = "context", -1 - n
                too_long.append((sid, None))
            else:
                sid = eng.submit(prompt, self.params(greedy, rl.max_new_tokens))
            live[sid] = _Live(rec, ep)
            order.append(sid)
        for sid, _ in too_long:
            live[sid].record.well_formed = False
            finished[sid] = live[sid].record
        for (sid, _), verdict in zip(too_long, self.pool.map(lambda st: self._score(live[st[0]], None), too_long)):
            finished[sid].score, finished[sid].passed = float(verdict.score), bool(verdict.passed)
        while eng.busy:
            ended = eng.step()
            continuing, closing = [], []
            for sid, seg in ended:
                lv = live[sid]
                rec = lv.record
                rec.tokens += seg.tokens
                rec.sampled += [True] * len(seg.tokens)
                rec.logprobs += seg.logprobs
                lv.kept += [[] if k is None else np.asarray(k).tolist() for k in (seg.kept or [None] * len(seg.tokens))]
                rec.turns += 1
                turn = self.chat.parse(self.chat.decode(seg.tokens))
                rec.messages.append(turn.message())
                lv.turn_ok &= turn.error is None and all(c.error is None for c in turn.tool_calls)
                budget = rl.max_new_tokens - rec.response_tokens
                if turn.tool_calls and seg.finish_reason == "stop" and rec.turns < rl.max_turns and budget > 0:
                    continuing.append((sid, turn))
                else:
                    rec.finish = ("answer" if not turn.tool_calls else "turn limit" if rec.turns >= rl.max_turns
                                  else "budget") if seg.finish_reason == "stop" else seg.finish_reason
                    closing.append((sid, turn))
            for (sid, turn), outputs in zip(continuing, self.pool.map(
                    lambda st: [live[st[0]].episode.step(c) for c in st[1].tool_calls], continuing)):
                lv = live[sid]
                lv.record.tool_calls += len(turn.tool_calls)
                tool_msgs = [{"role": "tool", "content": o} for o in outputs]
                lv.record.messages += tool_msgs
                cont = self.chat.encode_text(self.chat.continuation(tool_msgs))
                budget = rl.max_new_tokens - lv.record.response_tokens
                if len(eng.tokens(sid)) + len(cont) + 1 >= eng.max_len:
                    lv.record.finish = "context"
                    closing.append((sid, turn))
                    continue
                lv.record.tokens += cont
                lv.record.sampled += [False] * len(cont)
                lv.record.logprobs += [0.0] * len(cont)
                eng.submit(cont, self.params(greedy, budget), sid=sid)
            for sid, turn in closing:
                lv = live[sid]
                routing, _ = eng.captured(sid)
                eng.release(sid)
                lv.record.routing = None if routing is None else np.ascontiguousarray(routing.transpose(1, 0, 2))
                lv.record.kept = lv.kept if self.engine.capture_kept else None
                finished[sid] = lv.record
            for (sid, turn), verdict in zip(closing, self.pool.map(lambda st: self._score(live[st[0]], st[1]), closing)):
                rec = finished[sid]
                rec.score, rec.passed = float(verdict.score), bool(verdict.passed)
        return [finished[sid] for sid in order]

    def _score(self, lv: _Live, turn):
        ep = lv.episode
        try:
            submission = ep.submission_from_text(turn.content) if turn is not None and not turn.tool_calls else None
            lv.record.well_formed = lv.turn_ok and submission is not None
            return ep.submit(submission)
        finally:
            ep.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
