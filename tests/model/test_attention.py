"""MLA + lightning indexer against naive per-head formulas; MQA form == MHA form; top-k semantics; indexer KL."""
import math

import pytest
import torch

from dsaforge.kernels import causal_mask
from dsaforge.model import MLA, indexer_kl
from dsaforge.model.attention import AttnContext
from dsaforge.model.layers import rope_tables
from tests.model.model_helpers import tiny_cfg

B, S = 2, 12


def _setup(seed=0, **over):
    cfg = tiny_cfg(**over)
    torch.manual_seed(seed)
    mla = MLA(cfg)
    with torch.no_grad():
        for n, p in mla.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    cos, sin = rope_tables(cfg)
    x = torch.randn(B, S, cfg.dim)
    return cfg, mla, x, cos[:S], sin[:S]


def _ctx(mode, top_k=4, form=None, mask=None):
    return AttnContext(mode, 0, causal_mask(S, S)[None] if mask is None else mask, top_k, form)


# ---- naive references, written from the weights with explicit per-head loops

def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_pairs(x, cos, sin, interleaved):
    d = x.shape[-1] // 2
    idx_a = torch.arange(0, 2 * d, 2) if interleaved else torch.arange(d)
    idx_b = idx_a + 1 if interleaved else idx_a + d
    c = cos.view(1, cos.shape[0], *([1] * (x.dim() - 3)), d)
    s = sin.view(1, sin.shape[0], *([1] * (x.dim() - 3)), d)
    y = x.clone()
    y[..., idx_a] = x[..., idx_a] * c - x[..., idx_b] * s
    y[..., idx_b] = x[..., idx_b] * c + x[..., idx_a] * s
    return y


def naive_index_scores(cfg, mla, x, cos, sin):
    ix, r, hi, di = mla.indexer, cfg.qk_rope_head_dim, cfg.index_n_heads, cfg.index_head_dim
    qr = _rms(x @ mla.wq_a.weight.T, mla.q_norm.weight)
    q = (qr @ ix.wq_b.weight.T).view(B, S, hi, di)
    q = torch.cat((_rope_pairs(q[..., :r], cos, sin, False), q[..., r:]), -1)
    k = x @ ix.wk.weight.T
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + 1e-6)
    k = k * ix.k_norm.weight + ix.k_norm.bias
    k = torch.cat((_rope_pairs(k[..., :r], cos, sin, False), k[..., r:]), -1)
    w = x @ ix.weights_proj.weight.T
    scores = torch.zeros(B, S, S)
    for j in range(hi):
        scores += w[..., j, None] * torch.relu(torch.einsum("bsd,btd->bst", q[:, :, j], k)) / math.sqrt(hi * di)
    return scores.masked_fill(~causal_mask(S, S), float("-inf"))


def naive_mla(cfg, mla, x, cos, sin, mask):
    """Returns (out [B,S,dim], probs [B,S,H,T])."""
    h, nope, r, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q = (_rms(x @ mla.wq_a.weight.T, mla.q_norm.weight) @ mla.wq_b.weight.T).view(B, S, h, nope + r)
    q_pe = _rope_pairs(q[..., nope:], cos, sin, True)
    kv = x @ mla.wkv_a.weight.T
    latent, k_pe = _rms(kv[..., :c], mla.kv_norm.weight), _rope_pairs(kv[..., c:], cos, sin, True)
    kvb = (latent @ mla.wkv_b.weight.T).view(B, S, h, nope + cfg.v_head_dim)
    scale = cfg.qk_head_dim ** -0.5            # tiny: max_seq_len == original_seq_len, so no YaRN mscale
    outs, probs = [], []
    for i in range(h):
        logits = (torch.einsum("bsd,btd->bst", q[:, :, i, :nope], kvb[:, :, i, :nope])
                  + torch.einsum("bsd,btd->bst", q_pe[:, :, i], k_pe)) * scale
        p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        probs.append(p)
        outs.append(p @ kvb[:, :, i, nope:])
    return torch.cat(outs, -1) @ mla.wo.weight.T, torch.stack(probs, 2)


