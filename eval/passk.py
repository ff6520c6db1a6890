"""pass@k and pass^k from n samples per task of which c passed.

- pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the chance that at least one of k
  samples drawn without replacement from the n passes, 1 - C(n-c, k) / C(n, k), unbiased for the model's pass@k.
- pass^k (Yao et al. 2024, tau-bench): the chance that all k drawn samples pass, C(c, k) / C(n, k); the reliability
  an agent needs when the same task comes back k times.

Both are computed as products (no factorials), exact for any n.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def _check(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n):
        raise ValueError(f"passed count c={c} must be in [0, n={n}]")
    if not (1 <= k <= n):
        raise ValueError(f"k={k} must be in [1, n={n}] (draw at least k samples per task)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when fewer than k samples failed."""
    _check(n, c, k)
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_hat_k(n: int, c: int, k: int) -> float:
    """C(c, k) / C(n, k) = prod_{i=0}^{k-1} (c - i) / (n - i); 0 when fewer than k samples passed."""
    _check(n, c, k)
    if c < k:
        return 0.0
    prod = 1.0
    for i in range(k):
        prod *= (c - i) / (n - i)
    return prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over tasks given (n, c) per task."""
    counts = list(counts)
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) if counts else float("nan")


def mean_pass_hat_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    counts = list(counts)
    return sum(pass_hat_k(n, c, k) for n, c in counts) / len(counts) if counts else float("nan")


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int], prefix: str = "") -> dict[str, float]:
    """{prefix}pass_at_k (pass@k) and {prefix}pass_hat_k (pass^k) for every k not above the smallest n (MLflow
    metric names cannot hold '@' or '^')."""
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    out = {}
    for k in sorted(set(ks)):
        if 1 <= k <= n_min:
            out[f"{prefix}pass_at_{k}"] = mean_pass_at_k(counts, k)
            out[f"{prefix}pass_hat_{k}"] = mean_pass_hat_k(counts, k)
    return out
