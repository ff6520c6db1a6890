"""Multi-node rendezvous from Kubeflow Trainer's torch runtime environment (PET_*).

Run: python -m pytest tests/train/test_rendezvous.py -q
"""
from pathlib import Path

import pytest

import dsaforge
from dsaforge.config import ConfigError, load_config
from dsaforge.model.train.stages import rendezvous_args

PET = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
       "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}


def _parallel(nnodes, nproc=8):
    batches = [f"train.{s}.batch_size=64" for s in ("pretrain", "warmup", "sparse")]   # divisible over 16 ranks
    return load_config("tiny", overrides=[f"parallel.nnodes={nnodes}", f"parallel.nproc_per_node={nproc}",
                                          *batches]).parallel


def test_single_node_is_standalone():
    assert rendezvous_args(_parallel(1), PET) == ["--standalone"]


def test_multi_node_reads_kubeflow_trainer_env():
    assert rendezvous_args(_parallel(2), PET) == ["--node-rank=1", "--master-addr=job-node-0-0.job",
                                                   "--master-port=29400"]
    # the old names are not what Kubeflow Trainer sets: they must not be needed
    legacy = {"NODE_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="PET_NODE_RANK and PET_MASTER_ADDR"):
        rendezvous_args(_parallel(2), legacy)


@pytest.mark.parametrize("key,value,field", [("PET_NNODES", "4", "parallel.nnodes=2"),
                                             ("PET_NPROC_PER_NODE", "4", "parallel.nproc_per_node=8")])
def test_env_that_disagrees_with_the_config_is_named(key, value, field):
    with pytest.raises(ConfigError, match=f"{key}={value} .* {field}"):
        rendezvous_args(_parallel(2), {**PET, key: value})


def test_training_doc_names_the_pet_variables():
    doc = (Path(dsaforge.__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    assert "PET_NODE_RANK" in doc and "PET_MASTER_ADDR" in doc and "`NODE_RANK`" not in doc
