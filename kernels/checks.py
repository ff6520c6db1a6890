"""GPU correctness checks of the fused kernels against float64 references, on fresh random inputs.

Every output buffer is poisoned (NaN / -7) before the kernel runs, so an unwritten element fails the check.
Errors are relative Frobenius norms ||got - ref|| / ||ref|| (bf16 bound: 1e-2). Used by the `gpu` tests and by
`python -m dsaforge.kernels.bench --checks`, which records the results under docs/benchmarks/.

Run: one GPU (`python -m dsaforge.kernels.checks` prints a table).
"""
from __future__ import annotations

import json
import time

import torch

from dsaforge.kernels import reference as ref
from dsaforge.kernels._dispatch import env_var, last_path, poison_outputs
from dsaforge.kernels.indexer import indexer_rerank, indexer_scores, indexer_topk, rerank_margin
from dsaforge.kernels.kl import indexer_kl
from dsaforge.kernels.lse import attention_lse
from dsaforge.kernels.sparse_mla import sparse_mla_bwd, sparse_mla_decode, sparse_mla_fwd
from dsaforge.kernels.sparse_mla_bwd_sm90 import is_fused
from dsaforge.kernels.topk import topk_indices

BF16_TOL = 1e-2
SHAPES = {"v32": dict(h=128, d_v=512, d_pe=64, hi=64, di=128), "small": dict(h=16, d_v=256, d_pe=64, hi=16, di=128)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    num = (got[finite] - want[finite]).norm()
    return (num / want[finite].norm().clamp_min(1e-30)).item()


def _indices(b: int, s_q: int, s_kv: int, k: int, dev, empty_frac: float = 0.0) -> torch.Tensor:
    """Distinct random visible keys per row (queries are the last s_q of s_kv), ascending, some slots -1."""
    pos = torch.arange(s_kv - s_q, s_kv, device=dev)
    r = torch.rand(b, s_q, s_kv, device=dev)
    r = r.masked_fill(torch.arange(s_kv, device=dev)[None, None] > pos[None, :, None], -1.0)
    vals, idx = r.topk(k, dim=-1)
    idx = idx.masked_fill(vals < 0, -1)
    if empty_frac:
        idx = idx.masked_fill(torch.rand(idx.shape, device=dev) < empty_frac, -1)
    big = torch.iinfo(torch.int32).max
    idx = idx.int().masked_fill(idx < 0, big).sort(-1)[0]
    return idx.masked_fill(idx == big, -1).contiguous()


def check_sparse_mla(shape: str, s_q: int = 128, s_kv: int = 8192, k: int = 2048, b: int = 1) -> dict:
    cfg, dev = SHAPES[shape], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    q = torch.randn(b, s_q, cfg["h"], d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(b, s_kv, d, device=dev, dtype=torch.bfloat16)
    idx = _indices(b, s_q, s_kv, k, dev, empty_frac=0.1)
    idx[:, 0] = -1                                                   # a row with no key at all
    scale = d ** -0.5
    with poison_outputs():
        out, lse = sparse_mla_fwd(q, kv, idx, scale, cfg["d_v"])
    path, fwd_kernel = last_path("sparse_mla_fwd")
    qq, kk = q.double().requires_grad_(), kv.double().requires_grad_()
    ro, rl = ref.sparse_mla(qq, kk, idx, scale, cfg["d_v"])
    # dO as the output projection's einsum hands it over: a head-major buffer seen token-major
    dout = torch.randn(cfg["h"], b, s_q, cfg["d_v"], device=dev, dtype=out.dtype).permute(1, 2, 0, 3)
    torch.autograd.backward([ro], [dout.double()])
    with poison_outputs():
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], algorithm="split", chunk_rows=48)
        dq_f, dkv_f = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], algorithm="fused")
        dq_d, dkv_d = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], deterministic=True)
        dq_d2, dkv_d2 = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, cfg["d_v"], deterministic=True)
    res = dict(check=f"sparse_mla fwd+bwd {shape}", shape=dict(b=b, s_q=s_q, s_kv=s_kv, k=k, **cfg), path=path,
               fwd_kernel="sm90 gluon" if "sm90" in fwd_kernel else "triton",
               out_rel_err=rel_err(out, ro), lse_rel_err=rel_err(lse, rl),
               dq_rel_err=rel_err(dq, qq.grad), dkv_rel_err=rel_err(dkv, kk.grad),
               dq_fused_rel_err=rel_err(dq_f, qq.grad), dkv_fused_rel_err=rel_err(dkv_f, kk.grad),
               dq_det_rel_err=rel_err(dq_d, qq.grad), dkv_det_rel_err=rel_err(dkv_d, kk.grad),
               deterministic_bitwise=bool(torch.equal(dkv_d, dkv_d2) and torch.equal(dq_d, dq_d2)),
               empty_row_ok=bool((out[:, 0] == 0).all() and torch.isneginf(lse[:, 0]).all()),
               no_nan=not any(t.isnan().any() for t in (out, lse, dq, dkv, dq_f, dkv_f, dq_d, dkv_d)))
    errs = [v for kk_, v in res.items() if kk_.endswith("rel_err")]
    res["passed"] = bool(max(errs) <= BF16_TOL and res["deterministic_bitwise"] and res["empty_row_ok"]
                         and res["no_nan"] and path == "triton")
    return res


