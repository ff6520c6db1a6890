"""The megatron-core bridge: the only dsaforge module that imports megatron.

It turns the single-device `dsaforge.model.Transformer` into a tensor/expert/data-parallel one after
construction (module replacement, as torchtitan and gpt-fast do), so one model definition serves every layout:

- process groups: megatron's `parallel_state` (TP, EP, DP, expert-DP; order tp-cp-ep-dp-pp), over NCCL on GPU
  and gloo on CPU (megatron's tensor-parallel layers and autograd collectives run on gloo unchanged);
- tensor parallel: MLA heads (wq_b, wkv_b -> ColumnParallelLinear; wo -> RowParallelLinear) and the SwiGLU FFNs of
  dense layers, shared experts and, when ep = 1, routed experts (w1, w3 column; w2 row; the routed ones run as one
  grouped SwiGLU, `TensorParallelExpertsMoE`). The attention's replicated latent projections feed only
  this rank's heads, so their input gradient is summed by megatron's `copy_to_tensor_model_parallel_region` at the
  attention input and their weight gradients are summed across TP after backward (like megatron's
  sequence-parallel norm weights). The indexer KL target (attention summed over heads) is all-reduced across TP
  through `dsaforge.model.train.seam`. Embedding, output head, routers and indexers stay replicated;
- expert parallel: each EP rank owns n_routed_experts / ep experts; tokens travel to their experts and back through
  an autograd all-to-all (megatron's allocates on CUDA only, see `_AllToAll`); routing is computed where the token lives, so it matches one device exactly;
- data parallel: gradients are averaged over megatron's data-parallel groups (expert weights over the
  expert-data-parallel group) by `sync_grads`; the optimizer is torch AdamW on every rank.

Not used: megatron's DistributedDataParallel and DistributedOptimizer (their contiguous grad buffers are allocated
on CUDA, so they cannot run in the CPU/gloo tests that pin this bridge's numerics), and pipeline parallelism
(pp > 1 is refused with a clear error).

Run: not directly; `dsaforge stage pretrain|warmup|sparse` launches torchrun when parallel.world_size > 1.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="When using async grad allreduce")
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel as mtp  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.tensor_parallel import mappings  # noqa: E402
from torch import nn

from dsaforge.config import Config, ConfigError
from dsaforge.model.layers import MLP
from dsaforge.model.moe import MoE
from dsaforge.model.train import seam

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class Parallel:
    """This process's place in the layout. A single device is Parallel() and every collective is skipped."""
    world: int = 1
    rank: int = 0
    tp: int = 1
    ep: int = 1
    dp: int = 1
    tp_rank: int = 0
    ep_rank: int = 0
    dp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def layout(self) -> dict:
        return {"world": self.world, "tp": self.tp, "ep": self.ep, "pp": 1}


def init_parallel(cfg: Config, device: torch.device) -> Parallel:
    """Join the torchrun job and build megatron's process groups."""
    p = cfg.parallel
    if p.pp > 1:
        raise ConfigError("parallel.pp > 1: pipeline parallelism is not implemented in dsaforge's trainer yet; "
                          "use tp/ep/dp")
    if not dist.is_initialized():
        backend = p.backend if p.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world % (p.tp * p.ep):
        raise ConfigError(f"world size {world} is not divisible by tp*ep = {p.tp * p.ep}")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not ps.model_parallel_is_initialized():         # several stages may run in one job
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tp, expert_model_parallel_size=p.ep,
                                     create_gloo_process_groups=False)
    elif (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()) != (p.tp, p.ep):
        raise ConfigError(f"this job's process groups were built for tp={ps.get_tensor_model_parallel_world_size()}"
                          f" ep={ps.get_expert_model_parallel_world_size()}, not tp={p.tp} ep={p.ep}")
    return Parallel(world=world, rank=dist.get_rank(), tp=p.tp, ep=p.ep, dp=world // p.tp,
                    tp_rank=ps.get_tensor_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                    dp_rank=ps.get_data_parallel_rank())


