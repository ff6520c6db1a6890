"""Multi-turn tool-use rollouts over the episode interface, for any policy (in-process engine or OpenAI server).

    trajs = run_episodes(policy, [make_episode(t, sandbox) for t in tasks], RolloutConfig(max_turns=20))
    trajs[0].reward, trajs[0].windows[0].tokens, trajs[0].messages

Per episode: reset -> the policy writes a segment -> its tool calls run through the episode (concurrently with the
other episodes' decoding; malformed calls get invalid-call observations) -> the outputs extend the same assistant
turn -> ... until a segment calls no tool (its content is the submission), the turn limit, or the context.

Thinking context (paper §3.2.1): reasoning is dropped only when a new user message arrives, so within an episode
(one user message, then tool outputs) every segment's reasoning stays in context and the policy extends its cache.
Context-window strategies, applied when a continuation would pass `context_budget` of the window (paper §4.4 uses
80% of 128K): "discard_all" drops every earlier tool call and output, "discard_75" the oldest 75% of tool turns,
"reprefill" keeps every call and output but drops the earlier segments' reasoning; each then re-prefills a new
window. "none" ends the episode at the budget.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait, FIRST_COMPLETED
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from dsaforge.rollout.policy import Policy, Turn, Window

STRATEGIES = ("discard_all", "discard_75", "reprefill", "none")


@dataclass(frozen=True)
class RolloutConfig:
    max_turns: int = 20                   # segments that call tools, per episode
    context: str = "discard_all"          # what to do when the window fills (STRATEGIES)
    context_budget: float = 0.8           # fraction of the policy's context that triggers the strategy
    max_resets: int = 4                   # context resets per episode before it ends
    tool_workers: int = 8                 # tool calls running at once (sandbox processes)

    def __post_init__(self):
        if self.context not in STRATEGIES:
            raise ValueError(f"context must be one of {STRATEGIES}, got {self.context!r}")
        if not 0 < self.context_budget <= 1:
            raise ValueError(f"context_budget must be in (0, 1], got {self.context_budget}")
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {self.max_turns}")


@dataclass
class Trajectory:
    task_id: str
    agent_class: str
    messages: list[dict]                  # the transcript as the last window saw it (after any discards)
    windows: list[Window]                 # token-level record per context window (one unless the context reset)
    turns: int = 0                        # segments that called tools
    invalid_calls: int = 0
    context_resets: int = 0
    finish_reason: str = ""               # answered | turn_limit | context | length | error
    passed: bool = False
    reward: float = 0.0
    detail: str = ""
    wall_s: float = 0.0
    full_messages: list[dict] = field(default_factory=list)   # every message, discards included


def trim_messages(messages: list[dict], strategy: str) -> list[dict]:
    """The transcript a new window starts from. Tool turns are an assistant message with tool calls and the tool
    outputs that follow it."""
    head = [m for m in messages if m["role"] in ("system", "user")][:2]
    body = messages[len(head):]
    turns, cur = [], []
    for m in body:
        if m["role"] == "assistant" and cur:
            turns.append(cur)
            cur = []
        cur.append(m)
    if cur:
        turns.append(cur)
    if strategy == "discard_all":
        keep = []
    elif strategy == "discard_75":
        keep = turns[math.ceil(0.75 * len(turns)):]
    else:   # reprefill: every call and output stays; reasoning of the earlier segments goes
        keep = [[{k: v for k, v in m.items() if k != "reasoning_content"} for m in t] for t in turns]
    return head + [m for t in keep for m in t]


@dataclass
class _Live:
    ep: object
    traj: Trajectory
    t0: float
    pending: Optional[Future] = None
    open: bool = False                   # the policy holds a window for it


def run_episodes(policy: Policy, episodes: Sequence, cfg: RolloutConfig = RolloutConfig(),
                 on_done: Optional[Callable[[Trajectory], None]] = None) -> list[Trajectory]:
    """Roll out every episode (each reset here, closed at its end) and score it with its own verifier."""
    live: dict[int, _Live] = {}
    out: list[Optional[Trajectory]] = [None] * len(episodes)
    budget = int(cfg.context_budget * policy.max_context)

    def finish(key: int, reason: str, submission_text: Optional[str]) -> None:
        lv = live.pop(key)
        if lv.open:
            lv.traj.windows.append(policy.end(key))
        lv.traj.finish_reason = reason
        try:
            verdict = lv.ep.submit(lv.ep.submission_from_text(submission_text) if submission_text else None)
            lv.traj.passed, lv.traj.reward, lv.traj.detail = verdict.passed, verdict.score, verdict.detail
        except Exception as e:   # scoring trouble is the episode's outcome, not the batch's end
            lv.traj.detail = f"scoring failed: {type(e).__name__}: {e}"[:500]
        lv.ep.close()
        lv.traj.wall_s = time.monotonic() - lv.t0
        out[key] = lv.traj
        if on_done:
            on_done(lv.traj)

    with ThreadPoolExecutor(cfg.tool_workers) as tools:
        for key, ep in enumerate(episodes):
            t0 = time.monotonic()
            msgs = ep.reset()
            traj = Trajectory(ep.task.task_id, ep.task.agent_class, list(msgs), [], full_messages=list(msgs))
            live[key] = _Live(ep, traj, t0)
            if policy.prompt_tokens(msgs, ep.tools) + 1 >= budget:
                finish(key, "context", None)        # the task alone does not fit the window
                continue
            policy.begin(key, msgs, ep.tools)
            live[key].open = True

        def run_calls(ep, calls) -> list[dict]:
            out = []
            for c in calls:
                try:
                    obs = ep.step(c)
                except Exception as e:   # a tool's infrastructure failing is that call's observation, not a crash
                    obs = json.dumps({"error": f"the tool failed: {type(e).__name__}: {str(e)[:300]}"})
                out.append({"role": "tool", "content": obs})
            return out

        def resume(key: int) -> None:
            lv = live[key]
            tool_msgs = lv.pending.result()
            lv.pending = None
            lv.traj.messages += tool_msgs
            lv.traj.full_messages += tool_msgs
            if policy.context_used(key, tool_msgs) + 1 < budget:
                policy.extend(key, tool_msgs)
                return
            trimmed = None
            if cfg.context != "none" and lv.traj.context_resets < cfg.max_resets:
                # the strategy's transcript, or, if even that does not fit, the task alone
                for strategy in dict.fromkeys((cfg.context, "discard_all")):
                    msgs = trim_messages(lv.traj.messages, strategy)
                    if policy.prompt_tokens(msgs, lv.ep.tools) + 1 < budget:
                        trimmed = msgs
                        break
            if trimmed is None:
                finish(key, "context", None)
                return
            lv.traj.windows.append(policy.end(key))
            lv.traj.context_resets += 1
            lv.traj.messages = trimmed
            policy.begin(key, trimmed, lv.ep.tools)

        while live:
            polled = policy.poll()
            for key, turn in polled:
                lv = live[key]
                msg = turn.parsed.message()
                lv.traj.messages.append(msg)
                lv.traj.full_messages.append(msg)
                calls = turn.parsed.tool_calls
                if turn.finish_reason in ("length", "context", "error"):
                    finish(key, turn.finish_reason, turn.parsed.content)
                elif not calls:
                    finish(key, "answered", turn.parsed.content)
                elif lv.traj.turns >= cfg.max_turns:
                    finish(key, "turn_limit", None)
                else:
                    lv.traj.turns += 1
                    lv.traj.invalid_calls += sum(c.error is not None for c in calls)
                    lv.pending = tools.submit(run_calls, lv.ep, calls)
            # Tool outputs that are ready continue their episodes; if nothing is generating, wait for one.
            waiting = {lv.pending: k for k, lv in live.items() if lv.pending is not None}
            if not waiting:
                if live and not polled:
                    raise RuntimeError(f"the policy returned nothing for {len(live)} running episodes")
                continue
            # (a poll that returned nothing while episodes still wait to generate means their slots are held by
            # episodes awaiting tool outputs: block on those too)
            ready, _ = wait(waiting, timeout=0 if polled and _generating(live) else None, return_when=FIRST_COMPLETED)
            for f in ready:
                resume(waiting[f])
    return out   # type: ignore[return-value]


def _generating(live: dict[int, _Live]) -> bool:
    return any(lv.pending is None for lv in live.values())

