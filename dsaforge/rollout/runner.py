"""Multi-turn tool-use rollouts over the episode interface, for any policy (in-process engine or OpenAI server).

    trajs = run_episodes(policy, [make_episode(t, sandbox) for t in tasks], RolloutConfig(max_turns=20))
    trajs[0].reward, trajs[0].windows[0].tokens, trajs[0].messages

Per episode: reset -> the policy writes a segment -> its tool calls run through the episode (concurrently with the
other episodes' decoding; malformed calls get invalid-call observations) -> the outputs extend the same assistant
turn -> ... until a segment calls no tool (its content is the submission), the turn limit, or the context. The
verdict (a verifier in the sandbox) is reached on a tool worker too, while the other episodes generate. Episodes of
one environment share sandboxed runs, up to `sandbox_batch` a run: the tool calls of one poll (`step_many`), and the
verdicts once the environment's episodes have all finished (`submit_many`); outputs and verdicts are those of running
each episode alone.

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
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait, FIRST_COMPLETED
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from dsaforge.rollout.policy import Policy, Turn, Window
from dsaforge.synth.episode import step_many, submit_many

STRATEGIES = ("discard_all", "discard_75", "reprefill", "none")


@dataclass(frozen=True)
class RolloutConfig:
    max_turns: int = 20                   # segments that call tools, per episode
    context: str = "discard_all"          # what to do when the window fills (STRATEGIES)
    context_budget: float = 0.8           # fraction of the policy's context that triggers the strategy
    max_resets: int = 4                   # context resets per episode before it ends
    tool_workers: int = 8                 # tool calls running at once (sandbox processes)
    sandbox_batch: int = 16               # episodes of one environment served by one sandboxed run (the tool
                                          # calls of one engine step; the verdicts of finished episodes)

    def __post_init__(self):
        if self.context not in STRATEGIES:
            raise ValueError(f"context must be one of {STRATEGIES}, got {self.context!r}")
        if not 0 < self.context_budget <= 1:
            raise ValueError(f"context_budget must be in (0, 1], got {self.context_budget}")
        if self.max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {self.max_turns}")
        if self.sandbox_batch < 1:
            raise ValueError(f"sandbox_batch must be >= 1, got {self.sandbox_batch}")


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

    # Scoring: a finished episode's submission waits for the other running episodes of its scoring group (a GRPO
    # group's samples of one prompt, an evaluation's prompts from one environment), then the group is verified in
    # one sandboxed run on a tool worker while the rest generate. Episodes without a group are scored alone.
    group_of = [getattr(ep, "scoring_group", ("alone", i)) for i, ep in enumerate(episodes)]
    unfinished = Counter(group_of)
    unscored: dict[tuple, list[tuple[int, _Live, Any]]] = {}
    scoring: dict[Future, list[tuple[int, Trajectory]]] = {}
    closing: list[Future] = []

    def alone(ep, sub):
        try:
            return ep.submit(sub)
        except Exception as e:
            return e

    def score(batch: list[tuple[int, _Live, Any]]) -> None:
        """Verdicts for a batch of finished episodes (on a tool worker: the verifier runs in the sandbox). Trouble
        scoring an episode is its outcome (detail "scoring failed: ..."), not the batch's end nor its siblings'."""
        todo = [(lv, sub) for _, lv, sub in batch if not isinstance(sub, Exception)]
        verdicts = [alone(todo[0][0].ep, todo[0][1])] if len(todo) == 1 else []
        if len(todo) > 1:
            try:
                verdicts = submit_many([lv.ep for lv, _ in todo], [sub for _, sub in todo])
            except Exception:
                verdicts = [alone(lv.ep, sub) for lv, sub in todo]
        results = iter(verdicts)
        for _, lv, sub in batch:
            v = sub if isinstance(sub, Exception) else next(results)
            if isinstance(v, Exception):
                lv.traj.detail = f"scoring failed: {type(v).__name__}: {v}"[:500]
            else:
                lv.traj.passed, lv.traj.reward, lv.traj.detail = v.passed, v.score, v.detail
            lv.traj.wall_s = time.monotonic() - lv.t0

    def dispatch(group: tuple) -> None:
        batch = unscored.pop(group)
        scoring[tools.submit(score, batch)] = [(key, lv.traj) for key, lv, _ in batch]

    def finish(key: int, reason: str, submission_text: Optional[str]) -> None:
        lv = live.pop(key)
        if lv.open:
            lv.traj.windows.append(policy.end(key))
        lv.traj.finish_reason = reason
        try:
            sub = lv.ep.submission_from_text(submission_text) if submission_text else None
        except Exception as e:
            sub = e
        closing.append(tools.submit(lv.ep.close))       # its tools are done; scoring needs no live process
        group = group_of[key]
        unscored.setdefault(group, []).append((key, lv, sub))
        unfinished[group] -= 1
        if unfinished[group] == 0 or len(unscored[group]) >= cfg.sandbox_batch:
            dispatch(group)

    def scored(block: bool) -> None:
        """Trajectories whose verdicts are in (all of them when block), into out and on_done."""
        done = wait(scoring)[0] if block else [f for f in scoring if f.done()]
        for f in done:
            f.result()
            for key, traj in scoring.pop(f):
                out[key] = traj
                if on_done:
                    on_done(out[key])

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

        def run_calls_many(eps, calls, futures) -> None:
            """Several episodes' calls, one sandboxed run per round for those of one tool group (`step_many`)."""
            try:
                obs = step_many(eps, calls)
            except Exception as e:   # as run_calls: the infrastructure's failure is each call's observation
                err = json.dumps({"error": f"the tool failed: {type(e).__name__}: {str(e)[:300]}"})
                obs = [[err] * len(c) for c in calls]
            for f, o in zip(futures, obs):
                f.set_result([{"role": "tool", "content": x} for x in o])

        def start_calls(batch: list[tuple[int, list]]) -> None:
            if len(batch) == 1:
                key, calls = batch[0]
                live[key].pending = tools.submit(run_calls, live[key].ep, calls)
                return
            futures = [Future() for _ in batch]
            for (key, _), f in zip(batch, futures):
                live[key].pending = f
            tools.submit(run_calls_many, [live[k].ep for k, _ in batch], [c for _, c in batch], futures)

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
            calling: dict[tuple, list[tuple[int, list]]] = {}     # this poll's tool calls by tool group
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
                    group = getattr(lv.ep, "tool_group", None) or ("alone", key)
                    calling.setdefault(group, []).append((key, calls))
                    if len(calling[group]) >= cfg.sandbox_batch:
                        start_calls(calling.pop(group))
            for batch in calling.values():
                start_calls(batch)
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
            scored(block=False)
        scored(block=True)
        for f in closing:
            f.result()
    return out   # type: ignore[return-value]


def _generating(live: dict[int, _Live]) -> bool:
    return any(lv.pending is None for lv in live.values())

