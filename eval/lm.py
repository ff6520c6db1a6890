"""The lm suite: held-out perplexity of one checkpoint with dense and with sparse (DSA) attention.

Rows come from prepare-data's validation split, re-cut to `eval.lm_seq_len` tokens (default data.seq_len), the
first `eval.max_samples` of them. The same rows go through both modes, so the gap is what top-k attention costs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsaforge.data.prepare import load_manifest
from dsaforge.eval.results import SuiteResult
from dsaforge.progress import Progress

MODES = ("dense", "sparse")


@torch.no_grad()
def run(em, cfg, data_dir) -> SuiteResult:
    from dsaforge.model.train.data import TokenRows

    e = cfg.eval
    seq_len = min(e.lm_seq_len or cfg.data.seq_len, em.max_len)
    rows = TokenRows(data_dir, "val", seq_len)
    n = min(len(rows), e.max_samples)
    bytes_per_token = load_manifest(data_dir)["bytes_per_token"]
    out, sums = [], {m: [0.0, 0] for m in MODES}
    with Progress("eval lm", total=2 * n, unit="seq") as bar:
        for mode in MODES:
            for start in range(0, n, e.batch_size):
                idx = list(range(start, min(start + e.batch_size, n)))
                batch = rows.batch(idx)
                h = em.hidden(batch.inputs, mode)                                      # [b, S, dim]
                targets = batch.targets.to(h.device)
                for r, i in enumerate(idx):
                    nll = F.cross_entropy(em.model.head(h[r]).float(), targets[r], reduction="sum")
                    count = int(targets[r].numel())
                    sums[mode][0] += float(nll)
                    sums[mode][1] += count
                    out.append({"mode": mode, "row": i, "tokens": count, "nll": float(nll),
                                "loss": float(nll) / count})
                bar.update(len(idx), mode=mode)
    summary: dict = {"rows": n, "seq_len": seq_len, "tokens": sums["dense"][1]}
    for mode, (nll, count) in sums.items():
        loss = nll / max(count, 1)
        summary[f"{mode}/loss"] = loss
        summary[f"{mode}/ppl"] = math.exp(min(loss, 80.0))
        summary[f"{mode}/bits_per_byte"] = loss / math.log(2) / bytes_per_token
    summary["sparse_minus_dense/loss"] = summary["sparse/loss"] - summary["dense/loss"]
    summary["ppl_ratio"] = summary["sparse/ppl"] / summary["dense/ppl"]
    return SuiteResult("lm", out, summary, {"top_k": em.cfg.index_topk, "split": "val"})
