"""The GRPO driver: generate -> reward -> advantage -> train -> sync weights -> evaluate, one loop over named steps.

    grpo = GRPO(cfg, state, reference, rollout, train_tasks, heldout_tasks, out_dir, tracker)
    summary = grpo.fit()

`state` is the policy's `TrainState` (model, layout, optimizer, checkpoints), `reference` the frozen reference
model (None when every beta is 0), `rollout(tasks, group_size, greedy, seed) -> [EpisodeRecord]` runs episodes on the
policy's weights through the episode interface and scores them with the tasks' verifiers (`dsaforge.model.rl.stage`
builds it over the rollout engine). Each phase is timed; metrics go to MLflow under `rl/`, every step's episodes to
rollouts/step-XXXXXX.parquet.

Under torchrun (data parallel) every rank runs this same loop on its share of the work: a contiguous share of the
step's prompts with all G samples of each (whole groups, so advantages stay where their episodes are), its own
episodes' gradients (normalised by the step's sequence and token counts summed over the ranks, so the reduced
gradient is the one-process gradient of all the episodes), and a share of the held-out prompts. Rank 0 writes the
rollouts and logs metrics computed over every rank's episodes.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dsaforge.model.rl.batch import EpisodeRecord, collate, write_rollouts
from dsaforge.model.rl.grpo import LossConfig, group_advantages, grpo_loss
from dsaforge.model.rl.policy import token_logprobs
from dsaforge.model.rl.reward import load_reward_functions, reward_terms
from dsaforge.model.sampling import seed_of
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
        with Progress("grpo", total=self.rl.steps - self.step, unit="step",
                      stream=None if self.state.is_main else open(os.devnull, "w")) as bar:
            while self.step < self.rl.steps:
                self.times = {}
                with self.phase("generate"):
                    episodes = self.generate()
                with self.phase("reward"):
                    rewards = self.rewards(episodes)
                with self.phase("advantage"):
                    self.advantages(episodes, rewards)
                with self.phase("train"):
                    stats = self.train(episodes)
                with self.phase("sync"):
                    self.sync()
                self.step += 1
                if self.step % self.rl.eval_every == 0 or self.step == self.rl.steps:
                    with self.phase("evaluate"):
                        stats.update(self.evaluate())
                everyone = self.save_rollouts(episodes)
                metrics = {**episode_metrics(everyone, self.rl.group_size), **stats, **self.times}
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

    def generate(self) -> list[EpisodeRecord]:
        """G episodes of each of this rank's prompts (all of them on one process), groups numbered over the step."""
        first, mine = share(self.prompts(self.step), *self.state.dp)
        episodes = self.rollout(mine, self.rl.group_size, greedy=False,
                                seed=seed_of(self.rl.seed, "generate", self.step))
        for e in episodes:
            e.group += first
        return episodes

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
        """rl.epochs passes over the episodes, each of rl.updates_per_step optimizer steps over mini-batches, each
        accumulated over micro-batches.
        Episodes whose group had all-equal rewards carry zero advantage and no KL if beta is 0: they are skipped.
        Each rank backpropagates its own episodes of a mini-batch, normalised by the mini-batch's sequence and token
        counts over all ranks; megatron's DDP averages the ranks' gradients, so the loss is scaled by the DP size
        to make the reduced gradient the sum over all episodes, as on one process."""
        rl, st, model = self.rl, self.state, self.state.model
        live = [e for e in episodes if e.response_tokens and (e.advantage != 0 or self.kl_coef(e.agent_class) > 0)]
        minis = self.minibatches(live)
        counts = st.reduce_over_dp(torch.tensor([[len(m), sum(e.response_tokens for e in m)] for m in minis],
                                                device=st.device)).tolist()
        dp, stats = st.dp[1], UpdateStats()
        lr = lr_at(self.step, rl.lr, rl.warmup_steps, rl.steps, rl.min_lr_ratio)
        diag = {}
        updates = [(mini, c) for _ in range(rl.epochs) for mini, c in zip(minis, counts)]
        for j, (mini, (n_seqs, n_tokens)) in enumerate(updates):
            if j == len(updates) - 1:       # the stabilisers' effect where it shows: after this step's other updates
                diag = self.diagnose(mini)
            model.train()
            if not n_seqs:                  # empty on every rank
                continue
            st.optimizer.zero_grad(set_to_none=True)
            for i in range(0, len(mini), rl.micro_batch_size):
                micro = mini[i:i + rl.micro_batch_size]
                b = collate(micro, self.pad_id, self.cfg.model.vocab_size, [self.kl_coef(e.agent_class) for e in micro],
                            rl.keep_routing, rl.keep_sampling_mask, self.cfg.model.n_activated_experts)
                b = _to(b, st.device)
                with st.autocast_context():
                    logp, entropy, mask = token_logprobs(model, b.tokens, b.sampled, rl.mode, b.routing, b.keep,
                                                         rl.temperature, b.lengths)
                    ref = None
                    if self.reference is not None and bool((b.kl_coef > 0).any()):
                        with torch.no_grad():
                            ref = token_logprobs(self.reference, b.tokens, b.sampled, rl.mode, None, b.keep,
                                                 rl.temperature)[0]
                loss, terms = grpo_loss(logp, b.old_logp, b.advantages, mask, self.loss_cfg, ref, b.kl_coef,
                                        n_seqs=n_seqs, n_tokens=n_tokens)
                if not torch.isfinite(loss):
                    self._diverged("loss", loss)
                (loss * dp).backward()
                stats.add(terms, entropy, mask)
            stats.grad_norms.append(float(st.optimizer_step(lr, self._diverged)))
        return {**diag, **stats.reduce(st), "rl/lr": lr}

    def minibatches(self, live: list[EpisodeRecord]) -> list[list[EpisodeRecord]]:
        """rl.updates_per_step mini-batches of this rank's live episodes, by one shuffle of the whole step's episodes
        (seed, step): an episode lands in the same mini-batch and place whichever rank holds it."""
        g, n = self.rl.group_size, self.rl.updates_per_step
        total = len(self.prompts(self.step)) * g
        order = random.Random(f"{self.rl.seed}-order-{self.step}").sample(range(total), total)
        place = {index: p for p, index in enumerate(order)}
        minis: list[list[EpisodeRecord]] = [[] for _ in range(n)]
        for e in sorted(live, key=lambda e: place[e.group * g + e.sample]):
            minis[place[e.group * g + e.sample] % n].append(e)
        return minis

    @torch.no_grad()
    def diagnose(self, mini: list[EpisodeRecord]) -> dict[str, float]:
        """rl.diagnostics: on one micro-batch per rank of the step's last mini-batch, just before its update (so after
        the step's other rl.updates_per_step x rl.epochs - 1 updates have moved the weights and routers away from
        what sampled it), what each stabiliser changes - the mean |trainer - engine| log-prob with and without Keep Routing, the
        mean importance ratio with and without Keep Sampling Mask. Both sides see the same weights and episodes, so
        their difference is the stabiliser's. Every rank calls it (it reduces over DP), with or without episodes."""
        rl, st = self.rl, self.state
        if not rl.diagnostics:
            return {}
        variants = ("on", "routing_off", "mask_off")
        sums = torch.zeros(2 * len(variants) + 1, dtype=torch.float64, device=st.device)
        micro = [e for e in mini if e.response_tokens][:rl.micro_batch_size]
        if micro:
            b = _to(collate(micro, self.pad_id, self.cfg.model.vocab_size, [0.0] * len(micro), True, True,
                            self.cfg.model.n_activated_experts), st.device)
            st.model.eval()
            with st.autocast_context():
                for i, (routing, keep) in enumerate([(b.routing, b.keep), (None, b.keep), (b.routing, None)]):
                    logp, _, mask = token_logprobs(st.model, b.tokens, b.sampled, rl.mode, routing, keep,
                                                   rl.temperature)
                    diff = (logp - b.old_logp)[mask].double()
                    sums[2 * i], sums[2 * i + 1] = diff.abs().sum(), diff.exp().sum()
            sums[-1] = mask.sum()
        sums = st.reduce_over_dp(sums).tolist()
        if not sums[-1]:
            return {}
        out = {}
        for i, name in enumerate(variants):
            out[f"rl/diag/logp_gap/{name}"] = sums[2 * i] / sums[-1]
            out[f"rl/diag/ratio_mean/{name}"] = sums[2 * i + 1] / sums[-1]
        return out

    def sync(self) -> None:
        """Hand the updated weights to the rollout engine (in-process it shares the model: only its caches and any
        captured graphs are refreshed)."""
        if self.sync_fn is not None:
            self.sync_fn(self.state.model)

    def evaluate(self) -> dict[str, float]:
        """Held-out pass rate, overall and per agent class, with its standard error: one episode per prompt, greedy
        (rl.eval_sampled off) or sampled as in training; each rank runs its share of the prompts."""
        _, mine = share(self.heldout[:self.rl.eval_prompts], *self.state.dp)
        return heldout_metrics(self.gather(self.rollout(mine, 1, greedy=not self.rl.eval_sampled,
                                                        seed=seed_of(self.rl.seed, "evaluate"))))

    def save_rollouts(self, episodes: list[EpisodeRecord]) -> list[EpisodeRecord]:
        """Every rank's episodes of this step (`gather`); rank 0 writes them to rollouts/step-XXXXXX.parquet."""
        everyone = self.gather(episodes)
        if self.state.is_main:
            write_rollouts(everyone, self.step, self.out_dir / "rollouts" / f"step-{self.step:06d}.parquet")
        return everyone

    def gather(self, episodes: list[EpisodeRecord]) -> list[EpisodeRecord]:
        """Every rank's episodes in rank order (so groups in order): whole on rank 0, which writes the rollouts;
        elsewhere without their token lists and transcripts (the metrics need only the scalars)."""
        if self.state.dp[1] == 1:
            return episodes
        light = [replace(e, tokens=[], sampled=[], logprobs=[], messages=[], routing=None, kept=None)
                 for e in episodes]
        everyone = [e for part in self.state.gather_over_dp(light) for e in part]
        whole = self.state.gather_over_dp([replace(e, routing=None, kept=None) for e in episodes], everywhere=False)
        return [e for part in whole for e in part] if whole is not None else everyone

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
    return replace(b, tokens=b.tokens.to(device), sampled=b.sampled.to(device), old_logp=b.old_logp.to(device),
                   advantages=b.advantages.to(device), kl_coef=b.kl_coef.to(device),
                   routing=None if b.routing is None else [r.to(device) for r in b.routing],
                   keep=None if b.keep is None else b.keep.to(device), lengths=b.lengths.to(device))


