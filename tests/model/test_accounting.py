"""Parameter counts (meta device) and FLOPs per token against analytic counts and torch's FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsaforge.config.presets import preset
from dsaforge.model import Transformer
from dsaforge.model.accounting import (_mean_keys, count_params, flops_breakdown, flops_per_token,
                                       recompute_flops_per_token)
from tests.model.model_helpers import make_model, tiny_cfg


def _analytic_params(c):
    attn = (c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_heads * c.qk_head_dim
            + c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim) + c.n_heads * c.v_head_dim * c.dim)
    indexer = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.dim * c.index_head_dim
               + 2 * c.index_head_dim + c.dim * c.index_n_heads)
    expert = 3 * c.dim * c.moe_inter_dim
    moe_total = c.n_routed_experts * expert + c.n_shared_experts * expert + c.n_routed_experts * c.dim
    moe_active = (c.n_activated_experts + c.n_shared_experts) * expert + c.n_routed_experts * c.dim
    n_moe = c.n_layers - c.n_dense_layers
    common = c.n_layers * (attn + indexer + 2 * c.dim) + c.n_dense_layers * 3 * c.dim * c.inter_dim + c.dim
    total = common + n_moe * moe_total + 2 * c.vocab_size * c.dim
    active = common + n_moe * moe_active + c.vocab_size * c.dim          # head counts, embedding lookup does not
    return total, active


@pytest.mark.parametrize("n_dense", [0, 1, 2])
def test_tiny_counts_match_analytic_and_real_model(n_dense):
    cfg = tiny_cfg(n_dense_layers=n_dense, n_layers=3 if n_dense == 1 else 2, n_mtp_layers=1)
    total, active = count_params(cfg)
    assert (total, active) == _analytic_params(cfg)
    full = Transformer(cfg)
    assert total == sum(p.numel() for n, p in full.named_parameters() if not n.startswith("mtp."))
    assert count_params(cfg, include_mtp=True)[0] == sum(p.numel() for p in full.parameters())


def test_v32_is_671b_total_37b_activated():
    cfg = preset("v32").model
    total, active = count_params(cfg)
    assert (total, active) == _analytic_params(cfg)
    assert total == pytest.approx(671e9, rel=0.005), total
    assert active == pytest.approx(37e9, rel=0.03), active
    with_mtp, _ = count_params(cfg, include_mtp=True)
    assert with_mtp - total == pytest.approx(11.6e9, rel=0.05)   # one MoE block + eh_proj + norms


def test_small_preset_counts():
    total, active = count_params(preset("small").model)
    assert (total, active) == _analytic_params(preset("small").model)
    assert 1.0e9 < total < 1.5e9 and 0.1e9 < active < 0.3e9


def test_mean_keys_is_average_of_causal_min():
    for seq_len, k in [(10, 3), (10, 10), (10, 20), (1, 4), (37, 8)]:
        brute = sum(min(k, t) for t in range(1, seq_len + 1)) / seq_len
        assert _mean_keys(seq_len, k) == pytest.approx(brute)
    assert _mean_keys(10, None) == pytest.approx(5.5)


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_single_token_forward_flops_match_torch_counter(mode):
    # With one token every count is exact: one key, k routed experts + shared per token.
    model = make_model(n_mtp_layers=0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.tensor([[7]]), mode=mode, attn_form="mha" if mode != "sparse" else None)
    counted = counter.get_total_flops()
    expected = flops_per_token(model.cfg, 1, mode, training=False)
    if mode == "sparse":
        c = model.cfg
        # The KL target recomputes q.kv at the selected key (H x (C+R)); the accounting leaves it out.
        counted -= c.n_layers * 2 * c.n_heads * (c.kv_lora_rank + c.qk_rope_head_dim)
        # The kernel reference's p.v einsum over K=1 slot runs as a broadcast multiply, which the counter skips.
        counted += c.n_layers * 2 * c.n_heads * c.kv_lora_rank
    assert counted == pytest.approx(expected, rel=1e-9)


def test_v32_sparse_beats_dense_at_long_context_only():
    cfg = preset("v32").model
    for seq_len in (32768, 131072):
        assert flops_per_token(cfg, seq_len, "sparse") < flops_per_token(cfg, seq_len, "dense")
    # below k the absorbed (MQA) form does more work per key than MHA: no reason to go sparse
    assert flops_per_token(cfg, 2048, "sparse", training=False) > flops_per_token(cfg, 2048, "dense", training=False)
    at_128k = flops_breakdown(cfg, 131072, "sparse", training=False)
    assert at_128k["indexer"] > 0 and at_128k["total"] == at_128k["backbone"] + at_128k["indexer"]
    assert flops_per_token(cfg, 4096, "dense") == pytest.approx(3 * flops_per_token(cfg, 4096, "dense", training=False))
    with pytest.raises(ValueError, match="mode"):
        flops_per_token(cfg, 4096, "sparce")


def test_training_step_flops_with_recomputation_match_torch_counter():
    """One-token dense training step: model FLOPs + the chunked loss's head recompute without checkpointing, and
    every block's forward once more with it (what MFU "with recomputation" counts)."""
    model = make_model(n_mtp_layers=0)
    model.train()
    cfg = model.cfg

    def step(checkpointing: bool) -> int:
        model.activation_checkpointing = checkpointing
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(torch.tensor([[7]]), mode="dense", attn_form="mha", return_hidden=True)
            model.lm_loss_chunked(out.hidden, torch.tensor([[3]])).backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    plain, recomputed = step(False), step(True)
    assert plain == pytest.approx(flops_per_token(cfg, 1, "dense") + recompute_flops_per_token(cfg, 1, "dense", False),
                                  rel=1e-9)
    assert recomputed - plain == pytest.approx(
        recompute_flops_per_token(cfg, 1, "dense", True) - recompute_flops_per_token(cfg, 1, "dense", False), rel=1e-9)
    # sparse with replay: the blocks again, but of the indexer only its projections
    seq = 4096
    full = recompute_flops_per_token(cfg, seq, "sparse", True, replay_topk=False)
    replayed = recompute_flops_per_token(cfg, seq, "sparse", True, replay_topk=True)
    assert 0 < replayed < full
    assert recompute_flops_per_token(cfg, seq, "warmup", True) == 0.0        # frozen backbone: no graph to replay
