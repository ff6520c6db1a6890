"""The megatron-core bridge: the only dsaforge module that imports megatron.

It turns the single-device `dsaforge.model.Transformer` into a tensor/expert/pipeline/data-parallel one after
construction (module replacement, as torchtitan and gpt-fast do), so one model definition serves every layout:

- process groups: megatron's `parallel_state` (TP, PP, EP, DP, expert-DP; order tp-cp-ep-dp-pp), over NCCL on GPU
  and gloo on CPU (megatron's tensor-parallel layers and autograd collectives run on gloo unchanged);
- pipeline parallel: each stage keeps n_layers / pp consecutive blocks, the embedding on the first stage and the
  final norm + head on the last (stand-ins replace the rest, see `_pipeline_stage`), so the model's own forward runs
  one stage; megatron's `get_forward_backward_func()` (1F1B) runs the micro-batches and moves activations and
  gradients between stages; an earlier stage's loss terms ride on its activation (`attach_loss`);
- tensor parallel: MLA heads (wq_b, wkv_b -> ColumnParallelLinear; wo -> RowParallelLinear) and the SwiGLU FFNs of
  dense layers, shared experts and, when ep = 1, routed experts (w1, w3 column; w2 row; the routed ones run as one
  grouped SwiGLU, `TensorParallelExpertsMoE`). The attention's replicated latent projections feed only
  this rank's heads, so their input gradient is summed by megatron's `copy_to_tensor_model_parallel_region` at the
  attention input and their weight gradients are summed across TP before the DP reduction (like megatron's
  sequence-parallel norm weights). The indexer KL target (attention summed over heads) is all-reduced across TP
  through `dsaforge.model.train.seam`. Embedding, output head, routers and indexers stay replicated;
- expert parallel: each EP rank owns n_routed_experts / ep experts; tokens travel to their experts and back through
  an autograd all-to-all (megatron's allocates on CUDA only, see `_AllToAll`); routing is computed where the token
  lives, so it matches one device exactly;
- data parallel: megatron's `DistributedDataParallel` (contiguous fp32 grad buffers; dense gradients averaged over the
  DP group, expert weights, marked `allreduce = False`, over the expert-DP group) and megatron's optimizer from
  `get_megatron_optimizer`: `DistributedOptimizer` (AdamW state sharded over DP; torch's AdamW inside, as neither
  Transformer Engine nor apex is required) with clipping to the global gradient norm, chained with a second one for
  expert weights under EP. One process (world size 1) keeps the trainer's plain torch AdamW.

megatron 0.16 still names CUDA where its DDP buffers, optimizer scalars and p2p buffers are allocated; on CPU
`_megatron_device` maps those requests to the CPU, so the same megatron code runs in the gloo tests that pin this
bridge's numerics. MTP layers under pp > 1 are refused with a clear error (they need the embedding on the last
stage).

Run: not directly; `dsaforge stage pretrain|warmup|sparse` launches torchrun when parallel.world_size > 1.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
warnings.filterwarnings("ignore", message="When using async grad allreduce")
warnings.filterwarnings("ignore", message="full scope is deprecated")             # TransformerConfig's defaults
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel as mtp  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import mappings  # noqa: E402
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from torch import nn
from torch.overrides import TorchFunctionMode

from dsaforge.config import Config, ConfigError
from dsaforge.model.layers import MLP
from dsaforge.model.moe import MoE
from dsaforge.model.train import seam


@dataclass
class Parallel:
    """This process's place in the layout. A single device is Parallel() and every collective is skipped."""
    world: int = 1
    rank: int = 0
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    ep_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def layout(self) -> dict:
        return {"world": self.world, "tp": self.tp, "ep": self.ep, "pp": self.pp}


