"""Host memory of loading an HF checkpoint per rank: every rank importing the whole checkpoint and keeping its
shard (the trainer before sharded loading) against each rank reading only its slices (`shards.build_sharded`).

    python -m dsaforge.model.train.bench_shards --preset small --set model.n_layers=4 --layouts ep8,tp2.ep4 \\
        --out docs/benchmarks/shard_load                      # CPU; writes OUT.json and OUT.md

The checkpoint is the preset's seeded model exported as bf16, its layer projections quantised to DeepSeek's FP8
(e4m3, 128x128 block scales). Each measurement runs in a fresh process as one simulated rank (torch's fake process
group: the layout's groups exist, no collective runs), rank 0 and the last rank of each layout, and reports the
peak anonymous resident memory above the process's baseline after imports (`PeakAnon`), the parameters the rank
holds and the bytes the loader read.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


class PeakAnon:
    """Peak anonymous resident memory (RssAnon: what the process allocated, not the page cache of the memory-mapped
    checkpoint) above its value at start, sampled every 2 ms. getrusage's ru_maxrss is no use here: it survives
    fork and exec, so a worker starts with its parent's peak."""

    def __init__(self):
        self.base = self.peak = _anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_mib()) - self.base


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    pad = torch.zeros(rows * block, cols * block)
    pad[:w.shape[0], :w.shape[1]] = w
    blocks = pad.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view_as(pad)[:w.shape[0], :w.shape[1]].to(torch.float8_e4m3fn)
    return q, scale


def write_checkpoint(cfg, out: Path) -> None:
    from safetensors.torch import load_file, save_file
    from dsaforge.model.hf import export_hf
    from dsaforge.model.train.shards import build_sharded
    export_hf(build_sharded(cfg).to(torch.bfloat16), out, max_shard_bytes=2**40)
    tensors = load_file(str(out / "model.safetensors"))
    for k in [k for k, v in tensors.items() if v.dim() == 2 and k.startswith("model.layers.") and "_proj" in k
              and "weights_proj" not in k]:
        tensors[k], tensors[k + "_scale_inv"] = quantize_fp8(tensors[k].float())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((out / "config.json").read_text())
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(hf))


def measure(cfg_json: str, ckpt: Path, layout: str, rank: int, mode: str) -> dict:
    """One rank's load, in this process: 'sharded' (its slices only) or 'whole' (import_hf, then its shard)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from dsaforge.config import Config
    from dsaforge.model import megatron_bridge as bridge
    from dsaforge.model.hf import import_hf
    from dsaforge.model.train import hf_shards
    from dsaforge.model.train.shards import build_sharded
    from dsaforge.model.transformer import Transformer
    cfg = Config.model_validate_json(cfg_json)
    meter, t0 = PeakAnon(), time.perf_counter()
    par = None
    if cfg.parallel.world_size > 1:
        dist.init_process_group("fake", rank=rank, world_size=cfg.parallel.world_size, store=FakeStore())
        par = bridge.init_parallel(cfg, torch.device("cpu"))
    read = {"bytes": 0}
    if mode == "sharded":
        original = hf_shards.HFShards.__exit__

        def count(self, *exc):
            read["bytes"] = self.bytes_read
            original(self, *exc)
        hf_shards.HFShards.__exit__ = count
        model = build_sharded(cfg, par, bridge if par else None, torch.device("cpu"), ckpt)
    else:                       # the trainer before: the whole model on every rank, then its shard
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
        model.load_state_dict(import_hf(ckpt).state_dict())
        read["bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        if par:
            bridge.parallelize(model, par)
    held = sum(p.numel() for p in model.parameters())
    return {"layout": layout, "rank": rank, "mode": mode, "params": held, "read_bytes": read["bytes"],
            "peak_mib": round(meter.stop(), 1), "seconds": round(time.perf_counter() - t0, 2)}


def _layout_sets(layout: str) -> list[str]:
    sizes = {"tp": 1, "ep": 1, "pp": 1, "dp": 1}
    for part in layout.split("."):
        sizes[part[:2]] = int(part[2:])
    world = sizes["tp"] * sizes["pp"] * max(sizes["dp"], sizes["ep"])
    return [f"parallel.tp={sizes['tp']}", f"parallel.ep={sizes['ep']}", f"parallel.pp={sizes['pp']}",
            f"parallel.nproc_per_node={world}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--layouts", default="ep8,tp2.ep4")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg_json, ckpt, layout, rank, mode = args.worker
        print(json.dumps(measure(Path(cfg_json).read_text(), Path(ckpt), layout, int(rank), mode)))
        return
    from dsaforge.config import load_config
    work = args.out.with_name(args.out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.preset, overrides=args.sets)
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").exists():
        write_checkpoint(cfg, ckpt)
    rows = []
    for layout in ["tp1"] + args.layouts.split(","):
        lcfg = load_config(args.preset, overrides=args.sets + _layout_sets(layout))
        (work / f"{layout}.json").write_text(lcfg.model_dump_json())
        world = lcfg.parallel.world_size
        for mode in ("whole", "sharded"):
            for rank in sorted({0, world - 1}):
                proc = subprocess.run([sys.executable, "-m", "dsaforge.model.train.bench_shards", "--out",
                                       str(args.out), "--worker", str(work / f"{layout}.json"), str(ckpt), layout,
                                       str(rank), mode], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    whole = {(r["layout"], r["rank"]): r for r in rows if r["mode"] == "whole"}
    lines = [f"Checkpoint: {args.preset} {' '.join(args.sets)}, FP8 layer projections, {size / 2**20:.0f} MiB on "
             "disk. Peak anonymous host memory (RssAnon) above the process baseline, one simulated rank per row.", "",
             "| layout | rank | params held | read (MiB) | peak, sharded (MiB) | peak, whole import (MiB) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["mode"] == "sharded"):
        w = whole[(r["layout"], r["rank"])]
        lines.append(f"| {r['layout']} | {r['rank']} | {r['params'] / 1e6:.0f}M | {r['read_bytes'] / 2**20:.0f} | "
                     f"{r['peak_mib']:.0f} | {w['peak_mib']:.0f} | {w['peak_mib'] / max(r['peak_mib'], 1):.1f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"checkpoint_bytes": size, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