def check_sparse_mla_bwd_sm90(h: int = 128, k: int = 2048, config: tuple | None = None, s_q: int = 128,
                              s_kv: int = 8192, chunk_rows: int = 48) -> dict:
    """The split backward with the Hopper dq kernel (`sparse_mla_bwd_sm90`; with an ("sm90-fused", ...) config the
    same kernel forming dKV too) against float64 and against the same backward with the Triton dq kernel
    (DSAFORGE_SM90_BWD=0), at d_qk 576 / d_v 512: 10% empty slots, a row with no valid key, a row whose first 300
    slots are empty, dO head-major as the output projection hands it over, and rows in chunks of chunk_rows so that
    the row offset is exercised."""
    dev, d_v = "cuda", 512
    d = d_v + 64
    q = torch.randn(1, s_q, h, d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, s_kv, d, device=dev, dtype=torch.bfloat16)
    idx = _indices(1, s_q, s_kv, k, dev, empty_frac=0.1)
    idx[:, 0] = -1
    idx[:, 1, :300] = -1
    scale = d ** -0.5
    out, lse = sparse_mla_fwd(q, kv, idx, scale, d_v)
    qq, kk = q.double().requires_grad_(), kv.double().requires_grad_()
    ro, _ = ref.sparse_mla(qq, kk, idx, scale, d_v)
    dout = torch.randn(h, 1, s_q, d_v, device=dev, dtype=out.dtype).permute(1, 2, 0, 3)
    torch.autograd.backward([ro], [dout.double()])
    with poison_outputs(), env_var("DSAFORGE_SM90_BWD", "1"):
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, d_v, algorithm="split", chunk_rows=chunk_rows,
                                 config=config)
    path = last_path("sparse_mla_bwd")
    want_path = "sm90 gluon kernel, dKV fused" if is_fused(config) else "sm90 gluon dq kernel"
    with poison_outputs(), env_var("DSAFORGE_SM90_BWD", "0"):
        dq_t, dkv_t = sparse_mla_bwd(q, kv, idx, out, lse, dout, scale, d_v, algorithm="split",
                                     chunk_rows=chunk_rows)
    path_t = last_path("sparse_mla_bwd")
    res = dict(check=f"sparse_mla bwd sm90 h{h} k{k}", config=list(config) if config else None,
               shape=dict(s_q=s_q, s_kv=s_kv, k=k, h=h), path=path[1], triton_path=path_t[1],
               dq_rel_err=rel_err(dq, qq.grad), dkv_rel_err=rel_err(dkv, kk.grad),
               dq_triton_rel_err=rel_err(dq_t, qq.grad), dkv_triton_rel_err=rel_err(dkv_t, kk.grad),
               dq_vs_triton_rel_err=rel_err(dq, dq_t), dkv_vs_triton_rel_err=rel_err(dkv, dkv_t),
               empty_row_zero=bool((dq[:, 0] == 0).all()),
               no_nan=not any(t.isnan().any() for t in (dq, dkv)))
    errs = [v for kk_, v in res.items() if kk_.endswith("rel_err")]
    res["passed"] = bool(max(errs) <= BF16_TOL and res["empty_row_zero"] and res["no_nan"]
                         and path[1] == want_path and path_t[1] != path[1])
    return res


