"""What every training stage shares, whatever its loss: the model on its device and parallel layout, the trainable
parameters, the optimizer and its step, checkpoints and the HF export.

    state = TrainState(cfg, mode="sparse", optim=cfg.train.sft, init_from=hf_dir)
    ... loss.backward() ...
    gnorm = state.optimizer_step(lr, on_nonfinite)     # reduce over DP, clip, step, router-bias update
    state.save(ckpt_dir, step, {"step": step}, keep_last=2)

The LM stages (`Trainer`: pretrain, warmup, sparse, sft) and GRPO (`dsaforge.model.rl.loop`) are each a loss and a
loop around one of these. Under torchrun the megatron bridge shards the model over TP/EP/PP and megatron's DDP and
(distributed) optimizer reduce and step; on one device it is plain AdamW.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from dsaforge.config import Config
from dsaforge.model import Transformer, set_trainable, update_router_bias
from dsaforge.model.hf import check_run_config, export_hf, import_hf
from dsaforge.model.moe import MoE
from dsaforge.model.train import checkpoint as ckpt


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_model(cfg: Config, init_from: Optional[Path], device: torch.device) -> Transformer:
    """The model with an HF-format checkpoint's weights (an earlier stage's export, or any DeepSeek-V3.2 one) on
    `device`, with the training switches of `cfg.train`. Every rank builds the same model from the same seed."""
    model = Transformer(cfg.model)
    if init_from is not None:
        imported = import_hf(init_from)
        check_run_config(cfg.model, imported.cfg, init_from)
        model.load_state_dict(imported.state_dict())
    model.to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.replay_topk = cfg.train.replay_topk
    return model


def export(out: Path, state: dict[str, torch.Tensor], cfg: Config, summary: dict) -> None:
    """The stage's weights as a Hugging Face DeepSeek-V3.2 checkpoint (`dsaforge.model.hf`), written atomically:
    what every later stage, eval and RL start from, and what transformers/vLLM/SGLang load."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True, assign=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(model, tmp)
    (tmp / "dsaforge_stage.json").write_text(json.dumps(summary, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


class TrainState:
    """One stage's model, layout and optimizer. `mode` picks the trainable parameters (`set_trainable`); `optim`
    is any section with lr, weight_decay and grad_clip (train.<stage> or rl)."""

    def __init__(self, cfg: Config, mode: str, optim, init_from: Optional[Path] = None):
        self.cfg, self.mode, self.optim = cfg, mode, optim
        self.device = resolve_device(cfg)
        self.bridge = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from dsaforge.model import megatron_bridge as bridge
            self.bridge = bridge
            self.par = bridge.init_parallel(cfg, self.device)
        else:
            from dsaforge.model.train.seam import set_head_reduction
            set_head_reduction(None)
            self.par = None
        self.is_main = self.par is None or self.par.is_main
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model = build_model(cfg, init_from, self.device)
        # On GPUs the DSA modes use the fused long-context kernels (no [S, S] tensors); their KL has no
        # tensor-parallel head reduction yet, so TP > 1 keeps the materialised path.
        self.model.fused_dsa = self.device.type == "cuda" and (self.par is None or self.par.tp == 1)
        if self.bridge:
            self.bridge.parallelize(self.model, self.par)
        self.params = set_trainable(self.model, mode)
        if self.bridge:     # megatron's DDP + (distributed) optimizer: gradient reduction, clipping, AdamW
            self.optimizer = self.bridge.data_parallel(self.model, cfg, optim, self.par, self.device)
        else:
            decay = [p for p in self.params if p.dim() >= 2]
            no_decay = [p for p in self.params if p.dim() < 2]
            self.optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=optim.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        self.autocast = self.device.type == "cuda" and cfg.train.dtype == "bfloat16"

    @property
    def world(self) -> int:
        return self.par.world if self.par else 1

    @property
    def dp(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size)."""
        return (self.par.dp_rank, self.par.dp) if self.par else (0, 1)

    def autocast_context(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast)

    def optimizer_step(self, lr: float, on_nonfinite: Callable[[str, torch.Tensor], None]) -> torch.Tensor:
        """Step on the accumulated gradients: reduce over DP, clip to optim.grad_clip, AdamW at `lr`, then the
        routers' load-balancing bias update. -> the gradient norm before clipping. `on_nonfinite(what, value)` is
        called (and must raise) when the norm is NaN/Inf, before any parameter moves."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.bridge:         # reduce over DP, clip to the global norm, step: all inside megatron's optimizer
            gnorm = torch.tensor(self.optimizer.step())
            if not torch.isfinite(gnorm):
                on_nonfinite("gradient norm", gnorm)
        else:
            grads = [torch.linalg.vector_norm(p.grad.float()) for p in self.params if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
            if not torch.isfinite(gnorm):
                on_nonfinite("gradient norm", gnorm)
            if self.optim.grad_clip > 0:
                coef = (self.optim.grad_clip / (gnorm + 1e-6)).clamp(max=1.0)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            self.optimizer.step()
        if self.mode == "warmup":                       # routers are frozen: drop the loads counted meanwhile
            for m in self.model.modules():
                if isinstance(m, MoE):
                    m.expert_load.zero_()
        else:
            if self.bridge:
                self.bridge.sync_expert_load(self.model, self.par)
            update_router_bias(self.model)
        return gnorm

    def mean_over_dp(self, stats: torch.Tensor) -> torch.Tensor:
        return self.bridge.mean_over_dp(stats, self.par) if self.bridge else stats

    def reduce_over_dp(self, stats: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (op "min", "max": min, max) per-rank statistics over data parallelism."""
        return self.bridge.reduce_over_dp(stats, self.par, op) if self.bridge else stats

    def gather_over_dp(self, obj, everywhere: bool = True) -> Optional[list]:
        """[obj of each DP rank] in rank order, on every rank (everywhere=False: on DP rank 0, None elsewhere)."""
        return self.bridge.gather_over_dp(obj, self.par, everywhere) if self.bridge else [obj]

    # ------------------------------------------------------------------ checkpoints and export

    def shard_tag(self, name, t) -> str:
        return self.bridge.shard_tag(name, t) if self.bridge else ""

    def layout(self) -> dict:
        return self.par.layout() if self.par else {"world": 1, "tp": 1, "ep": 1, "pp": 1}

    def save(self, ckpt_dir: Path, step: int, state: dict, keep_last: int) -> Path:
        return ckpt.save(ckpt_dir, step, self.model, self.optimizer, state, self.shard_tag, keep_last, self.layout())

    def resume(self, ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
        """(path, saved state) of the newest complete checkpoint under ckpt_dir, loaded into the model and
        optimizer; None when there is none."""
        path = ckpt.latest_checkpoint(ckpt_dir)
        if path is None:
            return None
        return path, ckpt.load(path, self.model, self.optimizer, self.shard_tag, self.layout())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (gathered from every shard under the bridge)."""
        if self.bridge:
            return self.bridge.consolidated_state_dict(self.model, self.par)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def export(self, out: Path, summary: dict) -> None:
        state = self.full_state_dict()
        if self.is_main:
            export(out, state, self.cfg, summary)

    def any_rank(self, flag: bool) -> bool:
        return self.bridge.any_rank(flag, self.device) if self.bridge else flag

    def close(self) -> None:
        if self.bridge:
            self.bridge.destroy(self.par)