def naive_kl(p, logits, valid):
    total, rows = 0.0, 0
    for b in range(p.shape[0]):
        for t in range(p.shape[1]):
            v = valid[b, t]
            if not v.any():
                continue
            pt = p[b, t][v] / p[b, t][v].sum()
            lq = torch.log_softmax(logits[b, t][v], -1)
            total += (pt * (pt.log() - lq)).sum()
            rows += 1
    return total / rows


# ---- tests

def test_indexer_matches_naive_formula():
    cfg, mla, x, cos, sin = _setup()
    qr = mla.q_norm(mla.wq_a(x))
    k = mla.indexer.keys(x, cos, sin)
    torch.testing.assert_close(mla.indexer(x, qr, cos, sin, k), naive_index_scores(cfg, mla, x, cos, sin),
                               atol=1e-5, rtol=1e-5)


def test_indexer_hadamard_preserves_scores_and_fp8_stays_close():
    cfg, mla, x, cos, sin = _setup(index_head_dim=16)
    qr = mla.q_norm(mla.wq_a(x))
    exact = mla.indexer(x, qr, cos, sin, mla.indexer.keys(x, cos, sin))
    mla.indexer.use_hadamard = True
    rotated = mla.indexer(x, qr, cos, sin, mla.indexer.keys(x, cos, sin))
    torch.testing.assert_close(rotated, exact, atol=1e-5, rtol=1e-5)
    mla.indexer.use_fp8 = True
    fp8 = mla.indexer(x, qr, cos, sin, mla.indexer.keys(x, cos, sin))
    finite = torch.isfinite(exact)
    assert torch.equal(finite, torch.isfinite(fp8))
    err = (fp8 - exact)[finite].abs().max() / exact[finite].abs().max()
    assert 0 < err < 0.1, err


def test_mha_form_matches_naive():
    cfg, mla, x, cos, sin = _setup()
    out, kl = mla(x, cos, sin, _ctx("dense", form="mha"))
    ref, _ = naive_mla(cfg, mla, x, cos, sin, causal_mask(S, S))
    assert kl is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mqa_form_equals_mha_form():
    cfg, mla, x, cos, sin = _setup()
    mha, _ = mla(x, cos, sin, _ctx("dense", form="mha"))
    mqa, _ = mla(x, cos, sin, _ctx("dense", form="mqa"))
    torch.testing.assert_close(mqa, mha, atol=1e-5, rtol=1e-5)


def test_sparse_with_k_at_least_L_is_dense():
    cfg, mla, x, cos, sin = _setup()
    dense, _ = mla(x, cos, sin, _ctx("dense", form="mha"))
    for k in (S, S + 5):
        sparse, _ = mla(x, cos, sin, _ctx("sparse", top_k=k))
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_sparse_matches_naive_topk_attention_and_masked_mha():
    cfg, mla, x, cos, sin = _setup()
    k = 4
    scores = naive_index_scores(cfg, mla, x, cos, sin)
    top = scores.topk(k, -1)
    selected = torch.zeros(B, S, S, dtype=torch.bool).scatter_(-1, top.indices, torch.isfinite(top.values))
    ref, probs = naive_mla(cfg, mla, x, cos, sin, causal_mask(S, S) & selected)
    out, kl = mla(x, cos, sin, _ctx("sparse", top_k=k))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    masked_mha, kl_mha = mla(x, cos, sin, _ctx("sparse", top_k=k, form="mha"))
    torch.testing.assert_close(masked_mha, ref, atol=1e-5, rtol=1e-5)
    # KL over the selected set only, target = head-summed attention there, L1-normalised
    ref_kl = naive_kl(probs.sum(2), scores.masked_fill(~selected, float("-inf")), selected)
    torch.testing.assert_close(kl, ref_kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kl_mha, ref_kl, atol=1e-5, rtol=1e-4)
    assert kl > 1e-3      # a real, non-degenerate distribution mismatch


