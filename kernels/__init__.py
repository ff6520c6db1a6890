"""dsaforge.kernels."""
