"""TP=1 (one process), TP=2 and EP=2 (two CPU processes, gloo, through the megatron bridge) train the same model
to the same losses in fp32: dense pretraining from scratch, then warm-up and sparse adaptation from a trained
tiny model (trained, so the indexer's top-k has no near-ties that rounding could reorder).

Run: python -m pytest tests/train/test_parallel.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsaforge.config import load_config
from dsaforge.model.hf import import_hf
from dsaforge.model.train.trainer import Trainer

STAGES = ("pretrain", "warmup", "sparse")
STEPS = 3


def _cfg(**parallel):
    sets = [f"parallel.{k}={v}" for k, v in parallel.items()]
    for s in STAGES:
        sets += [f"train.{s}.steps={STEPS}", f"train.{s}.batch_size=4", f"train.{s}.micro_batch_size=2",
                 f"train.{s}.seq_len=64", f"train.{s}.eval_every={STEPS}", f"train.{s}.eval_batches=1",
                 f"train.{s}.warmup_steps=0", f"train.{s}.lr=3e-3"]
    return load_config("tiny", overrides=sets + ["model.index_topk=16"])


def _losses(out: Path, stage: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_chain):
    root = tmp_path_factory.mktemp("parallel")
    data, init = tiny_chain["data"], tiny_chain["pretrain"]["dir"] / "hf"
    cfg = _cfg()
    for name in STAGES:
        Trainer(cfg, name, data, root / "tp1" / name, None if name == "pretrain" else init).fit()
    layouts = {"tp2": {"nproc_per_node": 2, "tp": 2}, "ep2": {"nproc_per_node": 2, "ep": 2}}
    for layout, parallel in layouts.items():
        cfg_path = root / f"{layout}.json"
        cfg_path.write_text(_cfg(**parallel).model_dump_json())
        worker = Path(__file__).with_name("parallel_worker.py")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(worker), str(cfg_path), str(data), str(init), str(root / layout), *STAGES],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
@pytest.mark.parametrize("stage,key", [("pretrain", "train/lm_loss"), ("warmup", "train/indexer_kl"),
                                       ("sparse", "train/lm_loss"), ("sparse", "train/indexer_kl")])
def test_losses_agree_within_1e5(runs, layout, stage, key):
    ref, par = _losses(runs / "tp1", stage), _losses(runs / layout, stage)
    diffs = [abs(a[key] - b[key]) for a, b in zip(ref, par)]
    print(f"\n{layout} {stage} {key}: {[round(a[key], 6) for a in ref]} max |diff| {max(diffs):.2e}")
    assert len(diffs) == STEPS and max(diffs) < 1e-5
    assert abs(ref[-1]["val/lm_loss"] - par[-1]["val/lm_loss"]) < 1e-5
    assert ref[-1]["train/grad_norm"] == pytest.approx(par[-1]["train/grad_norm"], rel=1e-4)


def test_parallel_export_matches_single_device_names(runs):
    ref = import_hf(runs / "tp1" / "pretrain" / "hf").state_dict()
    for layout in ("tp2", "ep2"):
        got = import_hf(runs / layout / "pretrain" / "hf").state_dict()
        assert got.keys() == ref.keys()
        worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        assert worst < 1e-5, (layout, worst)