def check_sparse_mla_fwd_config(config: tuple, s_q: int = 96, s_kv: int = 8192, k: int = 2048) -> dict:
    """The forward with an explicit block configuration (e.g. each sm_90 schedule) at V3.2's shape."""
    cfg, dev = SHAPES["v32"], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    q = torch.randn(1, s_q, cfg["h"], d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, s_kv, d, device=dev, dtype=torch.bfloat16)
    idx = _indices(1, s_q, s_kv, k, dev, empty_frac=0.1)
    idx[:, 0] = -1
    with poison_outputs():
        out, lse = sparse_mla_fwd(q, kv, idx, d ** -0.5, cfg["d_v"], config=config)
    ro, rl = ref.sparse_mla(q.double(), kv.double(), idx, d ** -0.5, cfg["d_v"])
    res = dict(check=f"sparse_mla fwd {config}", config=list(config), path=last_path("sparse_mla_fwd")[1],
               out_rel_err=rel_err(out, ro), lse_rel_err=rel_err(lse, rl),
               empty_row_ok=bool((out[:, 0] == 0).all() and torch.isneginf(lse[:, 0]).all()),
               no_nan=not bool(out.isnan().any() or lse.isnan().any()))
    res["passed"] = bool(max(res["out_rel_err"], res["lse_rel_err"]) <= BF16_TOL and res["empty_row_ok"]
                         and res["no_nan"])
    return res


def check_sparse_mla_target(shape: str, s_q: int = 160, s_kv: int = 8192, k: int = 2048, chunk_rows: int = 64) -> dict:
    """The forward with the KL target (`sparse_mla_fwd(..., target=True)`: block probabilities stored, rescaled and
    summed over heads) against float64, rows in chunks so that the row offset is exercised."""
    import os

    from dsaforge.kernels.sparse_mla_target import forward_with_target
    cfg, dev = SHAPES[shape], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    q = torch.randn(1, s_q, cfg["h"], d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, s_kv, d, device=dev, dtype=torch.bfloat16)
    idx = _indices(1, s_q, s_kv, k, dev, empty_frac=0.1)
    idx[:, 0] = -1
    idx[:, 1, :300] = -1                                             # leading blocks with no valid key
    with poison_outputs():
        out, lse, mass = forward_with_target(q, kv, idx, d ** -0.5, cfg["d_v"], chunk_rows=chunk_rows)
    path = last_path("sparse_mla_fwd")[1]
    ro, rl = ref.sparse_mla(q.double(), kv.double(), idx, d ** -0.5, cfg["d_v"])
    want = ref.selected_mass(q.double(), kv.double(), rl, idx, d ** -0.5)
    res = dict(check=f"sparse_mla fwd + KL target {shape}", path=path,
               sm90_fwd=os.environ.get("DSAFORGE_SM90_FWD", "1"),
               out_rel_err=rel_err(out, ro), lse_rel_err=rel_err(lse, rl), mass_rel_err=rel_err(mass, want),
               empty_slots_zero=bool((mass[idx < 0] == 0).all()),
               no_nan=not bool(out.isnan().any() or lse.isnan().any() or mass.isnan().any()))
    res["passed"] = bool(max(res["out_rel_err"], res["lse_rel_err"], res["mass_rel_err"]) <= BF16_TOL
                         and res["empty_slots_zero"] and res["no_nan"])
    return res


