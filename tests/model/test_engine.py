"""The rollout engine against independent references: a full forward of the model over each finished sequence
(log-probs, routing, indexer top-k; dense and sparse, ragged batches, rows finishing at different steps, slots
reused), transformers' DeepseekV32ForCausalLM greedy decoding on an exported checkpoint, and the target
distribution of temperature / top-k / top-p sampling on an enumerable case."""
import math

import numpy as np
import pytest
import torch

from dsaforge import kernels
from dsaforge.model import Indexer
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import (SamplingParams, draw_bits, processed_logits, sample, sequence_stream,
                                     to_uniforms)
from tests.model.model_helpers import make_model, one_thread, random_prompts  # noqa: F401 (one_thread: autouse)

# top-k 8 with prompts up to 24 tokens: the sparse path really selects; 16 indexer heads keep scores untied
SHAPE = dict(index_topk=8, index_n_heads=16)
TOL = 2e-4


def _full_logprobs(model, prompt, tokens, mode, temperature=1.0):
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(seq, mode=mode).logits[0].float() / temperature
    lp = logits.log_softmax(-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return lp[pos, torch.tensor(tokens)], logits[pos]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_logprobs_routing_and_topk_equal_a_full_forward(mode):
    model = make_model(seed=2, **SHAPE)
    prompts = random_prompts([5, 17, 24, 9], model.cfg.vocab_size)
    params = [SamplingParams(temperature=1.0, max_new_tokens=m) for m in (7, 3, 11, 5)]   # finish at different steps
    # prefill_tokens=12: longer prompts are prefilled in chunks over several steps, next to other rows' decoding
    engine = Engine(model, mode=mode, max_batch=2, max_len=64, capture_routing=True, capture_topk=True,
                    prefill_tokens=12)
    outs = engine.generate(prompts, params)          # 4 prompts through 2 slots: freed slots take new rows
    scores, hooks = [], [m.register_forward_hook(lambda mod, a, o: scores.append(o)) for m in model.modules()
                         if isinstance(m, Indexer)]
    for p, sp, out in zip(prompts, params, outs):
        assert len(out.tokens) == sp.max_new_tokens and out.finish_reason == "length"
        want, _ = _full_logprobs(model, p, out.tokens, mode)
        got = torch.tensor(out.logprobs)
        print(f"{mode} len {len(p)}: max |dlogp| {(got - want).abs().max():.2e}")
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        # routing and indexer top-k at every fed position (all but the last token)
        seq = torch.tensor([p + out.tokens])
        scores.clear()
        with torch.no_grad():
            ref = model(seq, mode="sparse" if mode == "sparse" else "dense", return_routing=True)
        n = len(p) + len(out.tokens) - 1
        want_routing = torch.stack(ref.routing, 2)[0, :n].sort(-1).values
        assert out.routing.shape == (n, model.n_moe_layers, model.cfg.n_activated_experts)
        assert torch.equal(torch.from_numpy(out.routing).long().sort(-1).values, want_routing)
        if mode == "sparse":
            for layer, s in enumerate(scores):
                masked = s.masked_fill(~kernels.causal_mask(s.shape[1], s.shape[2])[None], float("-inf"))
                want_idx = kernels.topk_indices(masked, model.cfg.index_topk)[0, :n]
                got_idx = torch.from_numpy(out.topk[:, layer, :want_idx.shape[-1]])
                assert torch.equal(got_idx.sort(-1).values, want_idx.long().sort(-1).values), layer
    for h in hooks:
        h.remove()
    assert engine.stats["generated_tokens"] == sum(sp.max_new_tokens for sp in params)


def test_stop_tokens_and_continuing_a_sequence_extends_its_cache():
    """A segment ends at a stop token; submitting more tokens to the same sequence continues from its cache, and the
    continuation's log-probs equal a full forward over the whole sequence."""
    model = make_model(seed=3, **SHAPE)
    prompt = random_prompts([11], model.cfg.vocab_size)[0]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    engine = Engine(model, mode="sparse", max_batch=3, max_len=96)
    first = engine.generate([prompt], greedy)[0].tokens
    stop = SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(first[2],))
    sid = engine.submit(prompt, stop)
    (_, seg), = [d for _ in range(10) for d in engine.step()][:1]
    assert seg.tokens == first[:3] and seg.finish_reason == "stop"
    extra = random_prompts([7], model.cfg.vocab_size, seed=9)[0]
    engine.submit(extra, SamplingParams(temperature=1.0, max_new_tokens=5), sid=sid)
    ended = []
    while not ended:
        ended = engine.step()
    (_, seg2), = ended
    history = engine.tokens(sid)
    assert history == prompt + seg.tokens + extra + seg2.tokens
    want, _ = _full_logprobs(model, prompt + seg.tokens + extra, seg2.tokens, "sparse")
    torch.testing.assert_close(torch.tensor(seg2.logprobs), want, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="not paused"):
        engine.submit([1], stop, sid=12345)


