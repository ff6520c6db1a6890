"""DeepSeek-V3.2: embedding -> n_layers x (MLA+DSA, dense FFN or DeepSeekMoE) -> norm -> head, optional MTP.

    model = Transformer(cfg.model)
    out = model(tokens, mode="sparse")       # out.logits, out.indexer_loss (never added to anything for you)

Training at long context: `model.activation_checkpointing = True` recomputes each block in backward, and
`model(tokens, return_hidden=True)` + `model.lm_loss_chunked(out.hidden, targets)` scores the output head a chunk of
positions at a time, so the [S, vocab] logits never exist at once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsaforge.config.model import ModelConfig
from dsaforge.kernels import causal_mask
from dsaforge.model.attention import MLA, AttnContext, Form, LayerCache, Mode
from dsaforge.model.layers import MLP, RMSNorm, rope_tables
from dsaforge.model.moe import Gate, MoE

MODES = ("dense", "warmup", "sparse")


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]                       # [B, S, V]; None with return_hidden=True
    indexer_loss: Optional[torch.Tensor] = None          # mean of indexer_kl; None in dense mode
    indexer_kl: Optional[list[torch.Tensor]] = None      # one scalar per layer (main layers, then MTP layers)
    routing: Optional[list[torch.Tensor]] = None         # [B, S, k] expert indices per MoE layer that ran
    aux_loss: Optional[torch.Tensor] = None              # sequence-wise balance loss (None when alpha = 0)
    mtp_logits: Optional[list[torch.Tensor]] = None      # depth d: [B, S-d, V], position i predicts token i+d+1
    hidden: Optional[torch.Tensor] = None                # [B, S, dim] final-norm output (return_hidden=True)


class Cache:
    """Inference state for all main layers (MTP layers are not cached: they are a training-time objective)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds model max_seq_len {cfg.max_seq_len}")
        self.batch_size, self.max_len = batch_size, max_len
        self.layers = [LayerCache(batch_size, max_len, cfg, dtype, device) for _ in range(cfg.n_layers)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, cos, sin, ctx: AttnContext, forced=None, valid=None):
        """x [B, S, dim], valid [B, S] or None (the MoE's load mask) -> (x, indexer KL or None, expert indices or
        None, aux loss or None)."""
        a, kl = self.attn(self.attn_norm(x), cos, sin, ctx)
        x = x + a
        if isinstance(self.ffn, MoE):
            f, indices, aux = self.ffn(self.ffn_norm(x), forced, valid)
            return x + f, kl, indices, aux
        return x + self.ffn(self.ffn_norm(x)), kl, None, None


