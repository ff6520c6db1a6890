"""dsaforge.kernels: DSA kernels for the H200 (lightning indexer + top-k, sparse MLA fwd/bwd/decode, indexer KL).

Each is a Triton kernel + a checked wrapper + the pure-torch reference in `reference.py`, which is also the CPU
fallback; `last_path(name)` reports which one ran. The names the model uses keep the reference signatures:

    indexer_scores(q, k, w, causal=True) -> [B,S,T]    (materialises S x T: short sequences only)
    topk_indices(scores, top_k) -> [B,S,K] int32        (radix select; a row's indices ascending, -1 = empty)
    sparse_mla(q, kv, indices, sm_scale, d_v) -> (out, lse)   (autograd-capable)

and the long-context entry points are `indexer_topk` (scores fused with top-k, no S x T tensor), `sparse_mla_decode`,
`indexer_kl` and `attention_lse` (the dense warm-up's KL normaliser). Benchmark: `python -m dsaforge.kernels.bench` on one GPU.
"""
if __name__ == "kernels":  # imported under its bare name from a checkout's root: dsaforge/_layout.py
    from dsaforge._layout import hand_over
    hand_over(__name__, __path__[0])
else:
    from dsaforge.kernels import reference
    from dsaforge.kernels._dispatch import KernelInputError, last_path
    from dsaforge.kernels.indexer import indexer_flops, indexer_scores, indexer_topk
    from dsaforge.kernels.kl import IndexerKLFunction, indexer_kl
    from dsaforge.kernels.lse import attention_lse
    from dsaforge.kernels.rope import rope, rope_into
    from dsaforge.kernels.reference import act_quant_fp8, causal_mask, indexer_fp8_inputs, key_bounds
    from dsaforge.kernels.sparse_mla import (SparseMLAFunction, sparse_mla, sparse_mla_bwd, sparse_mla_decode,
                                             sparse_mla_flops, sparse_mla_fwd)
    from dsaforge.kernels.topk import topk_indices

    __all__ = ["IndexerKLFunction", "KernelInputError", "SparseMLAFunction", "act_quant_fp8", "attention_lse",
               "causal_mask", "indexer_flops", "indexer_fp8_inputs", "indexer_kl", "indexer_scores", "indexer_topk",
               "key_bounds", "last_path", "reference", "rope", "rope_into", "sparse_mla", "sparse_mla_bwd",
               "sparse_mla_decode", "sparse_mla_flops", "sparse_mla_fwd", "topk_indices"]
