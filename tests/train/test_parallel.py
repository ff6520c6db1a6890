"""TP=1 (one process), and TP=2, EP=2, DP=2 and PP=2 (two CPU processes, gloo, through the megatron bridge:
megatron's DDP and distributed optimizer; under PP its 1F1B schedule over 2 micro-batches) train the same model to
the same losses in fp32 with the same global batch: dense pretraining from scratch, then warm-up and sparse
adaptation from a trained tiny model (trained, so the indexer's top-k has no near-ties that rounding could reorder).

Run: python -m pytest tests/train/test_parallel.py -q
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsaforge.config import load_config
from dsaforge.model.hf import import_hf
from dsaforge.model.train.trainer import Trainer

STAGES = ("pretrain", "warmup", "sparse")
STEPS = 3
LAYOUTS = {"tp2": {"nproc_per_node": 2, "tp": 2}, "ep2": {"nproc_per_node": 2, "ep": 2},
           "dp2": {"nproc_per_node": 2}, "pp2": {"nproc_per_node": 2, "pp": 2}}


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
    for layout, parallel in LAYOUTS.items():
        _torchrun(_cfg(**parallel), root / f"{layout}.json", data, init, root / layout, *STAGES)
    return root


def _torchrun(cfg, cfg_path: Path, data: Path, init: Path, out: Path, *stages: str) -> None:
    cfg_path.write_text(cfg.model_dump_json())
    worker = Path(__file__).with_name("parallel_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(worker), str(cfg_path), str(data), str(init), str(out), *stages],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stage,key", [("pretrain", "train/lm_loss"), ("warmup", "train/indexer_kl"),
                                       ("sparse", "train/lm_loss"), ("sparse", "train/indexer_kl")])
def test_losses_agree_within_1e5(runs, layout, stage, key):
    ref, par = _losses(runs / "tp1", stage), _losses(runs / layout, stage)
    diffs = [abs(a[key] - b[key]) for a, b in zip(ref, par)]
    print(f"\n{layout} {stage} {key}: {[round(a[key], 6) for a in ref]} max |diff| {max(diffs):.2e}")
    assert len(diffs) == STEPS and max(diffs) < 1e-5
    assert abs(ref[-1]["val/lm_loss"] - par[-1]["val/lm_loss"]) < 1e-5
    assert ref[-1]["train/grad_norm"] == pytest.approx(par[-1]["train/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_ddp_and_distributed_optimizer_step(runs, layout):
    for stage in STAGES:
        classes = json.loads((runs / layout / stage / "classes.json").read_text())
        assert classes["ddp"] == "DistributedDataParallel"
        # dense and (under EP) expert parameters each get a DistributedOptimizer, chained
        assert classes["chained"] and set(classes["chained"]) == {"DistributedOptimizer"}, classes
        # rank 0 holds the whole model, or under PP the first stage: the embedding and block 0 of 2
        assert classes["stage_layers"] == ([0] if layout == "pp2" else [0, 1])


def test_parallel_export_matches_single_device_names(runs):
    ref = import_hf(runs / "tp1" / "pretrain" / "hf").state_dict()
    for layout in LAYOUTS:
        got = import_hf(runs / layout / "pretrain" / "hf").state_dict()
        assert got.keys() == ref.keys()
        diffs = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
        # AdamW divides each step by the gradient's running RMS, so an element whose gradient is ~0 can step either
        # way on rounding alone (measured: 1 element of 381K at 1.5e-5 to 1.8e-5, the rest within 1e-5, mean 4e-9).
        # A few may differ by up to the 3 steps' size (3 x lr); a shard in the wrong place moves whole rows by the
        # weights' scale (~0.02) and fails both checks.
        assert float(diffs.max()) < 3 * 3e-3, (layout, float(diffs.max()))
        assert int((diffs > 1e-5).sum()) <= 1e-4 * diffs.numel(), (layout, int((diffs > 1e-5).sum()))


def test_distributed_optimizer_resumes_exactly(tmp_path, tiny_chain):
    """EP=2: the dense AdamW state is sharded over DP=2 and the experts' lives in a second distributed optimizer. A run
    resumed from its step-2 checkpoint retraces the uninterrupted run bit for bit."""
    cfg = _cfg(nproc_per_node=2, ep=2)
    cfg.train.pretrain.steps, cfg.train.pretrain.ckpt_every, cfg.train.pretrain.eval_every = 4, 2, 2
    data, out = tiny_chain["data"], tmp_path / "run"
    _torchrun(cfg, tmp_path / "cfg.json", data, data, out, "pretrain")
    full = _losses(out, "pretrain")
    shutil.rmtree(out / "pretrain" / "checkpoints" / "step-00000004")
    _torchrun(cfg, tmp_path / "cfg.json", data, data, out, "pretrain")
    resumed = _losses(out, "pretrain")
    keys = ("train/lm_loss", "train/grad_norm", "val/lm_loss")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in full]


def test_workers_run_with_nvlink_multicast_off_unless_configured():
    from dsaforge.model.train.launch import NVLS_OFF, collective_env
    env = collective_env(_cfg(), base={"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"})
    assert {k: env[k] for k in NVLS_OFF} == NVLS_OFF and env["PATH"] == "/bin"
    on = load_config("tiny", overrides=["parallel.nvls=true"])
    assert collective_env(on, base={"NCCL_NVLS_ENABLE": "1"}) == {"NCCL_NVLS_ENABLE": "1"}