def test_kept_sets_and_truncated_logprobs_match_the_forward():
    model = make_model(seed=4, **SHAPE)
    prompts = random_prompts([6, 13], model.cfg.vocab_size)
    sp = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=6)
    outs = Engine(model, mode="dense", max_batch=2, max_len=64, capture_kept=True).generate(prompts, sp)
    for p, out in zip(prompts, outs):
        _, logits = _full_logprobs(model, p, out.tokens, "dense", temperature=0.8)
        for i, (tok, kept) in enumerate(zip(out.tokens, out.kept)):
            assert tok in kept and 1 <= len(kept) <= 5
            top = logits[i].topk(5).indices
            assert set(kept.tolist()) <= set(top.tolist())
            want = logits[i][kept].log_softmax(-1)[kept.tolist().index(tok)]
            assert abs(out.logprobs[i] - float(want)) < TOL


def _target(logits, temperature, top_k, top_p):
    """Independent numpy statement of the truncated distribution."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, np.exp(x - x.max()), 0)
    p /= p.sum()
    mass = 0.0
    for i in order:
        if not keep[i]:
            continue
        if mass >= top_p:
            keep[i] = False
        mass += p[i]
    p = np.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.75)])
def test_sampling_matches_the_target_distribution(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.5, 0.9, -2.0])
    target = _target(logits.numpy(), temperature, top_k, top_p)
    n = 200_000
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    u = to_uniforms(draw_bits([sequence_stream(0, key) for key in range(n)], [0] * n))   # n sequences' first draws
    toks, lps, kept = sample(logits.expand(n, -1), [sp] * n, u, want_kept=True)
    freq = np.bincount(toks.numpy(), minlength=len(target)) / n
    print("target", np.round(target, 4), "\nfreq  ", np.round(freq, 4))
    assert np.abs(freq - target).max() < 4 * math.sqrt(0.25 / n) + 1e-9
    assert np.allclose(lps.numpy(), np.log(target[toks.numpy()]), atol=1e-5)
    if kept is not None:
        assert np.array_equal(kept[0].numpy(), target > 0)


def test_engine_first_token_distribution():
    """Through the whole engine: the first sampled token of many identical prompts follows softmax(logits/T) over
    the top-k of a full forward."""
    model = make_model(seed=6, **SHAPE)
    prompt = random_prompts([8], model.cfg.vocab_size)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    sp = SamplingParams(temperature=2.0, top_k=3, max_new_tokens=1)
    target = _target(logits.numpy(), 2.0, 3, 1.0)
    outs = Engine(model, mode="dense", max_batch=128, max_len=16, seed=1).generate([prompt] * 1200, sp)
    freq = np.bincount([o.tokens[0] for o in outs], minlength=len(target)) / len(outs)
    assert np.abs(freq - target).max() < 4 * math.sqrt(0.25 / len(outs))
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(target))


def test_processed_logits_keeps_ties_and_one_token():
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    out = processed_logits(x, torch.ones(2), torch.tensor([1.0, 0.01]), torch.tensor([2, 0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]     # the k-th place is tied three ways
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]   # top-p below the first token's mass


def test_stacked_experts_path_equals_a_full_forward():
    """The GPU's sync-free MoE paths (stacked experts: the dense form in decode, 8 rows x 2 slots = 2 x 8 experts)
    run on CPU when given the stacked weights, and still equal a full forward."""
    from dsaforge.model import MoE
    from dsaforge.model.infer import stack

    model = make_model(seed=2, **SHAPE)
    prompts = random_prompts([5, 17, 24, 9], model.cfg.vocab_size)
    engine = Engine(model, mode="sparse", max_batch=8, max_len=64, capture_routing=True)
    engine.stacked = [stack(b.ffn) if isinstance(b.ffn, MoE) else None for b in model.layers]
    for p, out in zip(prompts, engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6))):
        want, _ = _full_logprobs(model, p, out.tokens, "sparse")
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 0), (1.0, 5), (0.9, 5)])
def test_processed_logits_skips_only_unused_truncations(top_p, top_k):
    """The sampler skips top-k / top-p kernels when no row uses them; every row's kept set is unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g)
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3])
    tp, tk = torch.full((4,), top_p), torch.full((4,), top_k)
    want = processed_logits(x, temp, tp, tk)
    got = processed_logits(x, temp, tp, tk, any_top_k=top_k > 0, any_top_p=top_p < 1)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)], rtol=0, atol=0)


def test_bad_requests_are_rejected():
    model = make_model(seed=1)
    engine = Engine(model, mode="dense", max_batch=1, max_len=32)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([model.cfg.vocab_size], SamplingParams())
    with pytest.raises(ValueError, match="max_len"):
        engine.submit([1] * 40, SamplingParams())
    with pytest.raises(ValueError, match="mode"):
        Engine(model, mode="warmup")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    # a sequence reaching the cache's end finishes with "context"
    out = engine.generate([[1] * 28], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert out.finish_reason == "context" and len(out.tokens) == 4
    # a trainer's model keeps its mode (and its MoE load counters stay untouched by generation)
    model.train()
    Engine(model, mode="dense", max_batch=1, max_len=32).generate([[3, 4]], SamplingParams(max_new_tokens=3))
    assert model.training and all(float(m.expert_load.sum()) == 0 for m in model.modules() if hasattr(m, "expert_load"))


def test_greedy_equals_transformers_on_an_exported_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dsaforge.model.hf import export_hf

    model = make_model(seed=3, **SHAPE)
    export_hf(model, tmp_path)
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    prompts = random_prompts([6, 15, 10], model.cfg.vocab_size, seed=11)
    new = 12
    outs = Engine(model, mode="sparse", max_batch=3, max_len=64).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=new))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert out.tokens == ref, (len(p), out.tokens, ref)
