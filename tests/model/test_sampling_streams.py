"""Per-sequence sampling: a sequence's tokens are a function of its own context and key (engine seed,
SamplingParams.seed or its submission number, position), not of the batch it shares decode steps with, nor of the
order sequences arrive in; and the counter-based draws still sample the right distribution."""
import math

import numpy as np
import pytest
import torch

from dsaforge.model.engine import Engine
from dsaforge.model.sampling import SamplingParams, draw_bits, sample, seed_of, sequence_stream, to_uniforms
from tests.model.model_helpers import make_model, one_thread, random_prompts  # noqa: F401 (one_thread: autouse)


def _run(model, prompts, params, max_batch, mode="dense", **kw):
    return [o.tokens for o in Engine(model, mode=mode, max_batch=max_batch, max_len=64, **kw).generate(prompts, params)]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_a_sequences_tokens_do_not_depend_on_its_batch_or_order(mode):
    model = make_model(seed=2, index_topk=8, index_n_heads=16)
    prompts = random_prompts([5, 17, 9, 12, 3, 20], model.cfg.vocab_size)
    # different lengths, so batch composition changes from step to step as sequences finish
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=m, seed=100 + i)
              for i, m in enumerate((9, 4, 12, 7, 10, 5))]
    alone = [_run(model, [p], [sp], 1, mode)[0] for p, sp in zip(prompts, params)]
    batched = _run(model, prompts, params, 6, mode)
    reversed_ = _run(model, prompts[::-1], params[::-1], 4, mode)[::-1]   # 4 slots: freed slots are reused
    assert batched == alone and reversed_ == alone
    # the key matters: other seeds give other tokens, and the engine's seed is part of every stream
    other = _run(model, prompts, [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=sp.max_new_tokens,
                                                 seed=sp.seed + 1000) for sp in params], 6, mode)
    assert other != alone and _run(model, prompts, params, 6, mode, seed=1) != alone


def test_without_seeds_a_fresh_engine_repeats_whatever_its_batch_size():
    """Keyed by submission number: the same prompts in the same order give the same tokens with 1, 2 or 6 slots,
    and identical prompts (G samples of one task) still get different tokens."""
    model = make_model(seed=3)
    prompts = random_prompts([6, 6, 11], model.cfg.vocab_size) + [random_prompts([6], model.cfg.vocab_size)[0]] * 3
    sp = SamplingParams(temperature=1.2, max_new_tokens=8)
    runs = [_run(model, prompts, sp, b) for b in (1, 2, 6)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(t) for t in runs[0][3:]}) > 1


def test_greedy_is_unchanged():
    model = make_model(seed=4)
    prompts = random_prompts([7, 13], model.cfg.vocab_size)
    got = _run(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=6, seed=3), 2)
    for p, toks in zip(prompts, got):
        seq = list(p)
        for t in toks:       # argmax of a full forward, token by token
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(p):] == toks


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(Pearson chi-square, its 99.9% critical value) by the Wilson-Hilferty approximation."""
    n = counts.sum()
    keep = probs > 0
    stat = float((((counts - n * probs) ** 2)[keep] / (n * probs[keep])).sum())
    df = int(keep.sum()) - 1
    z = 3.09                                                      # the normal's 99.9% quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def test_draws_are_uniform_and_independent_across_keys_and_positions():
    n = 200_000
    streams = [sequence_stream(7, seed_of("t", k)) for k in range(n // 4)]
    u0 = to_uniforms(draw_bits(streams, [0] * len(streams))).numpy()
    u1 = to_uniforms(draw_bits(streams, [1] * len(streams))).numpy()
    pairs = np.floor(u0 * 10) * 10 + np.floor(u1 * 10)           # one sequence's consecutive draws: 100 cells
    stat, crit = _chi2_ok(np.bincount(pairs.astype(int), minlength=100), np.full(100, 0.01))
    print(f"pairs of consecutive draws: chi2 {stat:.1f} (99.9% critical {crit:.1f})")
    assert stat < crit
    one = to_uniforms(draw_bits([sequence_stream(7, 1)] * n, range(n))).numpy()   # one sequence along positions
    stat, crit = _chi2_ok(np.bincount((one * 50).astype(int), minlength=50), np.full(50, 0.02))
    print(f"one stream over {n} positions: chi2 {stat:.1f} (99.9% critical {crit:.1f})")
    assert stat < crit and 0 <= one.min() and one.max() < 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.9, 5, 0.75)])
def test_inverse_cdf_draws_follow_the_processed_distribution(temperature, top_k, top_p):
    """Chi-square of 100k draws (distinct keys) against an independent numpy statement of the truncated softmax;
    no token outside the kept set is ever drawn."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.5, 0.9, -2.0, 0.95])
    x = logits.double().numpy() / temperature
    order = np.argsort(-x, kind="stable")
    p = np.exp(x - x.max())
    if top_k:
        p[order[top_k:]] = 0
    p /= p.sum()
    before = np.cumsum(p[order]) - p[order]
    p[order[before >= top_p]] = 0
    p /= p.sum()
    n = 100_000
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    u = to_uniforms(draw_bits([sequence_stream(0, seed_of("chi2", k)) for k in range(n)], [3] * n))
    toks, lps, _ = sample(logits.expand(n, -1), [sp] * n, u)
    counts = np.bincount(toks.numpy(), minlength=len(p))
    stat, crit = _chi2_ok(counts, p)
    print(f"target {np.round(p, 4)}\nfreq   {np.round(counts / n, 4)}\nchi2 {stat:.1f} (99.9% critical {crit:.1f})")
    assert stat < crit and counts[p == 0].sum() == 0
    assert np.allclose(lps.numpy(), np.log(p[toks.numpy()]), atol=1e-5)
    # the extremes of u land on the first and the last kept token
    edge, _, _ = sample(logits.expand(2, -1), [sp] * 2, torch.tensor([0.0, 1 - 2.0 ** -53], dtype=torch.float64))
    kept = np.flatnonzero(p)
    assert edge.tolist() == [kept[0], kept[-1]]


def test_bench_sampling_tiny(tmp_path):
    """The GPU sampler benchmark runs end to end at tiny sizes on the CPU (an H200 run cannot die on a typo)."""
    import json

    from dsaforge.model import bench_sampling

    bench_sampling.main(["--tiny", "--reps", "1", "--out", str(tmp_path / "s")])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["ours_ms"] > 0 and r["gumbel_ms"] > 0 for r in rows)
    assert "| 8 | top_k 512 |" in (tmp_path / "s.md").read_text()