def test_warmup_is_dense_attention_and_returns_full_kl():
    cfg, mla, x, cos, sin = _setup()
    dense, _ = mla(x, cos, sin, _ctx("dense"))
    out, kl = mla(x, cos, sin, _ctx("warmup"))
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    _, probs = naive_mla(cfg, mla, x, cos, sin, causal_mask(S, S))
    scores = naive_index_scores(cfg, mla, x, cos, sin)
    ref_kl = naive_kl(probs.sum(2), scores, causal_mask(S, S).expand(B, S, S))
    torch.testing.assert_close(kl, ref_kl, atol=1e-5, rtol=1e-4)
    out_mqa, kl_mqa = mla(x, cos, sin, _ctx("warmup", form="mqa"))
    torch.testing.assert_close(kl_mqa, ref_kl, atol=1e-5, rtol=1e-4)


def test_indexer_kl_is_zero_when_indexer_matches_target_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[0, 0, 3:] = False
    p = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1) * 7.0    # unnormalised mass is fine
    assert indexer_kl(p, logits, valid).abs() < 1e-6
    q = torch.rand(2, 3, 5)
    torch.testing.assert_close(indexer_kl(q, logits, valid), naive_kl(q, logits, valid))


@pytest.mark.parametrize("packed", [False, True])
def test_dense_lse_in_row_blocks_matches_full_logsumexp(packed):
    cfg, mla, x, cos, sin = _setup()
    torch.manual_seed(1)
    q_lat = torch.randn(1, S, cfg.n_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv = torch.randn(1, S, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    cu = torch.tensor([0, 5, S], dtype=torch.int32) if packed else None
    seg = (torch.arange(S) >= 5) if packed else torch.zeros(S, dtype=torch.bool)
    mask = causal_mask(S, S) & (seg[:, None] == seg[None, :])
    logits = torch.einsum("bshd,btd->bsht", q_lat, kv) * mla.softmax_scale
    ref = logits.masked_fill(~mask[None, :, None], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(mla._dense_lse(q_lat, kv, None, cu), ref)                 # kernels.attention_lse
    torch.testing.assert_close(mla._dense_lse(q_lat, kv, mask[None], None), ref)           # an explicit mask


def _absorbed_query_pair(device, dtype):
    from dsaforge.model.attention import AbsorbedQuery
    from dsaforge.model.layers import apply_rope
    b, s, h, n, r, c = 2, 48, 6, 16, 8, 32
    q = torch.randn(b, s, h, n + r, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(h, n + 12, c, device=device, requires_grad=True)       # fp32 master weight, W_UK its first rows
    angles = torch.rand(s, r // 2, device=device) * 50
    cos, sin = angles.cos(), angles.sin()
    got = AbsorbedQuery.apply(q, w[:, :n], cos, sin)
    qn, qp = q.split([n, r], -1)
    want = torch.cat((torch.einsum("bshn,hnc->bshc", qn, w[:, :n].to(dtype)), apply_rope(qp, cos, sin, True)), -1)
    g = torch.randn_like(got)
    return got, want, torch.autograd.grad(got, (q, w), g), torch.autograd.grad(want, (q, w), g)


def test_absorbed_query_writes_the_einsum_and_cat_in_place():
    """The fused sparse path's absorbed query (product and rotation written into one buffer, dq the same way)
    equals the einsum-and-cat form, values and gradients to q and to the fp32 weight."""
    got, want, grads, want_grads = _absorbed_query_pair("cpu", torch.float32)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_absorbed_query_on_the_gpu_in_bf16():
    got, want, grads, want_grads = _absorbed_query_pair("cuda", torch.bfloat16)
    for name, a, b in (("out", got, want), ("dq", grads[0], want_grads[0]), ("dw", grads[1], want_grads[1])):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"{name}: rel err {rel:.2e}")
        assert rel <= 1e-2
