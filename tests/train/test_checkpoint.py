"""Checkpoints: exact resume after SIGKILL, checkpoint-and-exit on SIGTERM, NaN stops with the last good checkpoint.

Run: python -m pytest tests/train/test_checkpoint.py -q
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsaforge.config import load_config
from dsaforge.model.train import checkpoint as ckpt
from dsaforge.model.train.trainer import NonFiniteLoss, Trainer

STEPS = 10
OVERRIDES = [f"train.pretrain.steps={STEPS}", "train.pretrain.batch_size=4", "train.pretrain.micro_batch_size=2",
             "train.pretrain.seq_len=64", "train.pretrain.ckpt_every=3", "train.pretrain.eval_every=5",
             "train.pretrain.eval_batches=1", "train.pretrain.warmup_steps=2", "train.pretrain.keep_last=2",
             "train.deterministic=true"]


def _config(tmp_path, extra=()):
    cfg = load_config("tiny", overrides=OVERRIDES + list(extra))
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    return path


def _start(cfg_path, data, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dsaforge.model.train.launch", "pretrain", "--config",
                             str(cfg_path), "--out", str(out), "--input", f"prepare-data={data}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, out, step, timeout=240):
    t0 = time.time()
    while not (out / "checkpoints" / f"step-{step:08d}" / "meta.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def _final(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == STEPS
    return last["train/lm_loss"], last["val/lm_loss"], [r["step"] for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("ref")
    proc = _start(_config(tmp), tiny_data, tmp / "out")
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    return _final(tmp / "out")


def test_sigkill_mid_run_then_resume_ends_with_the_same_loss(tmp_path, tiny_data, uninterrupted):
    cfg, out = _config(tmp_path), tmp_path / "out"
    proc = _start(cfg, tiny_data, out)
    _wait_for_checkpoint(proc, out, 3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "hf").exists(), "the run finished before it could be killed"
    proc = _start(cfg, tiny_data, out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    train_loss, val_loss, steps = _final(out)
    assert (train_loss, val_loss) == uninterrupted[:2]                 # bit-exact on CPU
    assert steps == sorted(set(steps)), "metrics of the lost steps must not be logged twice"
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith(("step-00000003",
                                                                                    "step-00000006",
                                                                                    "step-00000009"))
    kept = [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")]
    assert kept == [9, 10]                                              # keep_last = 2
    assert not list((out / "checkpoints").glob("*.tmp-*"))


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, tiny_data, uninterrupted):
    cfg, out = _config(tmp_path), tmp_path / "out"
    proc = _start(cfg, tiny_data, out)
    _wait_for_checkpoint(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stdout.read()[-3000:]
    steps = [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")]
    done = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert steps[-1] == done < STEPS                   # the last finished step was saved on the way out
    proc = _start(cfg, tiny_data, out)
    assert proc.wait(timeout=600) == 0
    assert _final(out)[:2] == uninterrupted[:2]


def test_restart_without_a_checkpoint_logs_each_step_once(tmp_path, tiny_data):
    """Killed before its first checkpoint: the restart starts over, and the dead attempt's metrics lines go."""
    cfg = load_config("tiny", overrides=OVERRIDES[:-1] + ["train.pretrain.steps=2", "train.pretrain.ckpt_every=5"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/lm_loss": 9.0}) + "\n" for s in (0, 1)))
    trainer = Trainer(cfg, "pretrain", tiny_data, out)
    trainer.fit()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    (tmp_path / "step-00000005").mkdir()                               # no meta.json: incomplete
    (tmp_path / "step-00000007.tmp-ab12cd34").mkdir()
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / "meta.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000003"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    cfg = load_config("tiny", overrides=OVERRIDES + ["train.pretrain.steps=5", "train.pretrain.ckpt_every=2"])
    trainer = Trainer(cfg, "pretrain", tiny_data, tmp_path)
    trainer.model.head.register_forward_hook(
        lambda m, i, o: o * float("nan") if m.training and trainer.step >= 3 else o)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss .* at step 4.*step-00000002"):
        trainer.fit()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == [2]
    assert not (tmp_path / "hf").exists()
    state = torch.load(tmp_path / "checkpoints" / "step-00000002" / "trainer-rank00000.pt", weights_only=False)
    assert state["step"] == 2 and state["samples"] == 8


def test_out_of_range_token_ids_are_refused_on_the_host(tmp_path, tiny_data):
    """The trainer checks each micro-batch's ids before moving it (the model's own check, a GPU sync, is off)."""
    cfg = load_config("tiny", overrides=OVERRIDES + ["train.pretrain.steps=1"])
    trainer = Trainer(cfg, "pretrain", tiny_data, tmp_path)
    assert trainer.model.validate_token_ids is False
    rows = trainer.train_rows
    real = rows.batch

    def corrupt(indices):
        b = real(indices)
        b.inputs[0, 3] = cfg.model.vocab_size
        return b
    rows.batch = corrupt
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=2048\)"):
        trainer.train_step()
