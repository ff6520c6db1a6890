"""The GRPO driver: generate -> reward -> advantage -> train -> sync weights -> evaluate, one loop over named steps.

    grpo = GRPO(cfg, state, reference, rollout, train_tasks, heldout_tasks, out_dir, tracker)
    summary = grpo.fit()

`state` is the policy's `TrainState` (model, layout, optimizer, checkpoints), `reference` the frozen reference
model (None when every beta is 0), `rollout(tasks, group_size, greedy) -> [EpisodeRecord]` runs episodes on the
policy's weights through the episode interface and scores them with the tasks' verifiers (`dsaforge.model.rl.stage`
builds it over the rollout engine). Each phase is timed; metrics go to MLflow under `rl/`, every step's episodes to
rollouts/step-XXXXXX.parquet.
"""
from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dsaforge.model.rl.batch import EpisodeRecord, collate, write_rollouts
from dsaforge.model.rl.grpo import LossConfig, group_advantages, grpo_loss
from dsaforge.model.rl.policy import token_logprobs
from dsaforge.model.rl.reward import load_reward_functions, reward_terms
from dsaforge.model.train.trainer import NonFiniteLoss, lr_at
from dsaforge.progress import Progress


class GRPO:
    def __init__(self, cfg, state, reference, rollout: Callable, tasks: list, heldout: list, out_dir: Path,
                 tracker, pad_id: int, sync: Optional[Callable] = None):
        self.cfg, self.rl, self.state, self.reference = cfg, cfg.rl, state, reference
        self.rollout, self.tasks, self.heldout, self.sync_fn = rollout, tasks, heldout, sync
        self.out_dir, self.tracker, self.pad_id = Path(out_dir), tracker, pad_id
        self.custom = load_reward_functions(self.rl.reward.custom)
        self.loss_cfg = LossConfig(self.rl.clip_eps_low, self.rl.clip_eps_high, self.rl.aggregation,
                                   self.rl.unbiased_kl, self.rl.opsm, self.rl.opsm_delta, self.rl.max_new_tokens)
        self.step, self.history = 0, {}
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"rl/time/{name}_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ the algorithm

    def fit(self) -> dict:
        self.history["start"] = metrics = self.evaluate()
        self.log(metrics)
        with Progress("grpo", total=self.rl.steps - self.step, unit="step") as bar:
            while self.step < self.rl.steps:
                self.times = {}
                with self.phase("generate"):
                    episodes = self.rollout(self.prompts(self.step), self.rl.group_size, greedy=False)
                with self.phase("reward"):
                    rewards = self.rewards(episodes)
                with self.phase("advantage"):
                    self.advantages(episodes, rewards)
                with self.phase("train"):
                    stats = {**self.diagnose(episodes), **self.train(episodes)}
                with self.phase("sync"):
                    self.sync()
                self.step += 1
                if self.step % self.rl.eval_every == 0 or self.step == self.rl.steps:
                    with self.phase("evaluate"):
                        stats.update(self.evaluate())
                write_rollouts(episodes, self.step, self.out_dir / "rollouts" / f"step-{self.step:06d}.parquet")
                metrics = {**episode_metrics(episodes, rewards), **stats, **self.times}
                self.log(metrics)
                bar.update(1, reward=metrics["rl/reward_mean"], passed=metrics["rl/pass_rate"])
                if self.step % self.rl.save_every == 0 or self.step == self.rl.steps:
                    self.state.save(self.out_dir / "checkpoints", self.step, {"step": self.step}, keep_last=2)
        self.history["end"] = {k: v for k, v in metrics.items() if k.startswith("heldout/")}
        return self.history

    # ------------------------------------------------------------------ the named steps

    def prompts(self, step: int) -> list:
        """This step's prompts: a deterministic function of (seed, step), so a resumed run draws the same ones."""
        return random.Random(f"{self.rl.seed}-{step}").sample(self.tasks, min(self.rl.prompts_per_step, len(self.tasks)))

    def rewards(self, episodes: list[EpisodeRecord]) -> torch.Tensor:
        budget = self.rl.max_new_tokens
        for e in episodes:
            e.reward = sum(reward_terms(e, self.rl.reward, budget, self.custom).values())
        return torch.tensor([e.reward for e in episodes], dtype=torch.float64)

    def advantages(self, episodes: list[EpisodeRecord], rewards: torch.Tensor) -> None:
        adv = group_advantages(rewards.view(-1, self.rl.group_size), self.rl.std_normalize).flatten()
        for e, a in zip(episodes, adv.tolist()):
            e.advantage = a

    def kl_coef(self, agent_class: str) -> float:
        return self.rl.kl_coef_by_class.get(agent_class, self.rl.kl_coef)

    def train(self, episodes: list[EpisodeRecord]) -> dict[str, float]:
        """rl.updates_per_step optimizer steps over mini-batches of the episodes, each accumulated over micro-batches.
        Episodes whose group had all-equal rewards carry zero advantage and no KL if beta is 0: they are skipped."""
        rl, st, model = self.rl, self.state, self.state.model
        live = [e for e in episodes if e.response_tokens and (e.advantage != 0 or self.kl_coef(e.agent_class) > 0)]
        random.Random(f"{rl.seed}-order-{self.step}").shuffle(live)
        minis = [live[i::rl.updates_per_step] for i in range(rl.updates_per_step)]
        sums: dict[str, list] = defaultdict(list)
        lr = lr_at(self.step, rl.lr, 0, rl.steps, rl.min_lr_ratio)
        model.train()
        for u, mini in enumerate(m for m in minis if m):
            st.optimizer.zero_grad(set_to_none=True)
            n_tokens = sum(e.response_tokens for e in mini)
            for i in range(0, len(mini), rl.micro_batch_size):
                micro = mini[i:i + rl.micro_batch_size]
                b = collate(micro, self.pad_id, self.cfg.model.vocab_size, [self.kl_coef(e.agent_class) for e in micro],
                            rl.keep_routing, rl.keep_sampling_mask, self.cfg.model.n_activated_experts)
                b = _to(b, st.device)
                with st.autocast_context():
                    logp, entropy, mask = token_logprobs(model, b.tokens, b.sampled, rl.mode, b.routing, b.keep,
                                                         rl.temperature)
                    ref = None
                    if self.reference is not None and bool((b.kl_coef > 0).any()):
                        with torch.no_grad():
                            ref = token_logprobs(self.reference, b.tokens, b.sampled, rl.mode, None, b.keep,
                                                 rl.temperature)[0]
                loss, stats = grpo_loss(logp, b.old_logp, b.advantages, mask, self.loss_cfg, ref, b.kl_coef,
                                        n_seqs=len(mini), n_tokens=n_tokens)
                if not torch.isfinite(loss):
                    self._diverged("loss", loss)
                loss.backward()
                stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
                for k, v in stats.items():
                    # the gap before any update of this step: the engine's pi_old against the trainer's recompute
                    if k != "logp_gap" or u == 0:
                        sums[k].append(float(v))
            sums["grad_norm"].append(float(st.optimizer_step(lr, self._diverged)))
        out = {f"rl/{k}": float(np.mean(v)) for k, v in sums.items()}
        if sums:
            out["rl/ratio_min"], out["rl/ratio_max"] = min(sums["ratio_min"]), max(sums["ratio_max"])
            out["rl/engine_trainer_logp_gap"] = out.pop("rl/logp_gap")
        out["rl/lr"] = lr
        return out

    @torch.no_grad()
    def diagnose(self, episodes: list[EpisodeRecord]) -> dict[str, float]:
        """rl.diagnostics: on one micro-batch, before this step's update, what each stabiliser changes - the mean
        |trainer - engine| log-prob with and without Keep Routing, the mean importance ratio with and without Keep
        Sampling Mask. Both sides see the same weights and episodes, so their difference is the stabiliser's."""
        rl, st = self.rl, self.state
        if not rl.diagnostics:
            return {}
        micro = [e for e in episodes if e.response_tokens][:rl.micro_batch_size]
        if not micro:
            return {}
        b = _to(collate(micro, self.pad_id, self.cfg.model.vocab_size, [0.0] * len(micro), True, True,
                        self.cfg.model.n_activated_experts), st.device)
        out = {}
        st.model.eval()
        with st.autocast_context():
            for name, routing, keep in [("on", b.routing, b.keep), ("routing_off", None, b.keep),
                                        ("mask_off", b.routing, None)]:
                logp, _, mask = token_logprobs(st.model, b.tokens, b.sampled, rl.mode, routing, keep, rl.temperature)
                diff = (logp - b.old_logp)[mask]
                out[f"rl/diag/logp_gap/{name}"] = float(diff.abs().mean())
                out[f"rl/diag/ratio_mean/{name}"] = float(diff.exp().mean())
        return out

    def sync(self) -> None:
        """Hand the updated weights to the rollout engine (in-process it shares the model: only its caches and any
        captured graphs are refreshed)."""
        if self.sync_fn is not None:
            self.sync_fn(self.state.model)

    def evaluate(self) -> dict[str, float]:
        """Held-out pass rate, overall and per agent class, with its standard error: one episode per prompt, greedy
        (rl.eval_sampled off) or sampled as in training."""
        episodes = self.rollout(self.heldout[:self.rl.eval_prompts], 1, greedy=not self.rl.eval_sampled)
        return heldout_metrics(episodes)

    # ------------------------------------------------------------------ bookkeeping

    def _diverged(self, what: str, value: torch.Tensor) -> None:
        raise NonFiniteLoss(f"grpo: non-finite {what} ({float(value.detach())}) at step {self.step + 1}; stopping. "
                            "Lower rl.lr or raise rl.grad_clip and resume from the last checkpoint.")

    def log(self, metrics: dict[str, float]) -> None:
        if not self.state.is_main:
            return
        self.tracker.log_metrics(metrics, step=self.step)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")


