"""The training loop shared by the three stages of DeepSeek-V3.2's recipe (paper §2.1), and supervised fine-tuning.

    pretrain  mode "dense":  dense MLA+MoE language model, LM loss, the indexer idle
    warmup    mode "warmup": dense attention, only the indexer trains, on its KL to the head-summed attention
    sparse    mode "sparse": top-k attention, everything trains, LM loss + KL over the selected keys (the
                             indexer's inputs are detached inside MLA, so each loss reaches only its own parameters)
    sft       mode "sparse": as sparse, on rendered conversations scored on the assistant's tokens only

One process is one device; under torchrun the megatron bridge shards the same model over TP/EP/PP, and megatron's
DDP and distributed optimizer reduce the gradients over DP and step (pp > 1: megatron's pipeline schedule runs the
micro-batches).
Exact resume: the batch, learning rate and RNG of step i depend only on i and the checkpoint, so a run killed at any
point and resumed from its last checkpoint retraces the uninterrupted run.
"""
from __future__ import annotations

import json
import math
import operator
import os
import signal
import time
from functools import reduce
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from dsaforge.config import Config
from dsaforge.model import Transformer
from dsaforge.model.transformer import check_token_ids
from dsaforge.model.accounting import flops_per_token
from dsaforge.model.train import checkpoint as ckpt
from dsaforge.model.train import seam
from dsaforge.model.train.data import IGNORE, Batch, StepSampler, TokenRows, micro_batches, unigram_entropy
from dsaforge.model.train.metrics import indexer_recall, memory_gib, peak_flops, topk_recall
from dsaforge.model.train.state import TrainState, export, resolve_device  # noqa: F401  (export: re-exported)
from dsaforge.outputs import write_atomic
from dsaforge.progress import Progress
from dsaforge.tracking import NullTracker, Tracker

# sft trains the DSA model as the sparse stage left it: top-k attention, all parameters, LM loss (on the assistant's
# tokens only) + the indexer's KL on the selected set, so the indexer follows the attention as it moves (with
# rl.mode = "dense", dense attention and a frozen indexer instead).
STAGE_MODE = {"pretrain": "dense", "warmup": "warmup", "sparse": "sparse", "sft": "sparse"}


class NonFiniteLoss(RuntimeError):
    """Raised when a loss or gradient norm is NaN/Inf; the last complete checkpoint is left untouched."""


class Preempted(SystemExit):
    """SIGTERM arrived: a checkpoint of the last finished step was written; exit status 143 asks for a retry."""

    def __init__(self, step: int, path: Path):
        super().__init__(143)
        self.step, self.path = step, path


