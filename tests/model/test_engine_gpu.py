"""The rollout engine on a GPU: bf16, Triton kernels, CUDA-graph decode. Run with `make gpu-test` on one GPU.

Two bf16 computations of the same sequence (the engine's prefill-then-decode and one full forward) sum in different
orders, so where two experts' router scores or two keys' index scores are within bf16 noise of each other they may
choose differently, and one flipped expert moves a token's log-prob by up to nats (1.47 measured on an H200 with
free routing). So the comparisons are split by what each can check exactly:
- fp32 on the GPU, torch reference kernels (no TF32 anywhere): CUDA-graph decode and eager decode equal a full
  forward to 1e-3 in log-prob, with identical routing and top-k (the CPU tests' check, with graphs and GPU sampling);
- bf16 with the Triton kernels: graph decode equals eager decode, and the engine equals a full forward run with the
  engine's own expert choices forced (Keep Routing, `forward(routing=...)`, as RL's trainer replays them); the
  indexer's top-k may differ from the full forward's only between keys whose index scores are within bf16 noise,
  and the log-prob comparison forces the engine's top-k too (the same replay, for the indexer).
Either test fails for an engine that reads the wrong cache column, position, slot or key.
"""
import pytest
import torch

from dsaforge import kernels
from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams
from tests.model.model_helpers import make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = (5, 40, 17, 90)


def _prompts(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(16, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _run(model, mode, prompts, graphs, max_batch=3):
    eng = Engine(model, mode=mode, max_batch=max_batch, max_len=160, cuda_graphs=graphs, capture_routing=True,
                 capture_topk=mode == "sparse")
    out = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24))
    if graphs:
        assert eng.stats["cuda_graphs"] == "on", eng.stats["cuda_graphs"]
    return out


def _full(model, mode, seq, routing=None, topk=None):
    """A full forward over seq: (log-softmax [S, V], its routing [S, n_moe, k], each layer's masked index scores
    [S, T] as computed). routing [S, n_moe, k] forces the experts (Keep Routing); topk [S, n_layers, K] forces the
    indexer's selection (test instrumentation: the computed scores are kept for the caller, and the selected keys
    get a bonus that puts exactly them in the top-k)."""
    dev = model.embed.weight.device
    causal = kernels.causal_mask(len(seq), len(seq), dev)
    scores = []

    def hook(layer):
        def fn(mod, args, out):
            scores.append(out[0].float().masked_fill(~causal, float("-inf")))
            if topk is None:
                return None
            sel = torch.as_tensor(topk[:, layer], device=dev).long()                  # [S, K], -1 = empty
            bonus = torch.zeros_like(out[0]).scatter_(1, sel.clamp_min(0), 1e4)
            bonus = bonus.masked_fill(~causal, 0.0)        # (-1 slots scatter to key 0, always visible: it is selected
            return out + bonus[None]                       #  whenever a row has fewer than K keys)
        return fn

    hooks = [block.attn.indexer.register_forward_hook(hook(i)) for i, block in enumerate(model.layers)]
    try:
        with torch.no_grad():
            out = model(torch.tensor([seq], device=dev), mode=mode, return_routing=True,
                        routing=None if routing is None else [r[None] for r in torch.as_tensor(
                            routing, device=dev).long().unbind(1)])
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0].float().log_softmax(-1), torch.stack(out.routing, 2)[0], scores


def _target(lp, prompt, tokens):
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1, device=lp.device)
    return lp[pos, torch.tensor(tokens, device=lp.device)].cpu()


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_fp32_graph_and_eager_decode_equal_a_full_forward(mode, monkeypatch):
    monkeypatch.setenv("DSAFORGE_KERNELS", "reference")      # fp32 Triton dots would run in TF32
    check_fp32(make_model(seed=2, index_topk=8, index_n_heads=16).cuda(), mode, (True, False))


def check_fp32(model, mode, graph_options):
    prompts = _prompts(model.cfg.vocab_size)
    for graphs in graph_options:
        for p, x in zip(prompts, _run(model, mode, prompts, graphs)):
            lp, routing, scores = _full(model, mode, (p + x.tokens)[:-1])
            got, want = torch.tensor(x.logprobs), _target(lp, p, x.tokens)
            print(f"fp32 {mode} graphs={graphs} len {len(p)}: max |dlogp| {(got - want).abs().max():.2e}")
            torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
            assert torch.equal(torch.from_numpy(x.routing).long().sort(-1).values, routing.cpu().sort(-1).values)
            for layer, s in enumerate(scores):
                want_idx = kernels.topk_indices(s, model.cfg.index_topk).long().sort(-1).values.cpu()
                got_idx = torch.from_numpy(x.topk[:, layer, :want_idx.shape[-1]]).long().sort(-1).values
                assert torch.equal(got_idx, want_idx), (graphs, len(p), layer)