def destroy(par: Parallel) -> None:
    if par.world > 1 and dist.is_initialized():
        seam.set_head_reduction(None)
        ps.destroy_model_parallel()
        dist.destroy_process_group()


# ---------------------------------------------------------------- tensor parallel layers

class ColumnLinear(mtp.ColumnParallelLinear):
    """megatron's ColumnParallelLinear with nn.Linear's call signature (output only, no bias)."""

    def forward(self, x):
        return super().forward(x)[0]


class RowLinear(mtp.RowParallelLinear):
    def forward(self, x):
        return super().forward(x)[0]


def _megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=dtype, use_cpu_initialization=True,
                               perform_initialization=False)


def _tp_linear(linear: nn.Linear, kind: str, par: Parallel, reduce_input_grad: bool = True) -> nn.Module:
    """A megatron parallel layer holding this rank's slice of `linear`'s weight ([out, in])."""
    out_f, in_f = linear.weight.shape
    mcfg = _megatron_config(par.tp, linear.weight.dtype)
    if kind == "column":
        if out_f % par.tp:
            raise ConfigError(f"tensor parallel {par.tp} does not divide output width {out_f}")
        new = ColumnLinear(in_f, out_f, config=mcfg, init_method=nn.init.zeros_, bias=False, gather_output=False,
                           disable_grad_reduce=not reduce_input_grad)
        n = out_f // par.tp
        shard = linear.weight.data[par.tp_rank * n:(par.tp_rank + 1) * n]
    else:
        if in_f % par.tp:
            raise ConfigError(f"tensor parallel {par.tp} does not divide input width {in_f}")
        new = RowLinear(in_f, out_f, config=mcfg, init_method=nn.init.zeros_, bias=False, input_is_parallel=True,
                        skip_bias_add=False)
        n = in_f // par.tp
        shard = linear.weight.data[:, par.tp_rank * n:(par.tp_rank + 1) * n]
    new = new.to(linear.weight.device)
    new.weight.data.copy_(shard)
    new.weight.dsaforge_shard = f"tp{par.tp_rank}/"
    new.weight.dsaforge_partition_dim = 0 if kind == "column" else 1
    return new


def _parallel_mlp(mlp: MLP, par: Parallel) -> None:
    mlp.w1 = _tp_linear(mlp.w1, "column", par)
    mlp.w3 = _tp_linear(mlp.w3, "column", par)
    mlp.w2 = _tp_linear(mlp.w2, "row", par)


def _attention_input(module, args):
    # Identity forward, all-reduce backward: every rank's heads read the same normed input.
    return (mappings.copy_to_tensor_model_parallel_region(args[0]),) + tuple(args[1:])


def _parallel_attention(mla: nn.Module, par: Parallel) -> None:
    if mla.n_heads % par.tp:
        raise ConfigError(f"tensor parallel {par.tp} does not divide n_heads {mla.n_heads}")
    # wq_b / wkv_b take replicated latents whose input gradient is summed once, at the attention input.
    mla.wq_b = _tp_linear(mla.wq_b, "column", par, reduce_input_grad=False)
    mla.wkv_b = _tp_linear(mla.wkv_b, "column", par, reduce_input_grad=False)
    mla.wo = _tp_linear(mla.wo, "row", par)
    mla.n_heads //= par.tp
    for m in (mla.wq_a, mla.q_norm, mla.wkv_a, mla.kv_norm):
        for p in m.parameters():
            p.dsaforge_tp_partial = True      # gradient from this rank's heads only: summed over TP
    mla.register_forward_pre_hook(_attention_input)


# ---------------------------------------------------------------- expert parallel MoE

class _AllToAll(torch.autograd.Function):
    """Token exchange with variable split sizes; backward sends gradients back the same way. megatron's
    `mappings.all_to_all` does the same but allocates its output on `torch.cuda.current_device()`
    (tensor_parallel/mappings.py, _AllToAll.forward), so it cannot run in CPU/gloo jobs."""

    @staticmethod
    def forward(ctx, group, x, out_sizes: list[int], in_sizes: list[int]):
        ctx.group, ctx.out_sizes, ctx.in_sizes = group, out_sizes, in_sizes
        out = x.new_empty((sum(out_sizes),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.in_sizes),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_sizes, ctx.out_sizes, group=ctx.group)
        return None, back, None, None


