"""The scoring primitives every suite shares, against the model's plain full forward; the long-context prompts;
the efficiency measurement's mechanics on CPU."""
import random

import pytest
import torch
import torch.nn.functional as F

from dsaforge.eval import efficiency, longctx


def _full_logprobs(em, ids, mode):
    with torch.no_grad():
        logits = em.model(torch.tensor([ids]), mode=mode).logits[0]                       # [S, V]
    return F.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_score_matches_a_full_forward_on_ragged_batches(em, mode):
    rng = random.Random(0)
    v = em.cfg.vocab_size
    items = [([em.bos] + [rng.randrange(v) for _ in range(n)], [rng.randrange(v) for _ in range(m)])
             for n, m in [(40, 3), (7, 1), (90, 5), (1, 2)]]                       # the sparse path selects top-32
    scored = em.score([p for p, _ in items], [c for _, c in items], mode, batch_size=3)
    for (p, c), s in zip(items, scored):
        logp = _full_logprobs(em, p + c, mode)
        pos = range(len(p) - 1, len(p) - 1 + len(c))
        want = sum(float(logp[i, t]) for i, t in zip(pos, c))
        assert s.logprob == pytest.approx(want, abs=1e-4) and s.n_tokens == len(c)
        assert s.greedy == all(int(logp[i].argmax()) == t for i, t in zip(pos, c))
    # a continuation of argmax tokens is greedy
    p = items[0][0]
    logp = _full_logprobs(em, p, mode)
    assert em.score([p[:-1]], [[int(logp[len(p) - 2].argmax())]], mode)[0].greedy


def test_rolling_logprob_covers_every_token_once(em):
    rng = random.Random(1)
    ids = [em.bos] + [rng.randrange(em.cfg.vocab_size) for _ in range(60)]
    logp = _full_logprobs(em, ids, "dense")
    whole = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    total, n = em.rolling_logprob(ids, "dense")
    assert n == len(ids) - 1 and total == pytest.approx(whole, abs=1e-3)
    total, n = em.rolling_logprob(ids, "dense", window=16)       # windows: 16 predicted tokens on a 16-token context
    want = 0.0
    for start in range(1, len(ids), 16):
        end = min(start + 16, len(ids))
        ctx = max(0, end - 17)
        lp = _full_logprobs(em, ids[ctx:end], "dense")
        want += sum(float(lp[i - ctx - 1, ids[i]]) for i in range(start, end))
    assert n == len(ids) - 1 and total == pytest.approx(want, abs=1e-3)


def test_score_rejects_what_does_not_fit(em):
    with pytest.raises(ValueError, match="max_seq_len"):
        em.score([[em.bos] * 600], [[1]], "dense")
    with pytest.raises(ValueError, match="non-empty"):
        em.score([[em.bos]], [[]], "dense")


@pytest.mark.parametrize("task", ["passkey", "multikey", "variable-tracking"])
def test_long_context_prompts_have_exact_length_and_needles_in_place(em, task):
    hay = em.encode("The quick brown fox jumps over the lazy dog. " * 200)
    for depth in (0.0, 0.5, 1.0):
        probe = longctx.make_probe(task, depth, random.Random(3))
        prompt, answer = longctx.build_prompt(em, probe, 256, hay, offset=17)
        assert len(prompt) + len(answer) == 256 + 1 and prompt[0] == em.bos
        text = em.decode(prompt)
        assert text.endswith(probe.question.strip()) or probe.question.strip() in text[-len(probe.question) - 5:]
        where = [text.find(n.strip()) for n in probe.needles]
        assert all(w >= 0 for w in where), (task, depth)
        if task != "multikey":                  # the first needle sits at its depth of the haystack
            hay_chars = len(text) - len(probe.question) - sum(len(n) for n in probe.needles)
            assert abs(where[0] / hay_chars - depth) < 0.1, (task, depth, where[0] / hay_chars)
        if task == "variable-tracking":
            assert where == sorted(where)        # the chain is assigned in order
            assert em.decode(answer).split() == [n.split()[1] for n in probe.needles]
    with pytest.raises(ValueError, match="too short"):
        longctx.build_prompt(em, longctx.make_probe(task, 0.5, random.Random(0)), 20, hay, 0)


def test_default_grids():
    assert longctx.default_lengths(512) == [256, 512]
    assert longctx.default_lengths(65536) == [8192, 16384, 32768, 65536]
    assert efficiency.default_positions(163840, 2048) == [4096, 8192, 16384, 32768, 65536, 131072]


def test_efficiency_measurement_mechanics_on_cpu(em):
    rows = efficiency.measure(em.model, [96], chunk=16, decode_batch=2, repeats=1, usd_per_hour=2.0)
    assert {(r["phase"], r["mode"], r["position"]) for r in rows} == {
        (ph, m, 96) for ph in ("prefill", "decode") for m in ("dense", "sparse")}
    for r in rows:
        assert r["seconds"] > 0 and r["tokens"] == (16 if r["phase"] == "prefill" else 2)
        assert r["usd_per_mtok"] == pytest.approx(r["seconds"] / r["tokens"] * 1e6 * 2.0 / 3600)
    s = efficiency.summarize_rows(rows)
    assert "decode/sparse/pos_96/usd_per_mtok" in s and "prefill/dense_over_sparse_at_max" in s
