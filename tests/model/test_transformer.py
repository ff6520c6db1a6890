"""Whole-model behaviour: causality and packing in every mode, gradient isolation, cached decode, routing replay."""
import copy

import pytest
import torch

from dsaforge.model import (Indexer, MoE, Transformer, backbone_parameters, indexer_parameters, lm_loss,
                            set_trainable, update_router_bias)
from dsaforge.kernels import topk_indices
from tests.model.model_helpers import make_model, rand_tokens

MODES = [("dense", None), ("dense", "mqa"), ("warmup", None), ("sparse", None), ("sparse", "mha")]


@pytest.fixture(scope="module")
def model():
    return make_model(index_topk=5, n_mtp_layers=1)


@pytest.mark.parametrize("mode,form", MODES)
def test_future_tokens_never_change_earlier_logits(model, mode, form):
    a = rand_tokens(2, 16)
    b = a.clone()
    b[:, 9:] = rand_tokens(2, 7, seed=5)
    oa, ob = model(a, mode=mode, attn_form=form), model(b, mode=mode, attn_form=form)
    torch.testing.assert_close(oa.logits[:, :9], ob.logits[:, :9], atol=1e-5, rtol=1e-5)
    assert (oa.logits[:, 9:] - ob.logits[:, 9:]).abs().max() > 1e-3
    # MTP depth 1 at position i reads token i+1
    torch.testing.assert_close(oa.mtp_logits[0][:, :8], ob.mtp_logits[0][:, :8], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_packed_documents_do_not_see_each_other(model, mode):
    doc_a, doc_b = rand_tokens(2, 9, seed=2), rand_tokens(2, 11, seed=3)
    seg = torch.tensor([0] * 9 + [1] * 11).expand(2, 20)
    packed = model(torch.cat((doc_a, doc_b), 1), mode=mode, segment_ids=seg)
    # RoPE is relative, so a document scores the same wherever it sits in the pack.
    torch.testing.assert_close(packed.logits[:, :9], model(doc_a, mode=mode).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logits[:, 9:], model(doc_b, mode=mode).logits, atol=1e-5, rtol=1e-5)


def _grads(params):
    return [p.grad for p in params]


def _nonzero(g):
    return g is not None and g.abs().sum() > 0


def test_sparse_losses_reach_disjoint_parameters():
    model = make_model(index_topk=5, n_mtp_layers=1)
    tokens = rand_tokens(2, 16)
    out = model(tokens, mode="sparse")
    idx, backbone = indexer_parameters(model), backbone_parameters(model)
    assert len(idx) == 3 * 5 and len(backbone) > len(idx)   # 3 blocks (2 + MTP) x (wq_b, wk, weights_proj, k_norm w, b)
    out.indexer_loss.backward(retain_graph=True)
    assert all(_nonzero(g) for g in _grads(idx))
    assert not any(_nonzero(g) for g in _grads(backbone))
    model.zero_grad(set_to_none=True)
    (lm_loss(out.logits, tokens) + lm_loss(out.mtp_logits[0], tokens[:, 1:])).backward()
    assert not any(_nonzero(g) for g in _grads(idx))
    assert sum(_nonzero(g) for g in _grads(backbone)) > 0.9 * len(backbone)


def test_warmup_trains_only_the_indexer():
    model = make_model(index_topk=5)
    tokens = rand_tokens(2, 16)
    trainable = set_trainable(model, "warmup")
    assert {id(p) for p in trainable} == {id(p) for p in indexer_parameters(model)}
    assert not any(p.requires_grad for p in backbone_parameters(model))
    out = model(tokens, mode="warmup")
    assert out.indexer_loss > 0 and len(out.indexer_kl) == 2
    out.indexer_loss.backward()
    assert all(_nonzero(p.grad) for p in indexer_parameters(model))
    # dense attention: the indexer has no say in the logits during warm-up, but it does in sparse mode
    before_w, before_s = out.logits.detach(), model(tokens, mode="sparse").logits
    with torch.no_grad():
        for p in indexer_parameters(model):
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(model(tokens, mode="warmup").logits, before_w)
    assert (model(tokens, mode="sparse").logits - before_s).abs().max() > 1e-4
    assert len(set_trainable(model, "sparse")) == len(list(model.parameters()))
    assert {id(p) for p in set_trainable(model, "dense")} == {id(p) for p in backbone_parameters(model)}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("grad", [False, True])      # no_grad reads cache views; with grad the new chunk stays live
def test_cached_decode_equals_full_forward(model, mode, grad):
    tokens = rand_tokens(2, 18)
    full = model(tokens, mode=mode).logits
    cache = model.new_cache(2, 24)
    with torch.set_grad_enabled(grad):
        steps = [model(tokens[:, :6], mode=mode, cache=cache).logits,                  # prefill
                 model(tokens[:, 6:10], mode=mode, cache=cache, start_pos=6).logits]   # chunked prefill
        steps += [model(tokens[:, t:t + 1], mode=mode, cache=cache, start_pos=t).logits for t in range(10, 18)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sparse_decode_reads_only_the_selected_entries(model):
    tokens = rand_tokens(1, 16)
    cache = model.new_cache(1, 16)
    model(tokens[:, :15], mode="sparse", cache=cache)
    snapshot = copy.deepcopy(cache)
    picked = []
    hooks = [m.register_forward_hook(lambda mod, args, out: picked.append(topk_indices(out, 5)))
             for m in model.layers.modules() if isinstance(m, Indexer)]
    ref = model(tokens[:, 15:], mode="sparse", cache=cache, start_pos=15).logits
    for h in hooks:
        h.remove()
    assert len(picked) == len(model.layers)
    g = torch.Generator().manual_seed(0)
    for layer, sel in zip(snapshot.layers, picked):
        unread = torch.ones(15, dtype=torch.bool)
        unread[sel[0, 0].long()] = False
        assert unread.sum() == 15 - 5
        layer.kv[0, :15][unread] = 100 * torch.randn(int(unread.sum()), layer.kv.shape[-1], generator=g)
    out = model(tokens[:, 15:], mode="sparse", cache=snapshot, start_pos=15).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_routing_replay_reproduces_logits(model):
    tokens = rand_tokens(2, 12)
    m = copy.deepcopy(model)
    out = m(tokens, mode="sparse", return_routing=True)
    assert len(out.routing) == m.n_moe_layers + 1 and out.routing[-1].shape == (2, 11, 2)   # + the MTP layer
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, MoE):
                mod.gate.bias.normal_(0, 10.0)
    assert (m(tokens, mode="sparse").logits - out.logits).abs().max() > 1e-4
    replay = m(tokens, mode="sparse", routing=out.routing, return_routing=True)
    torch.testing.assert_close(replay.logits, out.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(replay.mtp_logits[0], out.mtp_logits[0], atol=1e-6, rtol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(replay.routing, out.routing))
    lm_loss(replay.logits, tokens).backward()
    gate = next(mod.gate for mod in m.layers.modules() if isinstance(mod, MoE))
    assert _nonzero(gate.weight.grad)
    # main layers only: the MTP layer routes freely
    assert m(tokens, routing=out.routing[:-1]).logits.shape == out.logits.shape


def test_router_bias_update_after_step():
    model = make_model(bias_update_speed=0.01).train()
    biases = [m.gate.bias.clone() for m in model.modules() if isinstance(m, MoE)]
    model(rand_tokens(2, 16))
    update_router_bias(model)
    after = [m.gate.bias for m in model.modules() if isinstance(m, MoE)]
    for a, b in zip(after, biases):
        step = (a - b).abs()
        assert ((step - 0.01).abs() < 1e-6).logical_or(step < 1e-9).all()   # sign step of 0.01 (0 at mean load)
        assert (step > 0).any()


def test_bfloat16_keeps_router_bias_and_rope_in_fp32():
    model = make_model(index_topk=5)
    before = [m.gate.bias.clone() for m in model.modules() if isinstance(m, MoE)]
    model = model.to(torch.bfloat16)
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    assert all(g.bias.dtype == torch.float32 and torch.equal(g.bias, b) for g, b in zip(gates, before))
    out = model(rand_tokens(1, 10), mode="sparse")
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_bad_inputs_name_the_problem(model):
    t = rand_tokens(2, 8)
    cases = [
        (lambda: model(t[0]), "tokens must be an integer tensor"),
        (lambda: model(t.float()), "tokens must be an integer tensor"),
        (lambda: model(t, mode="sparce"), "mode must be one of"),
        (lambda: model(t, start_pos=3), "needs a cache"),
        (lambda: model(t + 5000), "vocab_size"),
        (lambda: model(rand_tokens(1, 600)), "max_seq_len"),
        (lambda: model(t, segment_ids=torch.zeros(2, 7, dtype=torch.long)), "segment_ids shape"),
        (lambda: model(t, routing=[None] * 5), "routing has 5 entries"),
        (lambda: model(t, routing=[torch.zeros(2, 8, 3, dtype=torch.long)]), r"routing\[0\] must be"),
        (lambda: model(t, routing=[torch.full((2, 8, 2), 9)]), "outside"),
        (lambda: model(t, routing=[torch.zeros(2, 8, 2, dtype=torch.long)]), "repeats an expert"),
        (lambda: model(t, cache=model.new_cache(1, 8)), "cache holds batch 1"),
        (lambda: model(t, attn_form="gqa"), "attn_form"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.parametrize("over,msg", [
    ({"n_dense_layers": 3}, "n_dense_layers"),
    ({"n_routed_experts": 6}, "divisible by n_expert_groups"),
    ({"n_expert_groups": 8, "n_limited_groups": 4}, "needs >= 2 experts"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"index_head_dim": 4}, "index_head_dim"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
])
def test_bad_configs_name_the_problem(over, msg):
    from dsaforge.config.presets import tiny
    cfg = tiny().model
    for k, v in over.items():
        setattr(cfg, k, v)          # presets assign fields one by one, unvalidated; the model re-validates
    with pytest.raises(ValueError, match=msg):
        Transformer(cfg)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_long_context_path_matches_materialised(mode, packed, monkeypatch):
    from dsaforge import kernels
    calls = []
    real = kernels.indexer_kl
    monkeypatch.setattr(kernels, "indexer_kl", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = make_model(index_topk=5, n_mtp_layers=1)
    if packed:
        tokens, seg = rand_tokens(1, 20), torch.tensor([[0] * 7 + [1] * 9 + [2] * 4])
    else:
        tokens, seg = rand_tokens(2, 16), None
    outs, grads = [], []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        model.fused_dsa = fused
        out = model(tokens, mode=mode, segment_ids=seg)
        out.indexer_loss.backward(retain_graph=True)
        outs.append(out)
        grads.append([p.grad.clone() for p in indexer_parameters(model)])
    model.fused_dsa = False
    assert len(calls) == 3                                   # 2 layers + MTP took the fused path
    assert (calls[0]["cu_seqlens"] is not None) == packed and (calls[0].get("indices") is None) == (mode == "warmup")
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].mtp_logits[0], outs[0].mtp_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].indexer_loss, outs[0].indexer_loss, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mtp_depth_one_is_eh_proj_of_next_embedding_and_hidden_state(model):
    """MTP (DeepSeek-V3 §2.2): h' = eh_proj([RMSNorm(emb(t_{i+1})); RMSNorm(h_i)]) -> block -> norm -> shared head."""
    tokens = rand_tokens(2, 14)
    captured = []
    hook = model.layers[-1].register_forward_hook(lambda mod, a, o: captured.append(o[0]))
    out = model(tokens, mode="dense")
    hook.remove()
    h = captured[0]                                                         # last main block output, before norm
    mtp = model.mtp[0]

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps) * w
    x = torch.cat((rms(model.embed(tokens[:, 1:]), mtp.enorm.weight), rms(h[:, :-1], mtp.hnorm.weight)), -1)
    x = x @ mtp.eh_proj.weight.T
    from dsaforge.kernels import causal_mask
    from dsaforge.model.attention import AttnContext
    cos, sin = model.rope(tokens.device)
    y = mtp.block(x, cos[:13], sin[:13], AttnContext("dense", 0, causal_mask(13, 13)[None], 5))[0]
    ref = rms(y, mtp.norm.weight) @ model.head.weight.T
    torch.testing.assert_close(out.mtp_logits[0], ref, atol=1e-5, rtol=1e-5)


def test_fused_path_cached_decode_equals_full_forward():
    model = make_model(index_topk=5)
    tokens = rand_tokens(2, 16)
    full = model(tokens, mode="sparse").logits
    model.fused_dsa = True
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        steps = [model(tokens[:, :8], mode="sparse", cache=cache).logits]
        steps += [model(tokens[:, t:t + 1], mode="sparse", cache=cache, start_pos=t).logits for t in range(8, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_indexer_trains_even_if_the_score_kernel_has_no_backward(mode, monkeypatch):
    """On GPU kernels.indexer_scores is a forward-only Triton kernel; the KL must still reach the indexer."""
    from dsaforge import kernels
    ref = kernels.reference.indexer_scores
    monkeypatch.setattr(kernels, "indexer_scores", lambda *a, **kw: ref(*a, **kw).detach())
    model = make_model(index_topk=5)
    model(rand_tokens(2, 12), mode=mode).indexer_loss.backward()
    assert all(_nonzero(p.grad) for p in indexer_parameters(model))
