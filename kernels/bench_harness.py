"""The timing harness of the kernel benchmarks (`dsaforge.kernels.bench`, its sweeps in `bench_sweep`, and
`bench_bwd`): the head shapes and sizes they run at, a wall-clock budget (Clock), median device-event timing
(timeit), peak memory (peak_mb), random inputs (_rand, bf16 by default), and the environment a result was measured in.
"""
from __future__ import annotations

import datetime
import statistics
import sys
import time

import torch

# Head shapes: sparse MLA in MQA form, the indexer, and the MHA shape dense attention runs at in the same model.
SHAPES = {
    "v32": dict(h=128, d_v=512, d_pe=64, hi=64, di=128, mha_qk=192, mha_v=128),
    "small": dict(h=16, d_v=256, d_pe=64, hi=16, di=128, mha_qk=128, mha_v=64),
}
SIZES = [8192, 16384, 32768, 65536, 131072]
S_Q, TOP_K = 4096, 2048


class Clock:
    """Wall-clock guard: work that would start after the budget is skipped and recorded as such."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.time(), budget_s

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)


def timeit(fn, budget_ms: float = 1500.0, max_reps: int = 20) -> float:
    """Median milliseconds of fn() after one warm-up call, timed with device events."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    t_first = None
    reps = max_reps
    i = 0
    while i < reps:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        times.append(ms)
        if t_first is None:
            t_first = ms
            reps = int(max(1, min(max_reps, budget_ms // max(ms, 1e-3))))
        i += 1
    return statistics.median(times)


def peak_mb(fn) -> float:
    """Extra device memory (MB) fn() holds at its peak, above what was allocated before it."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rand(*shape, dev, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dtype)


def environment() -> dict:
    import triton
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
               cuda=torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    return env
