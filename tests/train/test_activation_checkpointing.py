"""train.activation_checkpointing: the trainer recomputes every block in backward and nothing else changes.
Over 2 optimizer steps of each stage (tiny preset, fp32, CPU) the losses, every gradient, the weights and the
routers' load counts and correction bias equal those of the run that keeps its activations; and the blocks really
run twice per step (the recomputation), while the routers count each token once.

Run: python -m pytest tests/train/test_activation_checkpointing.py -q
"""
import pytest
import torch

from dsaforge.config import load_config
from dsaforge.model.moe import MoE
from dsaforge.model.transformer import Block
from dsaforge.model.train.trainer import Trainer

STEPS = 2


def _run(tiny_data, tmp_path, stage: str, checkpointing: bool) -> dict:
    cfg = load_config("tiny", overrides=[f"train.activation_checkpointing={str(checkpointing).lower()}",
                                         f"train.{stage}.batch_size=4", f"train.{stage}.micro_batch_size=2",
                                         f"train.{stage}.seq_len=64", "train.device=cpu"])
    tr = Trainer(cfg, stage, tiny_data, tmp_path / f"{stage}-{checkpointing}")
    assert tr.model.activation_checkpointing is checkpointing
    moes = [m for m in tr.model.modules() if isinstance(m, MoE)]
    calls = {"n": 0}
    blocks = [m for m in tr.model.modules() if isinstance(m, Block)]
    for m in blocks:
        m.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    steps = []
    for _ in range(STEPS):
        metrics = tr.train_step()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        steps.append((metrics, grads))
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    state.update({f"{i}.bias": m.gate.bias.clone() for i, m in enumerate(moes)})
    return {"steps": steps, "state": state, "calls": calls["n"], "n_blocks": len(blocks), "micro": 2}


@pytest.mark.parametrize("stage", ["pretrain", "warmup", "sparse"])
def test_checkpointing_changes_nothing_but_memory(tiny_data, tmp_path, stage):
    keep = _run(tiny_data, tmp_path, stage, False)
    ckpt = _run(tiny_data, tmp_path, stage, True)
    for (m0, g0), (m1, g1) in zip(keep["steps"], ckpt["steps"]):
        for key in [k for k in m0 if k.startswith("train/") and k != "train/lr"]:
            print(f"\n{stage} {key}: {m0[key]:.8f} vs {m1[key]:.8f}")
            assert m1[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-7), key
        assert g0.keys() == g1.keys() and g0
        worst = max(float((g1[n] - g0[n]).abs().max() / max(1.0, float(g0[n].abs().max()))) for n in g0)
        print(f"{stage} grads: max relative difference {worst:.2e}")
        assert worst <= 1e-6
    for k, v in keep["state"].items():
        assert torch.allclose(ckpt["state"][k], v, rtol=1e-6, atol=1e-7), k
    # Recomputation ran: each micro-batch enters each block twice with checkpointing (forward, then backward;
    # a pre-hook, because the recomputation stops as soon as it has rebuilt what backward needs). Not in the
    # warm-up: the backbone is frozen there, no graph runs through a block, and recomputing it would buy nothing.
    per_pass = STEPS * keep["micro"] * keep["n_blocks"]
    assert keep["calls"] == per_pass and ckpt["calls"] == (1 if stage == "warmup" else 2) * per_pass


def test_recomputation_counts_router_load_once(tiny_data, tmp_path):
    """The routers' token counts (which drive the auxiliary-loss-free bias update) count each token once."""
    cfg = load_config("tiny", overrides=["train.activation_checkpointing=true", "train.device=cpu"])
    tr = Trainer(cfg, "pretrain", tiny_data, tmp_path / "load")
    model = tr.model.train()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33))
    out = model(tokens[:, :-1], mode="dense", return_routing=True)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m, r in zip(moes, out.routing):
        want = torch.bincount(r.flatten(), minlength=m.n_experts).float()
        assert torch.equal(m.expert_load, want)
        assert m.count_load                                   # restored after the recomputation


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_recomputation_replays_the_forwards_topk(monkeypatch, fused):
    """Sparse mode under checkpointing selects each layer's top-k once (the recomputation reuses the forward's
    indices) and still gives the gradients of the run that keeps its activations; replay_topk=False selects twice."""
    from dsaforge import kernels
    from dsaforge.model import Transformer
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    model.fused_dsa = fused                      # on CPU the fused entry points run their torch references
    name = "indexer_topk" if fused else "topk_indices"
    calls = {"n": 0}
    real = getattr(kernels, name)

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(kernels, name, counted)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 97))

    def run(checkpointing: bool, replay: bool):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing, model.replay_topk = checkpointing, replay
        calls["n"] = 0
        out = model(tokens[:, :-1], mode="sparse")
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.indexer_loss).backward()
        return calls["n"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n_keep, g_keep = run(False, True)
    n_replay, g_replay = run(True, True)
    n_again, g_again = run(True, False)
    layers = cfg.model.n_layers
    assert (n_keep, n_replay, n_again) == (layers, layers, 2 * layers)
    for g in (g_replay, g_again):
        assert g.keys() == g_keep.keys()
        worst = max(float((g[n] - g_keep[n]).abs().max()) for n in g_keep)
        print(f"fused={fused}: max gradient difference {worst:.2e}")
        assert worst <= 1e-6


def test_sparse_kl_target_comes_from_the_forward_once(monkeypatch):
    """Fused sparse path under checkpointing with replay: the KL target comes out of each layer's sparse MLA forward
    (target=True once per layer, not in the recomputation), no separate target computation runs, and the gradients
    equal those of the separate-target path (DSAFORGE_FUSED_TARGET=0)."""
    from dsaforge import kernels
    from dsaforge.kernels import reference
    from dsaforge.model import Transformer
    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    model.fused_dsa, model.activation_checkpointing, model.replay_topk = True, True, True
    calls = {"with_target": 0, "plain": 0, "separate_target": 0}
    real_mla, real_target = kernels.sparse_mla, reference.attention_target

    def mla(*a, target=False, **k):
        calls["with_target" if target else "plain"] += 1
        return real_mla(*a, target=target, **k)

    def separate(q, kv, lse, sm_scale, indices=None, cu_seqlens=None):
        calls["separate_target"] += indices is not None
        return real_target(q, kv, lse, sm_scale, indices, cu_seqlens)

    monkeypatch.setattr(kernels, "sparse_mla", mla)
    monkeypatch.setattr(reference, "attention_target", separate)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 97))

    def run():
        model.zero_grad(set_to_none=True)
        for key in calls:
            calls[key] = 0
        out = model(tokens[:, :-1], mode="sparse")
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.indexer_loss).backward()
        return dict(calls), out.indexer_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}

    layers = cfg.model.n_layers
    fused_calls, kl, grads = run()
    assert fused_calls == {"with_target": layers, "plain": layers, "separate_target": 0}
    monkeypatch.setenv("DSAFORGE_FUSED_TARGET", "0")
    sep_calls, kl_sep, grads_sep = run()
    # (the CPU fallback of indexer_kl keeps no memo, so there the recomputation computes its target again)
    assert sep_calls["with_target"] == 0 and sep_calls["plain"] == 2 * layers and sep_calls["separate_target"] >= layers
    torch.testing.assert_close(kl, kl_sep, atol=1e-6, rtol=1e-6)
    assert grads.keys() == grads_sep.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_sep[n], atol=1e-6, rtol=1e-5)