def check_decode(shape: str, b: int = 8, s_q: int = 2, s_kv: int = 65536, k: int = 2048) -> dict:
    cfg, dev = SHAPES[shape], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    q = torch.randn(b, s_q, cfg["h"], d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(b, s_kv, d, device=dev, dtype=torch.bfloat16)
    idx = _indices(b, s_q, s_kv, k, dev, empty_frac=0.05)
    with poison_outputs():
        out, lse = sparse_mla_decode(q, kv, idx, d ** -0.5, cfg["d_v"])
    ro, rl = ref.sparse_mla(q.double(), kv.double(), idx, d ** -0.5, cfg["d_v"])
    res = dict(check=f"sparse decode {shape}", shape=dict(b=b, s_q=s_q, s_kv=s_kv, k=k, **cfg),
               path=last_path("sparse_mla_fwd")[0], out_rel_err=rel_err(out, ro), lse_rel_err=rel_err(lse, rl))
    res["passed"] = bool(max(res["out_rel_err"], res["lse_rel_err"]) <= BF16_TOL and res["path"] == "triton")
    return res


def check_topk(rows: int = 64, t: int = 131072, k: int = 2048) -> dict:
    dev = "cuda"
    x = torch.randn(rows, t, device=dev)
    x[1] = torch.randint(0, 7, (t,), device=dev).float()                 # ties: lower index must win
    x[2] = 0.0
    x[3, : k // 2] = float("-inf")
    with poison_outputs():
        got = topk_indices(x, k)
    want = ref.topk_indices(x[None], k)[0]
    same = bool(torch.equal(got.sort(-1)[0], want.sort(-1)[0]))
    start = torch.randint(0, t // 2, (rows,), device=dev, dtype=torch.int32)
    end = (start + torch.randint(k // 2, t // 2, (rows,), device=dev, dtype=torch.int32)).clamp_max(t)
    with poison_outputs():
        got_b = topk_indices(x, k, start, end)
    mask = ref.bounds_mask(start, end, t)
    want_b = ref.topk_indices(x.masked_fill(~mask, float("-inf"))[None], k)[0]
    same_b = bool(torch.equal(got_b.sort(-1)[0], want_b.sort(-1)[0]))
    return dict(check="topk radix select", shape=dict(rows=rows, t=t, k=k), path=last_path("topk")[0],
                exact_match=same, exact_match_bounded=same_b, passed=same and same_b)


def check_act_quant(rows: int = 4096, heads: int = 64, d: int = 128) -> dict:
    """The fused fp8 quantization against `reference.act_quant_fp8`, bit for bit (values and scales)."""
    from dsaforge.kernels.indexer import act_quant_fp8
    x = (torch.randn(rows, heads, d, device="cuda") * torch.logspace(-6, 3, heads, device="cuda")[:, None]).bfloat16()
    x[0] = 0.0
    with poison_outputs():
        got_q, got_s = act_quant_fp8(x, block=d)
    want_q, want_s = ref.act_quant_fp8(x, block=d)
    same_q = bool(torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)))
    same_s = bool(torch.equal(got_s, want_s))
    return dict(check="fp8 act_quant", shape=dict(rows=rows, heads=heads, d=d), values_identical=same_q,
                scales_identical=same_s, passed=same_q and same_s)


def _recall(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of the exact top-k (valid slots) that the kernel selected."""
    hits, total = 0, 0
    for g, w in zip(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])):
        w = w[w >= 0]
        g = g[g >= 0]
        hits += torch.isin(w, g).sum().item()
        total += w.numel()
    return hits / max(total, 1)


def _exact_rows(q, k, w, i, s_kv, n=64):
    """float64 causal scores of query rows [i, i+n) of q (the last q.shape[1] of s_kv positions)."""
    sc = torch.einsum("bshd,btd->bsht", q[:, i:i + n].double(), k.double()).relu_()
    sc = torch.einsum("bsht,bsh->bst", sc, w[:, i:i + n].double())
    pos = torch.arange(s_kv - q.shape[1] + i, s_kv - q.shape[1] + i + sc.shape[1], device=q.device)
    return sc.masked_fill(torch.arange(s_kv, device=q.device)[None, None] > pos[None, :, None], float("-inf"))


def check_indexer(shape: str, s_q: int = 512, s_kv: int = 8192, k: int = 2048) -> dict:
    """bf16 and fp8 indexer + top-k against float64 scores. Passes when the bf16 path and the fp8 path as users get
    it by default (`fp8=True`: fp8 pre-selection, exact re-score) reach the recall bars; the plain fp8 top-k
    (pre-quantized inputs, or rerank=0) is reported next to it, not gated (e4m3 alone gives ~0.96 at 64K)."""
    cfg, dev = SHAPES[shape], "cuda"
    q = torch.randn(1, s_q, cfg["hi"], cfg["di"], device=dev, dtype=torch.bfloat16)
    kk = torch.randn(1, s_kv, cfg["di"], device=dev, dtype=torch.bfloat16)
    w = torch.randn(1, s_q, cfg["hi"], device=dev, dtype=torch.float32) * cfg["hi"] ** -0.5
    exact = ref.indexer_scores(q.double(), kk.double(), w.double())
    with poison_outputs():
        scores = indexer_scores(q, kk, w)
        idx = indexer_topk(q, kk, w, k)
    path = last_path("indexer_topk")[0]
    want = ref.topk_indices(exact, k)
    q8, k8, ks, wf = ref.indexer_fp8_inputs(q, kk, w)
    with poison_outputs():
        idx8 = indexer_topk(q8, k8, wf, k, k_scale=ks)
        scores8 = indexer_scores(q8, k8, wf, k_scale=ks)
        idx8r = indexer_topk(q, kk, w, k, fp8=True)
        path_r = last_path("indexer_topk")[0]
        # The re-score kernel alone, at the exact top-k of each row (-1 where a row has fewer keys).
        rescored = indexer_rerank(q, kk, w, want)
    path_rs = last_path("indexer_rerank")[0]
    exact_at = exact.gather(-1, want.clamp_min(0).long()).masked_fill(want < 0, float("-inf"))
    exact8 = ref.indexer_scores_fp8(q8.double(), k8.double(), ks.double(), wf.double())
    want8 = ref.topk_indices(exact8, k)
    # Recall where DSA runs, k << s_kv: the last 256 queries of a 64K-token sequence.
    ql = torch.randn(1, 256, cfg["hi"], cfg["di"], device=dev, dtype=torch.bfloat16)
    kl = torch.randn(1, 65536, cfg["di"], device=dev, dtype=torch.bfloat16)
    wl = torch.randn(1, 256, cfg["hi"], device=dev, dtype=torch.float32) * cfg["hi"] ** -0.5
    want_l = torch.cat([ref.topk_indices(_exact_rows(ql, kl, wl, i, 65536), k) for i in range(0, 256, 64)], 1)
    q8l, k8l, ksl, wfl = ref.indexer_fp8_inputs(ql, kl, wl)
    with poison_outputs():
        idx_l = {"fp8": indexer_topk(q8l, k8l, wfl, k, k_scale=ksl),
                 "fp8_rerank": indexer_topk(ql, kl, wl, k, fp8=True),
                 "bf16": indexer_topk(ql, kl, wl, k)}
    res = dict(check=f"indexer+topk {shape}", shape=dict(s_q=s_q, s_kv=s_kv, k=k, **cfg), path=path,
               path_fp8_rerank=path_r, path_rerank_kernel=path_rs, rerank_margin=rerank_margin(k),
               **{f"recall_{n}_vs_exact_scores_64k": _recall(v, want_l) for n, v in idx_l.items()},
               scores_bf16_rel_err=rel_err(scores, exact), scores_fp8_rel_err=rel_err(scores8, exact8),
               rerank_scores_rel_err=rel_err(rescored, exact_at),
               recall_bf16=_recall(idx, want), recall_fp8_vs_exact_scores=_recall(idx8, want),
               recall_fp8_rerank_vs_exact_scores=_recall(idx8r, want),
               recall_fp8_vs_fp8_formula=_recall(idx8, want8),
               no_poison=bool(all((t != -7).all() for t in (idx, idx8, idx8r, *idx_l.values()))))
    res["passed"] = bool(res["scores_bf16_rel_err"] <= BF16_TOL and res["scores_fp8_rel_err"] <= BF16_TOL
                         and res["rerank_scores_rel_err"] <= BF16_TOL and res["recall_bf16"] >= 0.999
                         and res["recall_bf16_vs_exact_scores_64k"] >= 0.999
                         and res["recall_fp8_rerank_vs_exact_scores"] >= 0.99
                         and res["recall_fp8_rerank_vs_exact_scores_64k"] >= 0.99
                         and res["no_poison"] and path == path_r == path_rs == "triton")
    return res


def check_kl(shape: str, s_q: int = 256, s_kv: int = 2048, k: int = 512) -> dict:
    cfg, dev = SHAPES[shape], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    h = min(cfg["h"], 32)
    scale = d ** -0.5
    iq = torch.randn(1, s_q, cfg["hi"], cfg["di"], device=dev, dtype=torch.bfloat16) * 0.3
    ik = torch.randn(1, s_kv, cfg["di"], device=dev, dtype=torch.bfloat16) * 0.3
    w = torch.randn(1, s_q, cfg["hi"], device=dev, dtype=torch.bfloat16) * cfg["hi"] ** -0.5
    q = torch.randn(1, s_q, h, d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, s_kv, d, device=dev, dtype=torch.bfloat16)
    res = dict(check=f"indexer KL {shape}", shape=dict(s_q=s_q, s_kv=s_kv, k=k, h=h, d=d, hi=cfg["hi"], di=cfg["di"]))
    ok = True
    start, end = ref.key_bounds(s_q, s_kv, None, dev)
    for mode in ("sparse", "dense"):
        if mode == "sparse":
            idx = _indices(1, s_q, s_kv, k, dev)
            lse = ref.sparse_mla(q.double(), kv.double(), idx, scale, cfg["d_v"])[1].float()
        else:
            idx = None
            logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * scale
            mask = ref.bounds_mask(start, end, s_kv)[None, :, None, :]
            lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).float()
        leaves = [x.detach().requires_grad_() for x in (iq, ik, w)]
        go = torch.rand(1, s_q, device=dev)
        loss = indexer_kl(*leaves, q, kv, lse, scale, cfg["d_v"], indices=idx)
        grads = torch.autograd.grad(loss, leaves, go)
        target = ref.attention_target(q.double(), kv.double(), lse.double(), scale, idx)
        rl = [x.detach().double().requires_grad_() for x in (iq, ik, w)]
        want = ref.indexer_kl(*rl, target.double(), idx)
        wg = torch.autograd.grad(want, rl, go.double())
        errs = dict(loss=rel_err(loss, want), d_index_q=rel_err(grads[0], wg[0]), d_index_k=rel_err(grads[1], wg[1]),
                    d_index_w=rel_err(grads[2], wg[2]))
        res[mode] = dict(path=last_path("indexer_kl")[0], **{f"{n}_rel_err": v for n, v in errs.items()})
        ok = ok and max(errs.values()) <= BF16_TOL and res[mode]["path"] == "triton"
    res["passed"] = bool(ok)
    return res


def check_attention_lse(shape: str, s: int = 2048, packed: bool = True) -> dict:
    """The warm-up's KL normaliser against a float64 logsumexp over the whole causal (and per-document) row."""
    cfg, dev = SHAPES[shape], "cuda"
    d = cfg["d_v"] + cfg["d_pe"]
    scale = d ** -0.5
    q = torch.randn(1, s, cfg["h"], d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, s, d, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, 700, 701, 1500, s], device=dev, dtype=torch.int32) if packed else None
    with poison_outputs():
        got = attention_lse(q, kv, scale, cfg["d_v"], cu_seqlens=cu)
    start, end = ref.key_bounds(s, s, cu, dev)
    logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * scale
    want = logits.masked_fill(~ref.bounds_mask(start, end, s)[None, :, None, :], float("-inf")).logsumexp(-1)
    # LSE is a log: compare absolute error (1e-2 nats = 1% in the probabilities it normalises)
    err = (got.double() - want).abs().max().item()
    res = dict(check=f"attention_lse {shape}", shape=dict(s=s, h=cfg["h"], d=d, packed=packed),
               path=last_path("attention_lse")[0], max_abs_err=err, finite=bool(torch.isfinite(got).all()))
    res["passed"] = bool(res["path"] == "triton" and res["finite"] and err <= BF16_TOL)
    return res


def run_all(log=print) -> list[dict]:
    """Every check at both head shapes; an exception is recorded as a failed check, not raised."""
    jobs = [("sparse_mla v32", check_sparse_mla, ("v32",)), ("sparse_mla small", check_sparse_mla, ("small",)),
            ("sparse_mla + KL target v32", check_sparse_mla_target, ("v32",)),
            ("sparse_mla + KL target small", check_sparse_mla_target, ("small",)),
            ("decode v32", check_decode, ("v32",)), ("decode small", check_decode, ("small",)),
            ("topk", check_topk, ()), ("fp8 act_quant", check_act_quant, ()), ("indexer v32", check_indexer, ("v32",)),
            ("indexer small", check_indexer, ("small",)), ("kl v32", check_kl, ("v32",)),
            ("kl small", check_kl, ("small",)), ("attention_lse v32", check_attention_lse, ("v32",)),
            ("attention_lse small", check_attention_lse, ("small",))]
    if torch.cuda.get_device_capability()[0] == 9:      # each Hopper forward schedule, not only the default
        jobs += [(f"sm90 fwd {s}", check_sparse_mla_fwd_config, (("sm90", 64, st, s),))
                 for s, st in (("pingpong", 2), ("serial", 2), ("prefetch", 2), ("ws3", 3))]
        jobs += [(f"sm90 bwd h{h} k{k}", check_sparse_mla_bwd_sm90, (h, k)) for h, k in ((128, 2048), (64, 512))]
    results = []
    for name, fn, args in jobs:
        t0 = time.time()
        try:
            r = fn(*args)
        except Exception as e:  # a broken check must not hide the others
            r = dict(check=name, passed=False, error=f"{type(e).__name__}: {e}"[:2000])
        r["seconds"] = round(time.time() - t0, 2)
        log(json.dumps(r))
        results.append(r)
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    run_all()
