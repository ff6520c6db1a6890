"""dsaforge.kernels: DSA kernels (lightning indexer, top-k, sparse MLA). Each is a Triton kernel + a checked
wrapper + the pure-torch reference in `reference.py`, which is also the CPU fallback."""
from dsaforge.kernels.reference import causal_mask, indexer_scores, sparse_mla, topk_indices

__all__ = ["causal_mask", "indexer_scores", "sparse_mla", "topk_indices"]