def lr_at(step: int, peak: float, warmup_steps: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `min_ratio * peak` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps - 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored targets (IGNORE marks the others), from full logits."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


PROBE_BYTES = 8 * 2**30    # one [n, H, n] fp32 tensor of the recall probe (it holds about three at once)


def recall_probe_len(seq_len: int, top_k: int, n_heads: int) -> int:
    """Positions of the recall probe's dense forward: max(4k, 1024), fewer where one sequence's [n, H, n] fp32
    attention probabilities would pass PROBE_BYTES (128 heads: 4096), never fewer than 2k (rows must see more
    than k keys to count); at most the sequence."""
    cap = int((PROBE_BYTES / (4 * n_heads)) ** 0.5)
    return min(seq_len, max(2 * top_k, min(max(4 * top_k, 1024), cap)))


def forward_lm(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mode: str,
               segment_ids: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None):
    """(ModelOutput, mean LM loss) without ever holding the [S, vocab] logits: the output head is applied a chunk
    of positions at a time (`Transformer.lm_loss_chunked`). valid: False on padding (not counted in the experts'
    load). Call under the step's autocast, as the head's matmul belongs to the forward."""
    out = model(inputs, mode=mode, segment_ids=segment_ids, return_hidden=True, valid=valid)
    return out, model.lm_loss_chunked(out.hidden, targets, ignore_index=IGNORE)


class Trainer:
    """Build the model, data and optimizer for one stage; `fit()` runs it to the end (or resumes it)."""

    def __init__(self, cfg: Config, stage: str, data_dir: Path, out_dir: Path, init_from: Optional[Path] = None,
                 tracker: Optional[Tracker] = None, doc_mask: bool = False, rows: Optional[tuple] = None):
        """rows: (train, validation) row sources with `len()` and `.batch(indices) -> Batch` in place of the
        prepared token rows under data_dir (the sft stage's rendered conversations)."""
        # sft trains in the attention mode RL will sample and train in (rl.mode): dense keeps the indexer frozen
        self.cfg, self.stage = cfg, stage
        self.mode = ("sparse" if cfg.rl.mode == "sparse" else "dense") if stage == "sft" else STAGE_MODE[stage]
        self.scfg = getattr(cfg.train, stage)
        self.out_dir, self.ckpt_dir = Path(out_dir), Path(out_dir) / "checkpoints"
        self.tracker = tracker or NullTracker()
        self.state = TrainState(cfg, self.mode, self.scfg, init_from)
        st = self.state
        self.device, self.bridge, self.par, self.is_main = st.device, st.bridge, st.par, st.is_main
        self.model, self.params, self.optimizer, self.autocast = st.model, st.params, st.optimizer, st.autocast
        self.model.validate_token_ids = False      # checked on the host by _to_device instead
        dp_rank, dp = st.dp

        s = self.scfg
        self.train_rows, self.val_rows = rows or (TokenRows(data_dir, "train", s.seq_len, doc_mask),
                                                  TokenRows(data_dir, "val", s.seq_len, doc_mask))
        if s.batch_size % (s.micro_batch_size * dp):
            raise ValueError(f"train.{stage}.batch_size {s.batch_size} must be a multiple of micro_batch_size "
                             f"{s.micro_batch_size} x data-parallel size {dp}")
        self.sampler = StepSampler(len(self.train_rows), s.batch_size, cfg.train.seed, dp_rank, dp)
        self.flops_per_token = flops_per_token(cfg.model, s.seq_len, self.mode)
        self.peak = peak_flops(self.device, cfg.train.dtype)
        self.step, self.history = 0, {}
        self.resumed_from = None
        self._stop = False

    # ------------------------------------------------------------------ one optimizer step

    def objective(self, lm: Optional[torch.Tensor], kl: Optional[torch.Tensor],
                  aux: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The loss to backpropagate. A pipeline stage passes only the terms it computes (lm on the last stage, its
        layers' share of the KL and aux loss on each); None when it computes none."""
        w = self.scfg.indexer_loss_weight
        if self.mode == "warmup":                       # the backbone is frozen: the indexer KL is all there is
            terms = [None if kl is None else w * kl]
        else:
            terms = [lm, aux, w * kl if self.mode == "sparse" and kl is not None else None]
        terms = [t for t in terms if t is not None]
        return reduce(operator.add, terms) if terms else None

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, self.scfg.lr, self.scfg.warmup_steps, self.scfg.steps, self.scfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.train_rows.batch(self.sampler.indices(self.step))
        micro = micro_batches(batch, self.scfg.micro_batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        if self._pipelined():
            stats = self._pipeline(micro, self.mode)
            if not torch.isfinite(stats).all():
                self._diverged("loss", stats[0])
        else:
            # No host synchronisation between micro-batches: the losses are checked once, after the last backward
            # and before the optimizer step (a non-finite loss makes the gradients non-finite too, and nothing has
            # moved or been saved yet).
            sums, loss_sum = None, None
            for mb in micro:
                mb = self._to_device(mb)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    out, lm = forward_lm(self.model, mb.inputs, mb.targets, self.mode, mb.segment_ids, mb.valid)
                loss = self.objective(lm, out.indexer_loss, out.aux_loss)
                (loss / len(micro)).backward()
                stats = torch.stack([lm.detach(), *[kl.detach() for kl in (out.indexer_kl or [])]])
                sums = stats if sums is None else sums + stats
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if not torch.isfinite(loss_sum):         # NaN or Inf in any micro-batch's loss reaches the sum
                self._diverged("loss", loss_sum / len(micro))
            stats = sums / len(micro)
        gnorm = self.state.optimizer_step(lr, self._diverged)
        stats = self.state.mean_over_dp(stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        tokens = self.scfg.batch_size * self.scfg.seq_len
        stats = stats.tolist()
        m = {"train/lm_loss": stats[0], "train/lr": lr, "train/grad_norm": float(gnorm),
             "perf/tokens_per_s": tokens / dt, "perf/step_s": dt,
             "perf/tflops_per_device": self.flops_per_token * tokens / dt / 1e12 / self._world(),
             "train/epoch": self.sampler.epoch(self.step + 1), **memory_gib(self.device)}
        if len(stats) > 1:
            m["train/indexer_kl"] = sum(stats[1:]) / len(stats[1:])
            m.update({f"train/indexer_kl/layer{i}": v for i, v in enumerate(stats[1:])})
        if self.peak:
            m["perf/mfu"] = m["perf/tflops_per_device"] * 1e12 / self.peak
        return m

    def _to_device(self, mb: Batch) -> Batch:
        """The micro-batch on the training device, its token ids checked here on the host: the model's own check
        (`validate_token_ids`, off for the trainer) would read them back from the GPU, a sync per forward."""
        check_token_ids(mb.inputs, self.cfg.model.vocab_size)
        return mb.to(self.device)

    def _world(self) -> int:
        return self.state.world

    # ------------------------------------------------------------------ pipeline parallel (parallel.pp > 1)

    def _pipelined(self) -> bool:
        return self.par is not None and self.par.pp > 1

    def _stage_forward(self, mb: Batch, mode: str, rows: list) -> torch.Tensor:
        """This pipeline stage's part of one micro-batch. The last stage returns its loss; earlier stages return the
        activation for the next stage, carrying their layers' KL and balance terms for backward. The objective's
        KL is a mean over layers, so each stage contributes its layers' sum / n_layers. Appends [lm, KL per
        layer] with this stage's entries filled in (zeros elsewhere) to `rows`."""
        mb = self._to_device(mb)
        n = self.cfg.model.n_layers
        received = None if self.par.first_stage else self.model.embed.hidden
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            if self.par.last_stage:
                out, lm = forward_lm(self.model, mb.inputs, mb.targets, mode, mb.segment_ids, mb.valid)
            else:
                out, lm = self.model(mb.inputs, mode=mode, segment_ids=mb.segment_ids, return_hidden=True,
                                     valid=mb.valid), None
        kls = out.indexer_kl or []
        row = torch.zeros(1 + (n if mode != "dense" else 0), device=self.device)
        if lm is not None:
            row[0] = lm.detach()
        for i, kl in zip(self.model.stage_layers, kls):
            row[1 + i] = kl.detach()
        rows.append(row)
        loss = self.objective(lm, torch.stack(kls).sum() / n if kls else None, out.aux_loss)
        if not self.par.last_stage:
            return self.bridge.attach_loss(out.hidden, loss)
        # The schedule sends the input's gradient back, so it must exist even where the loss does not reach the
        # input (warm-up: frozen backbone, indexer inputs detached); adding 0 * input makes it zeros there.
        return loss + 0.0 * received.sum()

    def _pipeline(self, micro: list[Batch], mode: str, forward_only: bool = False) -> torch.Tensor:
        """Mean [lm, KL per layer] over the micro-batches, run through megatron's pipeline schedule."""
        rows: list = []
        self.bridge.pipeline_step(self.optimizer, micro, lambda mb: self._stage_forward(mb, mode, rows), forward_only)
        return self.bridge.sum_over_stages(torch.stack(rows).sum(0), self.par) / len(micro)

    def _pipeline_recall(self, mb: Batch) -> dict[str, float]:
        """`indexer_recall` across pipeline stages: each stage scores its own layers on a warm-up-mode forward."""
        k = self.cfg.model.index_topk
        with seam.capture_indexer_targets() as captured:
            self._pipeline([mb], "warmup", forward_only=True)
        local = {}
        for i, (p, logits, valid) in zip(self.model.stage_layers, captured):
            r = topk_recall(p, logits, valid.expand_as(p), k)
            if r is not None:
                local[f"recall/layer{i}"] = r
        out = dict(sorted(self.bridge.merge_over_stages(local, self.par).items()))
        if out:
            out["recall/mean"] = sum(out.values()) / len(out)
        return out

    def _diverged(self, what: str, value: torch.Tensor) -> None:
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        raise NonFiniteLoss(f"{self.stage}: non-finite {what} ({float(value.detach())}) at step {self.step + 1}; stopping. "
                            f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}; lower "
                            f"train.{self.stage}.lr or raise grad_clip and resume from it.")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, mode: Optional[str] = None, prefix: str = "val") -> dict[str, float]:
        """Mean validation LM loss (and indexer KL) over the first eval_batches x batch_size validation rows."""
        mode = mode or self.mode
        self.model.eval()
        s = self.scfg
        dp_rank, dp = (self.par.dp_rank, self.par.dp) if self.par else (0, 1)
        n = min(len(self.val_rows), s.eval_batches * s.batch_size)
        rows = list(range(n))[dp_rank::dp]
        recall = {}
        micro = [self.val_rows.batch(rows[i:i + s.micro_batch_size]) for i in range(0, len(rows), s.micro_batch_size)]
        if prefix == "val" and micro:       # sampled: a prefix of the first validation sequence
            k = self.cfg.model.index_topk
            first = micro[0]
            n = recall_probe_len(first.inputs.shape[1], k, self.cfg.model.n_heads)
            head = Batch(*(None if t is None else t[:1, :n]
                           for t in (first.inputs, first.targets, first.segment_ids, first.valid)))
            head = self._to_device(head)
            if self._pipelined():
                recall = self._pipeline_recall(head)
            else:
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    recall = indexer_recall(self.model, head.inputs, head.segment_ids, k)
        if self._pipelined():
            stats = self._pipeline(micro, mode, forward_only=True)
        else:
            sums = None
            for mb in micro:
                mb = self._to_device(mb)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
                    out, lm = forward_lm(self.model, mb.inputs, mb.targets, mode, mb.segment_ids, mb.valid)
                stats = torch.stack([lm, *(out.indexer_kl or [])])
                sums = stats if sums is None else sums + stats
            stats = sums / len(micro)
        if self.bridge:
            stats = self.bridge.mean_over_dp(stats, self.par)
        stats = stats.tolist()
        m = {f"{prefix}/lm_loss": stats[0]}
        if len(stats) > 1:
            m[f"{prefix}/indexer_kl"] = sum(stats[1:]) / len(stats[1:])
        m.update({f"{prefix}/{k}": v for k, v in recall.items()})
        return m

    # ------------------------------------------------------------------ checkpoints

    def _layout(self) -> dict:
        return self.state.layout()

    def save(self) -> Path:
        state = {"step": self.step, "samples": self.step * self.scfg.batch_size, "history": self.history}
        return self.state.save(self.ckpt_dir, self.step, state, self.scfg.keep_last)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint of this stage, if there is one."""
        found = self.state.resume(self.ckpt_dir)
        if found is None:
            return False
        path, state = found
        self.step, self.history, self.resumed_from = state["step"], state["history"], path
        if self.is_main:   # metrics logged after the checkpoint belong to the lost run
            log = self.out_dir / "metrics.jsonl"
            if log.exists():
                lines = [ln for ln in log.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
                log.write_text("".join(ln + "\n" for ln in lines))
        return True

    # ------------------------------------------------------------------ the stage

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def _stop_requested(self) -> bool:
        return self.state.any_rank(self._stop)      # stop together, or the checkpoint collectives would hang

    def log(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self.tracker.log_metrics(metrics, step=self.step)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def fit(self) -> dict:
        s = self.scfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume():
            # No checkpoint: whatever metrics.jsonl holds belongs to a run that died before its first one.
            if self.is_main:
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            start = self.evaluate()
            if self.mode == "sparse":                   # the dense model this stage must stay close to
                start.update(self.evaluate(mode="dense", prefix="val_dense"))
            self.history["start"] = start
            self.log(start)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        metrics: dict[str, float] = {}
        try:
            with Progress(self.stage, total=s.steps - self.step, unit="step",
                          stream=None if self.is_main else open(os.devnull, "w")) as bar:
                while self.step < s.steps:
                    metrics = self.train_step()
                    self.step += 1
                    if self.step % s.eval_every == 0 or self.step == s.steps:
                        metrics.update(self.evaluate())
                    self.log(metrics)
                    bar.update(1, loss=metrics["train/lm_loss"], **({"kl": metrics["train/indexer_kl"]}
                                                                    if "train/indexer_kl" in metrics else {}))
                    if self.step % s.ckpt_every == 0 or self.step == s.steps:
                        self.save()
                    if self._stop_requested():
                        raise Preempted(self.step, self.save() if self.step % s.ckpt_every else
                                        ckpt.latest_checkpoint(self.ckpt_dir))
        finally:
            signal.signal(signal.SIGTERM, previous)
        end = {k: v for k, v in metrics.items() if k.startswith("val")} or self.evaluate()
        self.history["end"] = end
        return self.finish()

    def finish(self) -> dict:
        start, end = self.history.get("start", {}), self.history.get("end", {})
        summary = {"stage": self.stage, "mode": self.mode, "steps": self.step,
                   "tokens": self.step * self.scfg.batch_size * self.scfg.seq_len,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "layout": self._layout(), "start": start, "end": end}
        if self.stage == "pretrain":
            summary["unigram_entropy"] = unigram_entropy(self.val_rows)
        self.state.export(self.out_dir / "hf", summary)
        if self.is_main:
            write_atomic(self.out_dir / "metrics.json", json.dumps(summary, indent=2, default=str))
        return summary

    def close(self) -> None:
        self.state.close()