def init_parallel(cfg: Config, device: torch.device) -> Parallel:
    """Join the torchrun job and build megatron's process groups."""
    p = cfg.parallel
    if p.pp > 1:
        if cfg.model.n_layers % p.pp:
            raise ConfigError(f"parallel.pp {p.pp} does not divide model.n_layers {cfg.model.n_layers}")
        if cfg.model.n_mtp_layers:
            raise ConfigError("parallel.pp > 1 with model.n_mtp_layers > 0: the MTP layers need the embedding on the "
                              "last stage, which dsaforge's pipeline split does not share yet")
    if not dist.is_initialized():
        backend = p.backend if p.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world % (p.tp * p.ep * p.pp):
        raise ConfigError(f"world size {world} is not divisible by tp*ep*pp = {p.tp * p.ep * p.pp}")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    sizes = (p.tp, p.ep, p.pp)
    if not ps.model_parallel_is_initialized():         # several stages may run in one job
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                     expert_model_parallel_size=p.ep, create_gloo_process_groups=False)
    elif (built := (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                    ps.get_pipeline_model_parallel_world_size())) != sizes:
        raise ConfigError(f"this job's process groups were built for tp, ep, pp = {built}, not {sizes}")
    return Parallel(world=world, rank=dist.get_rank(), tp=p.tp, ep=p.ep, pp=p.pp, dp=world // (p.tp * p.pp),
                    tp_rank=ps.get_tensor_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
                    pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def tp_group():
    """This rank's tensor-parallel process group (the checkpoint export gathers TP slices in it)."""
    return ps.get_tensor_model_parallel_group()


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
    bias = linear.bias
    mcfg = _megatron_config(par.tp, linear.weight.dtype)
    if kind == "column":
        if out_f % par.tp:
            raise ConfigError(f"tensor parallel {par.tp} does not divide output width {out_f}")
        if bias is not None:
            raise ConfigError("tensor-parallel column layers carry no bias (only MLA's output projection has one)")
        new = ColumnLinear(in_f, out_f, config=mcfg, init_method=nn.init.zeros_, bias=False, gather_output=False,
                           disable_grad_reduce=not reduce_input_grad)
        n = out_f // par.tp
        shard = linear.weight.data[par.tp_rank * n:(par.tp_rank + 1) * n]
    else:
        if in_f % par.tp:
            raise ConfigError(f"tensor parallel {par.tp} does not divide input width {in_f}")
        # A row layer's bias is whole on every rank, added once after the reduction.
        new = RowLinear(in_f, out_f, config=mcfg, init_method=nn.init.zeros_, bias=bias is not None,
                        input_is_parallel=True, skip_bias_add=False)
        n = in_f // par.tp
        shard = linear.weight.data[:, par.tp_rank * n:(par.tp_rank + 1) * n]
    new = new.to(linear.weight.device)
    new.weight.data.copy_(shard)
    if bias is not None:   # attention_bias: wo's bias, replicated
        new.bias.data.copy_(bias.data)
    new.weight.dsaforge_shard = f"tp{par.tp_rank}/"
    new.weight.dsaforge_partition_dim = 0 if kind == "column" else 1
    # megatron marks a sharded weight only when it initializes it; its grad norm counts unmarked ones on TP rank 0
    mtp.set_tensor_model_parallel_attributes(new.weight, True, new.weight.dsaforge_partition_dim, 1)
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
    """Shard a freshly built single-device model in place for this rank: on the meta device, before any tensor
    has storage (`shards.build_sharded` then materialises only this rank's pieces), or an already loaded one."""
    if par.pp > 1:
        _pipeline_stage(model, par)
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


# ---------------------------------------------------------------- pipeline parallel

class _Elsewhere(nn.Module):
    """Stands in for a block held by another pipeline stage: the hidden state passes through. Blocks keep their
    global index (`layers.<i>`), so checkpoint keys and the consolidated export name them as one device does."""

    def forward(self, x, cos, sin, ctx, forced=None, valid=None):
        return x, None, None, None


class _StageInput(nn.Module):
    """Stands in for the embedding on every stage after the first: the activation received from the previous
    stage, which megatron's schedule hands over through `set_input_tensor`."""

    def __init__(self):
        super().__init__()
        self.hidden = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hidden


def _pipeline_stage(model: nn.Module, par: Parallel) -> None:
    """Keep this stage's contiguous n_layers / pp blocks, the embedding on the first stage and the final norm and
    output head on the last; `model(tokens, return_hidden=True)` then runs just this stage (on earlier stages its
    `hidden` is the block output that goes to the next stage)."""
    per = len(model.layers) // par.pp
    local = range(par.pp_rank * per, (par.pp_rank + 1) * per)
    for i in range(len(model.layers)):
        if i not in local:
            model.layers[i] = _Elsewhere()
    stage_input = _StageInput()
    if not par.first_stage:
        model.embed = stage_input
    if not par.last_stage:
        model.norm, model.head = nn.Identity(), nn.Identity()
    model.stage_layers = local

    def set_input_tensor(tensors: list) -> None:
        stage_input.hidden = tensors[0]
    model.set_input_tensor = set_input_tensor          # what megatron's schedule looks up on the model
    model.model_type = ModelType.encoder_or_decoder


def attach_loss(hidden: torch.Tensor, loss: Optional[torch.Tensor]) -> torch.Tensor:
    """`hidden`, whose backward also backpropagates `loss` (scaled by 1 / micro-batches, as the last stage's loss
    is): the objective terms computed on an earlier stage (its layers' indexer KL and balance loss) train there.
    megatron's MoEAuxLossAutoScaler does this for its own MoE layers' auxiliary losses."""
    return hidden if loss is None else MoEAuxLossAutoScaler.apply(hidden, loss)


def pipeline_step(dp: DataParallel, micro: list, stage_forward: Callable, forward_only: bool = False) -> None:
    """Run every micro-batch through megatron's pipeline schedule (1F1B). On each stage, `stage_forward(mb)` runs
    this stage's part of the model and returns the loss on the last stage, the activation for the next stage on the
    others; the schedule exchanges activations and their gradients between stages (p2p) and runs the backward
    passes, leaving the gradients in megatron's DDP buffers for `DataParallel.step`."""
    def forward_step(data_iterator, model):
        return stage_forward(next(data_iterator)), lambda loss: (loss.clone(), {})   # the schedule scales in place

    with _megatron_device(dp.device):
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[dp.ddp],
                                    num_microbatches=len(micro), seq_length=micro[0].inputs.shape[1],
                                    micro_batch_size=micro[0].inputs.shape[0], forward_only=forward_only)


