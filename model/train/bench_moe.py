"""One MoE layer's forward + backward: the grouped expert dispatch of `MoE` against the per-expert loop it replaced.

Run (CPU or 1 GPU):  python -m dsaforge.model.train.bench_moe [--tokens 2048] [--repeats 5]
Prints one JSON line per config: median seconds of forward + backward for each path, and their ratio.
Configs: the tiny preset's MoE, a mid-size one and the small preset's (64 experts of width 512, 6 active).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from dsaforge.config import load_config
from dsaforge.model.moe import MoE, loop_reference

CONFIGS = {
    "tiny": {},
    "mid": {"dim": 512, "n_routed_experts": 32, "n_expert_groups": 4, "n_limited_groups": 2, "n_activated_experts": 6,
            "moe_inter_dim": 256},
    "small": None,   # the small preset as it is
}


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn(x).float().square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if i:                                           # the first call warms up
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsaforge.model.train.bench_moe")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The mean-square loss of [tokens, dim] outputs sends gradients into the fp32 denormal range, where CPU
    # arithmetic is many times slower; that would time the CPU's denormal path, not the dispatch.
    torch.set_flush_denormal(True)
    for name in args.configs:
        cfg = load_config("small" if name == "small" else "tiny").model
        for k, v in (CONFIGS[name] or {}).items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        moe = MoE(cfg).to(device)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.02)
        x = torch.randn(1, args.tokens, cfg.dim, device=device, requires_grad=True)
        loop = timed(lambda t: loop_reference(moe, t)[0], x, args.repeats)
        grouped = timed(lambda t: moe(t)[0], x, args.repeats)
        print(json.dumps({"config": name, "device": device.type, "tokens": args.tokens, "dim": cfg.dim,
                          "experts": cfg.n_routed_experts, "active": cfg.n_activated_experts,
                          "inter": cfg.moe_inter_dim, "loop_s": round(loop, 4), "grouped_s": round(grouped, 4),
                          "speedup": round(loop / grouped, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