def all_to_all(group, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int]) -> torch.Tensor:
    return _AllToAll.apply(group, x, out_sizes, in_sizes)


class ExpertParallelMoE(MoE):
    """DeepSeekMoE with the routed experts spread over the expert-parallel group (same math as `MoE`)."""

    ep: int
    ep_rank: int
    n_local: int

    def routed(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               counts: torch.Tensor) -> torch.Tensor:
        """Send each token-slot to the rank holding its expert, run the local experts, send the outputs back."""
        group = ps.get_expert_model_parallel_group()
        order = indices.flatten().argsort(stable=True)                                    # (token, slot) by expert
        token = order // self.topk
        send = counts.view(self.ep, self.n_local)                                         # [ep, local] to each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)                                  # [ep, local] from each rank
        send_sizes, recv_sizes = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = all_to_all(group, flat[token], recv_sizes, send_sizes)          # rows by (source, expert)
        local_id = torch.repeat_interleave(torch.arange(self.n_local, device=flat.device).repeat(self.ep),
                                           recv.flatten())
        by_expert = local_id.argsort(stable=True)
        y_sorted = self.expert_forward(x_recv[by_expert], recv.sum(0))                   # one grouped SwiGLU
        y_recv = y_sorted[by_expert.argsort()]
        y_back = all_to_all(group, y_recv, send_sizes, recv_sizes)              # [N*k, dim] by expert
        return torch.zeros_like(flat).index_add(0, token, y_back * weights.flatten()[order, None])


class TensorParallelExpertsMoE(MoE):
    """DeepSeekMoE whose routed experts are split over TP (ep = 1): each rank holds I/tp columns of every expert's
    w1/w3 and the matching rows of w2. The grouped SwiGLU bypasses the experts' megatron layers, so it applies
    their collectives itself, once for all experts: the input gradient is summed over TP (column layer) and each
    token-slot's partial output is summed over TP before the routing weights mix it (row layer), so the router's
    gradient sees the full expert outputs."""

    def expert_forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x_sorted = mappings.copy_to_tensor_model_parallel_region(x_sorted)
        return mappings.reduce_from_tensor_model_parallel_region(super().expert_forward(x_sorted, counts))


def _expert_parallel(moe: MoE, par: Parallel) -> None:
    if moe.n_experts % par.ep:
        raise ConfigError(f"expert parallel {par.ep} does not divide n_routed_experts {moe.n_experts}")
    n_local = moe.n_experts // par.ep
    moe.experts = nn.ModuleList(moe.experts[par.ep_rank * n_local:(par.ep_rank + 1) * n_local])
    for p in moe.experts.parameters():
        p.dsaforge_expert = True
        p.dsaforge_shard = f"ep{par.ep_rank}/"
    moe.__class__ = ExpertParallelMoE
    moe.ep, moe.ep_rank, moe.n_local = par.ep, par.ep_rank, n_local


def parallelize(model: nn.Module, par: Parallel) -> nn.Module:
    """Shard a freshly built (and loaded) single-device model in place for this rank."""
    for m in model.modules():
        if isinstance(m, MoE) and par.ep > 1:
            _expert_parallel(m, par)
    if par.tp > 1:
        for m in list(model.modules()):
            if hasattr(m, "wkv_b") and hasattr(m, "indexer"):
                _parallel_attention(m, par)
            elif isinstance(m, MLP) and not getattr(m.w1.weight, "dsaforge_expert", False):
                _parallel_mlp(m, par)
        for m in model.modules():
            if type(m) is MoE:        # ep = 1: its routed experts were just split over TP
                m.__class__ = TensorParallelExpertsMoE
        tp_group = ps.get_tensor_model_parallel_group()

        def sum_heads(p: torch.Tensor) -> torch.Tensor:
            p = p.detach().clone()
            dist.all_reduce(p, group=tp_group)
            return p
        seam.set_head_reduction(sum_heads)
    return model


