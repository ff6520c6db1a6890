"""GRPO's rollouts: multi-turn agent episodes through `dsaforge.rollout` (the one episode runner), recorded for the
trainer.

    rollout = Rollout(engine, chat, cfg.rl, cfg.synth.sandbox)
    episodes = rollout(tasks, group_size=8, greedy=False, seed=s)   # [EpisodeRecord], G per task, in task order

`dsaforge.rollout.run_episodes` drives every episode through the episode interface (`dsaforge.synth.episode`):
`reset()` gives the messages, the policy's segments are parsed with the chat template, tool calls run in the
sandbox through `step`, the final reply is scored by the task's own verifier through `submit`. The engine policy
keeps each sequence's cache between segments and records the sampled tokens' log-probs, kept sets and routes per
context window; GRPO trains on an episode's last window (the whole episode unless the context was reset).

Each episode samples from its own key, seed_of(seed, task id, sample index): its tokens depend on its own
transcript, not on which episodes share the engine's steps or when the sandbox returned their tool outputs. The
same call on the same weights repeats exactly (an evaluation is repeatable, and before/after evaluations with one
seed compare the models on common random numbers), and an episode samples alike on whichever rank holds it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dsaforge.model.rl.batch import EpisodeRecord


class Rollout:
    def __init__(self, engine, chat, rl, sandbox, workers: int = 8):
        from dsaforge.model.sampling import SamplingParams
        from dsaforge.rollout import RolloutConfig

        self.engine, self.chat, self.rl, self.sandbox = engine, chat, rl, sandbox
        params = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                                max_new_tokens=rl.max_new_tokens)
        self.params = {False: params, True: replace(params, temperature=0.0)}
        self.cfg = RolloutConfig(max_turns=rl.max_turns, tool_workers=workers)

    def __call__(self, tasks: list, group_size: int, greedy: bool = False, seed: int = 0) -> list[EpisodeRecord]:
        from dsaforge.model.sampling import seed_of
        from dsaforge.rollout import EnginePolicy, run_episodes
        from dsaforge.synth.episode import make_episode

        groups = [(g, i) for g in range(len(tasks)) for i in range(group_size)]
        episodes = [make_episode(tasks[g], self.sandbox) for g, _ in groups]
        policy = EnginePolicy(self.engine, self.chat, self.params[greedy],
                              [seed_of(seed, tasks[g].task_id, i) for g, i in groups])
        trajectories = run_episodes(policy, episodes, self.cfg) if episodes else []
        return [replace(record(t, g), sample=i) for t, (g, i) in zip(trajectories, groups)]

    def close(self) -> None:
        pass


def record(traj, group: int) -> EpisodeRecord:
    """An EpisodeRecord of a `dsaforge.rollout.Trajectory`'s last context window."""
    calls = sum(len(m.get("tool_calls") or []) for m in traj.full_messages if m["role"] == "assistant")
    rec = EpisodeRecord(traj.task_id, traj.agent_class, group, [], [], [], score=float(traj.reward),
                        passed=bool(traj.passed), well_formed=traj.invalid_calls == 0 and traj.finish_reason == "answered",
                        tool_calls=calls, turns=traj.turns, finish=traj.finish_reason, messages=traj.full_messages)
    if traj.windows:
        w = traj.windows[-1]
        rec.tokens, rec.sampled, rec.logprobs = list(w.tokens), [bool(m) for m in w.mask], list(w.logprobs)
        if w.routing is not None and len(w.routing):
            rec.routing = np.ascontiguousarray(np.asarray(w.routing).transpose(1, 0, 2))      # [n_moe, L-1, k]
        if w.kept is not None:
            rec.kept = [[] if k is None else np.asarray(k).tolist() for k, m in zip(w.kept, w.mask) if m]
    return rec