def _to(b, device):
    from dataclasses import replace
    return replace(b, tokens=b.tokens.to(device), sampled=b.sampled.to(device), old_logp=b.old_logp.to(device),
                   advantages=b.advantages.to(device), kl_coef=b.kl_coef.to(device),
                   routing=None if b.routing is None else [r.to(device) for r in b.routing],
                   keep=None if b.keep is None else b.keep.to(device))


def episode_metrics(episodes: list[EpisodeRecord], rewards: torch.Tensor) -> dict[str, float]:
    out = {"rl/reward_mean": float(rewards.mean()), "rl/reward_std": float(rewards.std()),
           "rl/pass_rate": float(np.mean([e.passed for e in episodes])),
           "rl/response_tokens": float(np.mean([e.response_tokens for e in episodes])),
           "rl/tool_calls_per_episode": float(np.mean([e.tool_calls for e in episodes])),
           "rl/well_formed": float(np.mean([e.well_formed for e in episodes]))}
    groups = rewards.view(-1, len(episodes) // len({e.group for e in episodes}))
    out["rl/zero_std_groups"] = float((groups.std(dim=1) == 0).float().mean())
    for cls in sorted({e.agent_class for e in episodes}):
        out[f"rl/pass_rate/{cls}"] = float(np.mean([e.passed for e in episodes if e.agent_class == cls]))
    return out


def heldout_metrics(episodes: list[EpisodeRecord]) -> dict[str, float]:
    passed = np.array([e.passed for e in episodes], dtype=np.float64)
    out = {"heldout/pass_rate": float(passed.mean()), "heldout/n": float(len(passed)),
           "heldout/pass_rate_se": float(passed.std(ddof=1) / np.sqrt(len(passed))) if len(passed) > 1 else 0.0,
           "heldout/response_tokens": float(np.mean([e.response_tokens for e in episodes]))}
    for cls in sorted({e.agent_class for e in episodes}):
        out[f"heldout/pass_rate/{cls}"] = float(np.mean([e.passed for e in episodes if e.agent_class == cls]))
    return out