class MTPLayer(nn.Module):
    """DeepSeek-V3 multi-token prediction depth: h' = eh_proj([enorm(emb(t_{i+d})); hnorm(h_i)]) -> Block.
    The embedding and output head are the main model's (shared, as in the paper)."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, moe)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)       # the shared head's own norm

    def forward(self, h, emb, cos, sin, ctx, forced=None, valid=None):
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.block(x, cos, sin, ctx, forced, valid)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Presets assign fields one by one, so cross-field checks are re-run here.
        self.cfg = cfg = ModelConfig.model_validate(cfg.model_dump())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        has_moe = cfg.n_layers > cfg.n_dense_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, moe=has_moe) for _ in range(cfg.n_mtp_layers))
        self._rope: dict = {}      # device -> (cos, sin) in fp32; not buffers, so .to(bfloat16) cannot degrade them
        # Long-context switch: sparse mode selects top-k and computes the indexer KL with the kernels' fused entry
        # points (kernels.indexer_topk / indexer_kl), never holding an [S, T] score tensor. Packed documents need
        # B == 1 there (cu_seqlens); other batches with segment_ids take the materialised path.
        self.fused_dsa = False
        # Recompute each block (main and MTP) in backward instead of keeping its activations (training forwards).
        self.activation_checkpointing = False
        # ... and there reuse the top-k indices the forward chose (held until the block's backward), rather than
        # running the indexer's scores and selection a second time.
        self.replay_topk = True
        # Range-check the token ids of every call. Reading min/max back is a host sync per forward on a GPU; the
        # trainer checks its batches on the host before they move (`check_token_ids`) and turns this off.
        self.validate_token_ids = True
        if self.embed.weight.device.type != "meta":   # on meta (checkpoint import) there is nothing to fill
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:   # attention_bias: start at zero
                nn.init.zeros_(m.bias)
        elif isinstance(m, Gate):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _apply(self, fn, recurse=True):
        # The router bias moves in 1e-3 steps and the load counters count tokens: both stay fp32 whatever the
        # model dtype. Keep the fp32 originals and only follow the device, so a bf16 cast cannot round them.
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        kept = [(m.gate.bias, m.expert_load) for m in moes]
        super()._apply(fn, recurse)
        for m, (bias, load) in zip(moes, kept):
            m.gate._buffers["bias"] = bias.to(device=m.gate.bias.device, dtype=torch.float32)
            m._buffers["expert_load"] = load.to(device=m.expert_load.device, dtype=torch.float32)
        return self

    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._rope:
            self._rope[key] = rope_tables(self.cfg, device)
        return self._rope[key]

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> Cache:
        p = self.embed.weight
        return Cache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, dtype=p.dtype, device=p.device)

    @property
    def n_moe_layers(self) -> int:
        return sum(isinstance(b.ffn, MoE) for b in self.layers)

    def _check(self, tokens, mode, start_pos, cache, segment_ids, routing, attn_form, valid) -> None:
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [B, S], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                             f"{'' if not isinstance(tokens, torch.Tensor) else ' ' + str(tokens.dtype)}")
        b, s = tokens.shape
        if s == 0:
            raise ValueError("tokens has an empty sequence dimension")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if attn_form not in (None, "mha", "mqa"):
            raise ValueError(f"attn_form must be None, 'mha' or 'mqa', got {attn_form!r}")
        if start_pos < 0 or (start_pos > 0 and cache is None):
            raise ValueError(f"start_pos={start_pos} needs a cache holding the earlier positions")
        end = start_pos + s
        if end > cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len {cfg.max_seq_len}")
        if cache is not None:
            if b > cache.batch_size or end > cache.max_len:
                raise ValueError(f"cache holds batch {cache.batch_size} x {cache.max_len} positions; this call needs "
                                 f"batch {b} x {end}")
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) are for training forwards; not supported with a cache")
        if self.validate_token_ids:
            check_token_ids(tokens, cfg.vocab_size)
        if segment_ids is not None and tuple(segment_ids.shape) != (b, s):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal tokens shape {(b, s)}")
        if valid is not None and (tuple(valid.shape) != (b, s) or valid.dtype != torch.bool):
            raise ValueError(f"valid must be a bool tensor of tokens' shape {(b, s)}, got {tuple(valid.shape)} "
                             f"{valid.dtype}")
        if routing is not None:
            n_main = self.n_moe_layers
            n_mtp = sum(isinstance(m.block.ffn, MoE) for m in self.mtp)
            if len(routing) not in (n_main, n_main + n_mtp):
                raise ValueError(f"routing has {len(routing)} entries; the model has {n_main} MoE layers "
                                 f"(+{n_mtp} in MTP)")
            for i, r in enumerate(routing):
                if r is None:
                    continue
                want = (b, s if i < n_main else s - 1 - (i - n_main), cfg.n_activated_experts)
                if tuple(r.shape) != want or r.is_floating_point():
                    raise ValueError(f"routing[{i}] must be an integer tensor of shape {want}, got "
                                     f"{tuple(r.shape)} {r.dtype}")
                if r.min() < 0 or r.max() >= cfg.n_routed_experts:
                    raise ValueError(f"routing[{i}] has expert ids outside [0, {cfg.n_routed_experts})")
                if (r.sort(-1)[0].diff(dim=-1) == 0).any():
                    raise ValueError(f"routing[{i}] repeats an expert within a token")

    def _checkpointed(self, block, x, cos, sin, ctx, forced, valid):
        """block(x, cos, sin, ctx, forced) under torch.utils.checkpoint (non-reentrant): only x is kept, the block is
        run again in backward. The recomputation must not repeat the forward's side effects or choices: the routers
        do not count the tokens again, and each MoE replays the experts the forward chose, so a last-bit difference
        in the recomputed router input cannot send a token elsewhere. Nothing in a block draws random numbers, so
        the RNG state is not saved. With `replay_topk` the attention's top-k indices are replayed the same way
        (`AttnContext.replay`), with the indexer KL's target and value: the recomputation skips the indexer's scoring
        and selection and the KL's two forward kernels (about 1 s of a 4.65 s step on the small preset at 64K,
        profiled on an H200 before this replay existed)."""
        first: dict = {}
        if self.replay_topk and ctx.mode == "sparse":
            ctx = replace(ctx, replay={})

        def run(x, cos, sin, forced):
            if "routing" not in first:                           # the forward
                out = block(x, cos, sin, ctx, forced, valid)
                first["routing"] = out[2]
                return out
            moes = [m for m in self.modules() if isinstance(m, MoE)]
            for m in moes:
                m.count_load = False
            try:
                return block(x, cos, sin, ctx, first["routing"] if first["routing"] is not None else forced, valid)
            finally:
                for m in moes:
                    m.count_load = True

        return checkpoint(run, x, cos, sin, forced, use_reentrant=False, preserve_rng_state=False)

    def lm_loss_chunked(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        chunk: int = 4096) -> torch.Tensor:
        """Mean cross-entropy of the output head on hidden [B, S, dim] (`forward(..., return_hidden=True)`) against
        targets [B, S] (already shifted; ignore_index marks positions not scored), `chunk` positions at a time.

        Each chunk's [chunk, vocab] fp32 logits live only inside a checkpointed function: the forward keeps the
        chunk's loss sum, the backward recomputes its logits (one extra head matmul) to get the gradient. Equals
        F.cross_entropy(head(hidden).float(), targets, ignore_index) in value and gradients."""
        h, t = hidden.flatten(0, 1), targets.flatten()                                  # [N, dim], [N]
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            if torch.is_grad_enabled():
                total = total + checkpoint(self._ce_sum, h[i:i + chunk], t[i:i + chunk], ignore_index,
                                           use_reentrant=False, preserve_rng_state=False)
            else:
                total = total + self._ce_sum(h[i:i + chunk], t[i:i + chunk], ignore_index)
        return total / (t != ignore_index).sum()

    def _ce_sum(self, h: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return F.cross_entropy(self.head(h).float(), t, ignore_index=ignore_index, reduction="sum")

    def forward(self, tokens: torch.Tensor, *, mode: Mode = "dense", start_pos: int = 0, cache: Optional[Cache] = None,
                segment_ids: Optional[torch.Tensor] = None, routing: Optional[Sequence[Optional[torch.Tensor]]] = None,
                return_routing: bool = False, attn_form: Optional[Form] = None,
                return_hidden: bool = False, valid: Optional[torch.Tensor] = None) -> ModelOutput:
        """tokens [B, S] -> ModelOutput.

        mode: "dense" (MLA only), "warmup" (dense attention + indexer KL to the head-summed attention),
              "sparse" (top-k attention + indexer KL over the selected keys).
        segment_ids [B, S]: packed documents; attention and indexer selection never cross a boundary.
        routing: forced expert indices per MoE layer (entries may be None to route freely); the router still scores.
        attn_form: force the MHA or absorbed-MQA form (default: MHA for multi-token dense/warmup calls, else MQA).
        return_hidden: return the final-norm hidden states in `hidden` and skip the output head (`logits` is None);
              score them with `lm_loss_chunked`.
        valid [B, S] bool: False on padding. Padding is computed like any token (attention is causal, so nothing
              real sees it), but only valid positions count in the MoE layers' `expert_load` (the router-bias update)
              and their balance loss; an MTP layer of depth d counts position i when tokens i and i + d are valid.
        """
        self._check(tokens, mode, start_pos, cache, segment_ids, routing, attn_form, valid)
        b, s = tokens.shape
        end = start_pos + s
        cos_all, sin_all = self.rope(tokens.device)
        cos, sin = cos_all[start_pos:end], sin_all[start_pos:end]                 # [S, R/2]
        # allowed None = plain causal; the [S, T] mask is then built only by paths that need one.
        allowed, cu_seqlens = None, None
        fused = self.fused_dsa and mode in ("sparse", "warmup")
        if segment_ids is not None:
            cu_seqlens = _cu_seqlens(segment_ids) if fused else None
            fused = cu_seqlens is not None
            if not (fused and mode == "sparse"):   # the fused sparse path masks documents by cu_seqlens alone
                allowed = causal_mask(s, end, tokens.device)[None] & (
                    segment_ids[:, :, None] == segment_ids[:, None, :])              # [B, S, S]

        kls, routes, auxes = [], [], []
        routing = list(routing) if routing is not None else []

        def run(block, x, c, sn, mask, layer_cache, forced, v):
            # MTP rows are shorter than the pack: cut the document boundaries at their length
            # (unique_consecutive has a data-dependent size: a host sync, so only where the rows are shorter)
            cu = cu_seqlens
            if cu is not None and x.shape[1] < s:
                cu = cu.clamp_max(x.shape[1]).unique_consecutive()
            ctx = AttnContext(mode, start_pos, mask, self.cfg.index_topk, attn_form, layer_cache, fused, cu)
            # Recompute only where a graph runs through the block: in the warm-up the backbone is frozen and only the
            # indexer (fed detached inputs) learns, so x carries no graph and a recomputation would buy nothing.
            if (self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
                    and x.requires_grad):
                x, kl, idx, aux = self._checkpointed(block, x, c, sn, ctx, forced, v)
            else:
                x, kl, idx, aux = block(x, c, sn, ctx, forced, v)
            if kl is not None:
                kls.append(kl)
            if idx is not None:
                routes.append(idx)
            if aux is not None:
                auxes.append(aux)
            return x

        h = self.embed(tokens)                                                     # [B, S, dim]
        for i, block in enumerate(self.layers):
            forced = routing[len(routes)] if len(routes) < len(routing) else None
            h = run(block, h, cos, sin, allowed, cache.layers[i] if cache is not None else None, forced, valid)
        hidden = self.norm(h)
        logits = None if return_hidden else self.head(hidden)

        mtp_logits = None
        if len(self.mtp) and cache is None:
            mtp_logits, h_prev = [], h
            for d, layer in enumerate(self.mtp, start=1):
                n = s - d
                if n < 1:
                    break
                forced = routing[len(routes)] if len(routes) < len(routing) else None

                def block_fn(x, c, sn, ctx, f, v, layer=layer, d=d):
                    return layer(x, self.embed(tokens[:, d:]), c, sn, ctx, f, v)
                mask = allowed[:, :n, :n] if allowed is not None else None
                v = valid[:, :n] & valid[:, d:] if valid is not None else None    # h_i and token i + d both real
                h_prev = run(block_fn, h_prev[:, :-1], cos[:n], sin[:n], mask, None, forced, v)
                mtp_logits.append(self.head(layer.norm(h_prev)))

        return ModelOutput(
            logits=logits,
            hidden=hidden if return_hidden else None,
            indexer_loss=torch.stack(kls).mean() if kls else None,
            indexer_kl=kls or None,
            routing=routes if return_routing else None,
            aux_loss=torch.stack(auxes).sum() if auxes else None,
            mtp_logits=mtp_logits,
        )


def _cu_seqlens(segment_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[N+1] document boundaries of a single packed row whose segments are contiguous runs; None otherwise."""
    if segment_ids.shape[0] != 1:
        return None
    seg = segment_ids[0]
    change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    if seg[torch.cat((seg.new_zeros(1), change))].unique().numel() != change.numel() + 1:
        return None   # a segment id reappears later: not contiguous, the mask path handles it
    return torch.cat((change.new_zeros(1), change, change.new_full((1,), seg.numel()))).to(torch.int32)


# ---------------------------------------------------------------- training helpers

def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every id is in [0, vocab_size); `Transformer.forward`'s check, for host tensors."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size})")


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The lightning indexers' parameters (the only ones the dense warm-up trains)."""
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything except the indexers."""
    return [p for n, p in model.named_parameters() if ".indexer." not in n]


def set_trainable(model: nn.Module, mode: Mode) -> list[nn.Parameter]:
    """Set requires_grad for a training stage and return the parameters to optimise.
    warmup: only the indexer (paper §2.1). dense (pre-training): all but the indexer, which gets no signal there.
    sparse: everything (the detach inside MLA keeps the two losses on their own parameters)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    idx = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(mode == "sparse" or (id(p) in idx) == (mode == "warmup"))
    return [p for p in model.parameters() if p.requires_grad]


def update_router_bias(model: nn.Module) -> None:
    """Auxiliary-loss-free balancing: call once after each optimizer step (uses the loads counted since the last call).
    Under data parallelism, all-reduce each MoE's `expert_load` before calling this."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.update_bias()


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, S, V] at position i scored against tokens[:, i+1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=ignore_index)