def share(items: list, rank: int, size: int) -> tuple[int, list]:
    """(index of the first, this rank's contiguous share of `items`); shares differ in length by at most one."""
    n, extra = divmod(len(items), size)
    first = rank * n + min(rank, extra)
    return first, items[first:first + n + (rank < extra)]


class UpdateStats:
    """The train phase's statistics, summed over micro-batches and ranks: token-weighted means (ratio, clip fraction,
    KL, entropy, the engine-trainer gap of the first update), the sequence-weighted OPSM fraction, the ratio's min
    and max, and the loss terms per update (normalised by the mini-batch's counts over all ranks, so they add up)."""
    KEYS = ("policy_loss", "kl_loss", "ratio", "clipped", "kl", "kl_tokens", "entropy", "tokens", "opsm", "seqs",
            "gap", "gap_tokens")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.low, self.high = float("inf"), float("-inf")
        self.grad_norms: list[float] = []

    def add(self, terms: dict[str, torch.Tensor], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        s, n, b = self.sums, float(mask.sum()), mask.shape[0]
        s["policy_loss"] += float(terms["policy_loss"])
        s["ratio"] += float(terms["ratio_mean"]) * n
        s["clipped"] += float(terms["clip_fraction"]) * n
        s["entropy"] += float((entropy * mask).sum())
        s["tokens"] += n
        s["opsm"] += float(terms["opsm_fraction"]) * b
        s["seqs"] += b
        if "kl" in terms:
            s["kl_loss"] += float(terms["kl_loss"])
            s["kl"] += float(terms["kl"]) * n
            s["kl_tokens"] += n
        if not self.grad_norms:         # before any update of this step: the engine's pi_old vs the recompute
            s["gap"] += float(terms["logp_gap"]) * n
            s["gap_tokens"] += n
        if n:
            self.low, self.high = min(self.low, float(terms["ratio_min"])), max(self.high, float(terms["ratio_max"]))

    def reduce(self, state) -> dict[str, float]:
        sums = state.reduce_over_dp(torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64,
                                                 device=state.device))
        low = state.reduce_over_dp(torch.tensor([self.low], dtype=torch.float64, device=state.device), "min")
        high = state.reduce_over_dp(torch.tensor([self.high], dtype=torch.float64, device=state.device), "max")
        s = dict(zip(self.KEYS, sums.tolist()))
        if not s["tokens"]:
            return {}
        updates = len(self.grad_norms)
        out = {"rl/policy_loss": s["policy_loss"] / updates, "rl/ratio_mean": s["ratio"] / s["tokens"],
               "rl/ratio_min": float(low), "rl/ratio_max": float(high), "rl/clip_fraction": s["clipped"] / s["tokens"],
               "rl/opsm_fraction": s["opsm"] / s["seqs"], "rl/entropy": s["entropy"] / s["tokens"],
               "rl/engine_trainer_logp_gap": s["gap"] / max(s["gap_tokens"], 1),
               "rl/grad_norm": float(np.mean(self.grad_norms))}
        if s["kl_tokens"]:
            out["rl/kl"], out["rl/kl_loss"] = s["kl"] / s["kl_tokens"], s["kl_loss"] / updates
        return out


def episode_metrics(episodes: list[EpisodeRecord], group_size: int) -> dict[str, float]:
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
    out = {"rl/reward_mean": float(rewards.mean()), "rl/reward_std": float(rewards.std()),
           "rl/pass_rate": float(np.mean([e.passed for e in episodes])),
           "rl/response_tokens": float(np.mean([e.response_tokens for e in episodes])),
           "rl/tool_calls_per_episode": float(np.mean([e.tool_calls for e in episodes])),
           "rl/well_formed": float(np.mean([e.well_formed for e in episodes]))}
    groups = rewards.view(-1, group_size)
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