def sum_over_stages(values: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Sum a tensor over the pipeline stages (each fills in the entries of its own layers)."""
    if par.pp > 1:
        values = values.clone()
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    return values


def merge_over_stages(values: dict, par: Parallel) -> dict:
    """Union of a dict held in part by each pipeline stage (per-layer metrics, state-dict entries)."""
    if par.pp == 1:
        return values
    parts = [None] * par.pp
    dist.all_gather_object(parts, values, group=ps.get_pipeline_model_parallel_group())
    return {k: v for part in parts for k, v in part.items()}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (ranks stop together, or the next collective would hang)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------- data parallel: megatron's DDP and optimizer

class _CudaNamesOnCpu(TorchFunctionMode):
    """Read megatron's CUDA device requests as the CPU: `device="cuda"` factory arguments become "cpu",
    `tensor.cuda()` is the tensor itself, and `tensor.type()` answers with the `torch.cuda.*` name that megatron's
    optimizers test for (distrib_optimizer.py and optimizer.py sort parameters by 'torch.cuda.FloatTensor')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextmanager
def _megatron_device(device: torch.device) -> Iterator[None]:
    """Run megatron's DDP, optimizer and pipeline code on `device`. On GPUs this does nothing. On CPU (the gloo jobs
    that pin the bridge's numerics) megatron 0.16 still names CUDA where it allocates: grad/param buffers and p2p
    receive buffers on `torch.cuda.current_device()`, clip-grad and found-inf scalars on `device="cuda"`, and p2p
    calls `torch.cuda.synchronize()`; here those requests land on the CPU (gloo's p2p is synchronous). Nothing else
    changes: the buffers, collectives, schedule and AdamW math are megatron's."""
    with warnings.catch_warnings():
        # megatron probes `.grad` on its optimizer's flat shard views and calls torch's deprecated-named collectives
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        warnings.filterwarnings("ignore",
                                message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`")
        if device.type != "cpu":
            yield
            return
        standins = {"current_device": lambda: torch.device("cpu"), "synchronize": lambda device=None: None}
        originals = {name: getattr(torch.cuda, name) for name in standins}
        for name, fn in standins.items():
            setattr(torch.cuda, name, fn)
        try:
            with _CudaNamesOnCpu():
                yield
        finally:
            for name, fn in originals.items():
                setattr(torch.cuda, name, fn)


def _transformer_config(cfg: Config) -> TransformerConfig:
    """The model description megatron's DDP, optimizer and schedules read (layout and dtypes, not the architecture)."""
    m = cfg.model
    return TransformerConfig(num_layers=m.n_layers, hidden_size=m.dim, num_attention_heads=m.n_heads,
                             tensor_model_parallel_size=cfg.parallel.tp, expert_model_parallel_size=cfg.parallel.ep,
                             pipeline_model_parallel_size=cfg.parallel.pp, num_moe_experts=m.n_routed_experts,
                             moe_ffn_hidden_size=m.moe_inter_dim, moe_token_dispatcher_type="alltoall",
                             add_bias_linear=False, params_dtype=torch.float32,
                             pipeline_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
                             # stages exchange [B, S, dim] (megatron's own layout is [S, B, dim]): send shapes first
                             variable_seq_lengths=True)


@dataclass
class DataParallel:
    """megatron's DistributedDataParallel around the sharded model and the megatron optimizer over it."""
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    tp_partial: list[nn.Parameter]
    device: torch.device

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        with _megatron_device(self.device):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad(set_to_none)

    def step(self) -> float:
        """Reduce the accumulated gradients, clip to the global norm and take the AdamW step; returns that norm
        (non-finite: the step has run and the caller stops before anything is saved)."""
        if self.tp_partial:      # gradient from this rank's heads only: sum over TP before the DP reduction
            _all_reduce([p.main_grad for p in self.tp_partial], ps.get_tensor_model_parallel_group())
        with _megatron_device(self.device):
            self.ddp.finish_grad_sync()
            _, norm, _ = self.optimizer.step()
        return float("nan") if norm is None else float(norm)


def data_parallel(model: nn.Module, cfg: Config, optim, par: Parallel, device: torch.device) -> DataParallel:
    """Wrap the parallelized model (its trainable parameters already chosen) in megatron's DDP and build megatron's
    optimizer: AdamW (torch's, as neither Transformer Engine nor apex is required), weight decay on matrices only,
    clipping to optim.grad_clip (optim: the stage's section, train.<stage> or rl), and with
    parallel.distributed_optimizer its state sharded over DP.
    Dense gradients are averaged over the DP group and expert ones (`allreduce = False`) over the expert-DP group,
    both scaled by 1/dp: an expert's gradient already holds every EP rank's tokens."""
    scfg = optim
    distributed = cfg.parallel.distributed_optimizer
    for p in model.parameters():
        if getattr(p, "dsaforge_expert", False):
            p.allreduce = False
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=scfg.lr, weight_decay=scfg.weight_decay, adam_beta1=0.9,
                              adam_beta2=0.95, adam_eps=1e-8, clip_grad=scfg.grad_clip,
                              use_distributed_optimizer=distributed)
    with _megatron_device(device):
        ddp = DistributedDataParallel(_transformer_config(cfg), ddp_cfg, model)
        optimizer = get_megatron_optimizer(opt_cfg, [ddp], use_gloo_process_groups=False)
    for group in optimizer.param_groups:    # megatron's LR scheduler applies wd_mult (0 for biases and 1-D tensors)
        group["weight_decay"] = scfg.weight_decay * group["wd_mult"]
    tp_partial = [p for p in model.parameters() if p.requires_grad and getattr(p, "dsaforge_tp_partial", False)]
    return DataParallel(ddp, optimizer, tp_partial, device)


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


def mean_over_dp(values: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Average a tensor of per-rank statistics over the data-parallel group."""
    if par.dp > 1:
        values = values.clone()
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= par.dp
    return values


_REDUCE = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def reduce_over_dp(values: torch.Tensor, par: Parallel, op: str = "sum") -> torch.Tensor:
    """Sum (or min, max) a tensor of per-rank statistics over the data-parallel group."""
    if par.dp > 1:
        values = values.clone()
        dist.all_reduce(values, op=_REDUCE[op], group=ps.get_data_parallel_group())
    return values


def gather_over_dp(obj, par: Parallel, everywhere: bool = True) -> Optional[list]:
    """Every data-parallel rank's `obj` (any picklable value) in DP-rank order: on every rank, or with
    `everywhere=False` on DP rank 0 only (None on the others)."""
    if par.dp == 1:
        return [obj]
    group = ps.get_data_parallel_group()
    out = [None] * par.dp
    if everywhere:
        dist.all_gather_object(out, obj, group=group)
        return out
    dist.gather_object(obj, out if par.dp_rank == 0 else None, dst=dist.get_global_rank(group, 0), group=group)
    return out if par.dp_rank == 0 else None


def sync_expert_load(model: nn.Module, par: Parallel) -> None:
    """Sum the routed-token counts over DP before the router-bias update, so every rank moves the bias alike."""
    if par.dp > 1:
        loads = [m.expert_load for m in model.modules() if isinstance(m, MoE)]
        _all_reduce(loads, ps.get_data_parallel_group())