def _topk_flips(x, scores, top_k: int, tol: float = 0.05) -> int:
    """Positions x layers where the engine's top-k differs from the one a full forward computes, asserting that
    each difference swaps keys whose index scores lie within tol x the row's largest |score| (a bf16 near-tie)."""
    flips = 0
    for layer, s in enumerate(scores):
        want = kernels.topk_indices(s, top_k).long().cpu()
        got = torch.from_numpy(x.topk[:, layer, :want.shape[-1]]).long()
        for pos in range(got.shape[0]):
            a, b = set(got[pos].tolist()) - {-1}, set(want[pos].tolist()) - {-1}
            if a == b:
                continue
            row = s[pos].cpu()
            only_engine, only_full = row[sorted(a - b)], row[sorted(b - a)]
            assert len(a) == len(b), f"layer {layer} position {pos}: the engine selects {len(a)} keys, not {len(b)}"
            gap = (only_full.max() - only_engine.min()).item()
            assert gap <= tol * row[torch.isfinite(row)].abs().max().item(), \
                f"layer {layer} position {pos}: the engine's top-k drops keys {sorted(b - a)} (scores " \
                f"{only_full.tolist()}) for {sorted(a - b)} ({only_engine.tolist()}): not a bf16 near-tie"
            flips += 1
    return flips


def check_bf16(model, mode, graphs=True, max_batch=3):
    prompts = _prompts(model.cfg.vocab_size)
    a = _run(model, mode, prompts, graphs, max_batch)
    b = _run(model, mode, prompts, False, max_batch)
    agree = total = flips = 0
    for x, y, p in zip(a, b, prompts):
        # graph vs eager: the same kernels in the same order, so the same tokens up to bf16 ties in the argmax
        n = next((i for i, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), len(x.tokens))
        assert n >= 8, (len(p), x.tokens, y.tokens)
        torch.testing.assert_close(torch.tensor(x.logprobs[:n]), torch.tensor(y.logprobs[:n]), atol=0.05, rtol=0)
        # engine vs a full forward over the same tokens with the engine's experts (and top-k) forced
        seq = p + x.tokens
        lp, free, scores = _full(model, mode, seq[:-1], routing=x.routing, topk=x.topk)
        forced = torch.from_numpy(x.routing).long().to(free.device)
        agree += (free.sort(-1).values == forced.sort(-1).values).all(-1).sum().item()
        total += free.shape[0] * free.shape[1]
        if mode == "sparse":
            flips += _topk_flips(x, scores, model.cfg.index_topk)
        got, want = torch.tensor(x.logprobs), _target(lp, p, x.tokens)
        print(f"bf16 {mode} len {len(p)}: max |dlogp| vs full forward with kept routing and top-k "
              f"{(got - want).abs().max():.3f}")
        torch.testing.assert_close(got, want, atol=0.1, rtol=0)
    # free choices: the same experts and keys almost everywhere (a wrong engine would route most tokens elsewhere)
    print(f"bf16 {mode}: the full forward's own routing equals the engine's at {agree}/{total} (position, layer); "
          f"{flips} top-k near-tie flips")
    assert agree >= 0.9 * total


# max_batch 3: slots are reused and decode routes through the grouped expert product; 8: decode's 8 x 2 token
# slots reach 2 x 8 experts, the dense form (`infer.all_experts`)
@pytest.mark.parametrize("max_batch", [3, 8])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_bf16_graph_decode_equals_eager_and_a_full_forward_with_kept_routing(mode, max_batch):
    check_bf16(make_model(seed=2, index_topk=8, index_n_heads=16).cuda().to(torch.bfloat16), mode,
               max_batch=max_batch)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_sampled_tokens_are_per_sequence_under_graph_decode(mode, monkeypatch):
    """fp32 with reference kernels, CUDA-graph decode: each sequence's sampled tokens (its own SamplingParams.seed)
    are the same alone, in a batch and in reversed order; the draws reach the graph step as device inputs."""
    monkeypatch.setenv("DSAFORGE_KERNELS", "reference")
    model = make_model(seed=2, index_topk=8, index_n_heads=16).cuda()
    prompts = _prompts(model.cfg.vocab_size)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=m, seed=i)
              for i, m in enumerate((20, 9, 24, 14))]

    def run(ps, sps, max_batch):
        eng = Engine(model, mode=mode, max_batch=max_batch, max_len=160, cuda_graphs=True)
        out = [o.tokens for o in eng.generate(ps, sps)]
        assert eng.stats["cuda_graphs"] == "on", eng.stats["cuda_graphs"]
        return out

    alone = [run([p], [sp], 1)[0] for p, sp in zip(prompts, params)]
    assert run(prompts, params, 4) == alone
    assert run(prompts[::-1], params[::-1], 3)[::-1] == alone
