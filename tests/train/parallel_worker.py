"""torchrun worker for test_parallel.py: the stages named on the command line in one job, one layout.

    torchrun --nproc-per-node 2 tests/train/parallel_worker.py CFG.json DATA INIT OUT pretrain warmup sparse
pretrain starts from scratch; warmup and sparse start from INIT (the hf/ export of a trained pretrain).
Each stage also writes OUT/<stage>/classes.json: the megatron classes that reduced the gradients and stepped, and
the blocks rank 0 holds.
"""
import json
import sys
from pathlib import Path

from dsaforge.config import Config
from dsaforge.model.train.trainer import Trainer

cfg_path, data, init, out, *names = sys.argv[1:]
cfg = Config.model_validate_json(Path(cfg_path).read_text())
trainer = None
for name in names:
    trainer = Trainer(cfg, name, Path(data), Path(out) / name, None if name == "pretrain" else Path(init))
    trainer.fit()
    if trainer.is_main:
        opt = trainer.optimizer.optimizer
        classes = {"ddp": type(trainer.optimizer.ddp).__name__, "optimizer": type(opt).__name__,
                   "chained": [type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])],
                   "stage_layers": [i for i, b in enumerate(trainer.model.layers) if hasattr(b, "attn")]}
        (Path(out) / name / "classes.json").write_text(json.dumps(classes))
trainer.close()