def shard_tag(name: str, t: torch.Tensor) -> str:
    """Checkpoint key prefix: '' for replicated tensors, 'tp<r>/' or 'ep<r>/' for this rank's shard."""
    return getattr(t, "dsaforge_shard", "")


# ---------------------------------------------------------------- gradients

def _all_reduce(tensors: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sync_grads(params: list[nn.Parameter], par: Parallel) -> None:
    """Sum partial attention gradients over TP, then average everything over data parallelism."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if par.tp > 1:
        _all_reduce([p.grad for p in params if getattr(p, "dsaforge_tp_partial", False)],
                    ps.get_tensor_model_parallel_group())
    # Expert gradients already hold every EP rank's tokens (the all_to_all backward); summing them over the
    # expert-data-parallel group then covers all DP ranks, like the dense ones summed over the DP group.
    dense = [p.grad for p in params if not getattr(p, "dsaforge_expert", False)]
    expert = [p.grad for p in params if getattr(p, "dsaforge_expert", False)]
    if par.dp > 1:
        _all_reduce(dense, ps.get_data_parallel_group(), 1.0 / par.dp)
    if expert and (par.dp > 1):
        _all_reduce(expert, ps.get_expert_data_parallel_group(), 1.0 / par.dp)


def grad_norm(params: list[nn.Parameter], par: Parallel) -> torch.Tensor:
    """Global L2 norm of the gradients, counting each shard once."""
    def sq(ps_):
        return sum((p.grad.float().pow(2).sum() for p in ps_), torch.zeros((), device=params[0].device))
    tp_sharded = [p for p in params if shard_tag("", p).startswith("tp")]
    experts = [p for p in params if getattr(p, "dsaforge_expert", False)]
    rest = [p for p in params if not shard_tag("", p)]
    a, b = sq(tp_sharded), sq(experts)
    if par.tp > 1:
        dist.all_reduce(a, group=ps.get_tensor_model_parallel_group())
    if par.ep > 1:
        dist.all_reduce(b, group=ps.get_expert_model_parallel_group())
    return (sq(rest) + a + b).sqrt()


def mean_over_dp(values: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Average a tensor of per-rank statistics over the data-parallel group."""
    if par.dp > 1:
        values = values.clone()
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= par.dp
    return values


def sync_expert_load(model: nn.Module, par: Parallel) -> None:
    """Sum the routed-token counts over DP before the router-bias update, so every rank moves the bias alike."""
    if par.dp > 1:
        loads = [m.expert_load for m in model.modules() if isinstance(m, MoE)]
        _all_reduce(loads, ps.get_data_parallel_group())


# ---------------------------------------------------------------- consolidation

def consolidated_state_dict(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """The single-device model's state dict (TP shards concatenated, experts renumbered globally), on every rank."""
    tensors = dict(model.named_buffers())
    tensors.update(dict(model.named_parameters()))
    persistent = set(model.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name not in persistent:
            continue
        tag = shard_tag(name, t)
        if tag.startswith("tp"):
            parts = [torch.empty_like(t) for _ in range(par.tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            out[name] = torch.cat(parts, dim=t.dsaforge_partition_dim).cpu()
        elif tag.startswith("ep"):
            parts = [torch.empty_like(t) for _ in range(par.ep)]
            dist.all_gather(parts, t.detach().contiguous(), group=ps.get_expert_model_parallel_group())
            local = int(_EXPERT.search(name).group(1))
            n_local = len(parts) and next(m for m in model.modules() if isinstance(m, ExpertParallelMoE)).n_local
            for r, part in enumerate(parts):
                out[_EXPERT.sub(f".experts.{r * n_local + local}.", name, count=1)] = part.cpu()
        else:
            out[name] = t.detach().cpu()
    return out
