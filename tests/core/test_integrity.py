"""Inputs are what they promise, outputs are published whole: manifest verification, config checks that need no
model, non-empty and file --out, stale temporary folders, one line per store error.

Run: python -m pytest tests/core/test_integrity.py -q
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsaforge.cli import main
from dsaforge.config import ConfigError, load_config
from dsaforge.data import prepare as prep
from dsaforge.data.ingest import DataError
from dsaforge.outputs import check_out_dir, clean_stale, staged_dir

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    (root / "corpus").mkdir()
    for i in range(12):
        (root / "corpus" / f"t{i}.txt").write_text(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(80)))
    cfg = load_config("tiny", overrides=[f"data.sources=[{root / 'corpus'}]", "data.seq_len=32",
                                         "data.shard_sequences=5", "data.val_fraction=0.2", "model.vocab_size=300",
                                         "data.max_documents=null"])
    prep.prepare(cfg, root / "ds")
    return root / "ds"


@pytest.fixture
def copy(dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_a_prepared_dataset_verifies(dataset):
    v = prep.verify_dataset(dataset, model_vocab_size=300)
    m = prep.load_manifest(dataset)
    assert v["shards"] == len(m["shards"]["train"]) + len(m["shards"]["val"]) >= 3
    assert len(v["digest"]) == 64 and v["bytes"] == sum(x["bytes"] for s in ("train", "val") for x in m["shards"][s])


def test_swapped_shards_are_caught(copy):
    a, b = copy / "train-00000.parquet", copy / "train-00001.parquet"
    tmp = copy / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(DataError, match="train-00000.parquet: .*(sha256|bytes)"):
        prep.verify_dataset(copy)


def test_a_shard_listed_twice_is_caught(copy):
    _edit_manifest(copy, lambda m: m["shards"]["train"].append(dict(m["shards"]["train"][0])))
    with pytest.raises(DataError, match="listed more than once"):
        prep.verify_dataset(copy)


def test_a_lying_vocab_size_is_caught(copy):
    _edit_manifest(copy, lambda m: m.__setitem__("vocab_size", m["vocab_size"] - 40))
    with pytest.raises(DataError, match="vocab_size .* tokenizer.json has"):
        prep.verify_dataset(copy)
    (copy / "tokenizer.json").unlink()          # no tokenizer to compare with: the token ids still tell
    with pytest.raises(DataError, match="token id .* outside the manifest's vocab_size"):
        prep.verify_dataset(copy)


def test_a_dataset_larger_than_the_model_vocabulary_is_caught(dataset):
    with pytest.raises(DataError, match="exceeds model.vocab_size 100"):
        prep.verify_dataset(dataset, model_vocab_size=100)


def test_a_lying_seq_len_is_caught(copy):
    _edit_manifest(copy, lambda m: m.update(seq_len=m["seq_len"] * 2, row_tokens=m["seq_len"] * 2 + 1))
    with pytest.raises(DataError, match="rows are not row_tokens=65 long"):
        prep.verify_dataset(copy)


def test_a_changed_shard_of_the_same_size_is_caught(copy):
    path = copy / "val-00000.parquet"
    rows = pq.read_table(path).column("tokens").to_pylist()
    rows[0][0] = (rows[0][0] + 1) % 250
    pq.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.int32()))}, schema=prep.ROW_SCHEMA), path)
    with pytest.raises(DataError, match="val-00000.parquet: .*(sha256|bytes)"):
        prep.verify_dataset(copy)


@pytest.mark.parametrize("content,message", [(b"\x89PNG\r\n\x1a\n\x00\x00", "not a valid JSON manifest"),
                                             (b"{not json", "not a valid JSON manifest"),
                                             (b"[1, 2]", "top level is list"),
                                             (b'{"schema_version": 1, "seq_len": 8}', "lacks row_tokens")])
def test_a_broken_manifest_is_one_line_naming_the_file(copy, content, message):
    (copy / "manifest.json").write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        prep.load_manifest(copy)
    assert str(copy / "manifest.json") in str(e.value) and "\n" not in str(e.value)


# -- config errors that the config alone reveals -------------------------------------------------------------------

@pytest.mark.parametrize("sets,message", [
    (["train.pretrain.batch_size=6", "train.pretrain.micro_batch_size=4"],
     "train.pretrain.batch_size 6 is not a multiple of micro_batch_size 4"),
    (["train.sparse.seq_len=4096", "model.max_seq_len=2048"], "train.sparse.seq_len 4096 exceeds model.max_seq_len 2048"),
])
def test_config_errors_are_caught_at_validation(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=sets)


def test_cli_config_errors_exit_2_before_any_work(capsys, tmp_path):
    rc = main(["stage", "pretrain", "--no-track", "--out", str(tmp_path / "o"), "--input", f"prepare-data={tmp_path}",
               "--set", "train.pretrain.batch_size=6", "--set", "train.pretrain.micro_batch_size=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "micro_batch_size 4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_binary_config_file_is_exit_2_naming_it(capsys, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    rc = main(["config", "show", "--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and len(err.strip().splitlines()) == 1


def test_out_that_is_a_file_is_exit_2(capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    for stage in ("prepare-data", "synthesize"):
        rc = main(["stage", stage, "--no-track", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"output {out} is a file" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "not a directory"


@pytest.mark.parametrize("stage", ["pretrain", "synthesize"])
def test_non_empty_out_is_refused(capsys, tmp_path, stage):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["stage", stage, "--no-track", "--out", str(out)]
    if stage == "pretrain":
        args += ["--input", f"prepare-data={tmp_path}"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_a_stage_may_resume_its_own_output_but_not_another_stages(tmp_path):
    from dsaforge.outputs import claim

    out = tmp_path / "pre"
    claim(out, "pretrain", "run-1")
    (out / "metrics.jsonl").write_text("")
    check_out_dir(out, "pretrain", resumable=True)             # its own unfinished work: resumed
    with pytest.raises(ConfigError, match="holds the output of stage 'pretrain'"):
        check_out_dir(out, "warmup", resumable=True)
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished pretrain output"):
        check_out_dir(out, "pretrain", resumable=True)


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}-abcd1234"
    (stale / "envs").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getppid()}-abcd1234"      # a run still going: left alone
    live.mkdir()
    with staged_dir(tmp_path / "out") as build:
        (build / "x").write_text("1")
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "x").read_text() == "1"
    assert not clean_stale(tmp_path / "out")


def test_a_failed_build_leaves_the_output_as_it_was(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "out") as build:
            (build / "half").write_text("x")
            raise RuntimeError("killed")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# -- store errors are one line naming the store ----------------------------------------------------------------------

def test_corrupt_store_is_one_line_naming_it(tmp_path):
    from dsaforge.tracking import TrackingError, _client

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TrackingError) as e:
        _client(f"sqlite:///{db}")
    assert str(db) in str(e.value) and "not an SQLite database" in str(e.value) and "\n" not in str(e.value)


def test_read_only_store_is_one_line_naming_it(tmp_path):
    from dsaforge.tracking import store_problem

    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)")
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as raised:
        ro.execute("insert into t values (1)")
    msg = str(store_problem(f"sqlite:///{db}", raised.value))
    assert msg == f"MLflow store {db} is read-only (attempt to write a readonly database)"


def test_cli_store_error_exit_2(capsys, tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage" * 64)
    rc = main(["stage", "prepare-data", "--out", str(tmp_path / "o"), "--set", f"tracking.uri=sqlite:///{db}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(db) in err and len(err.strip().splitlines()) == 1


def test_a_resumed_stage_reopens_its_own_run(tmp_path):
    from dsaforge.outputs import claim
    from dsaforge.tracking import stage_run

    cfg = load_config("tiny", overrides=[f"pipeline.home={tmp_path}", "tracking.system_metrics=false"])
    out = tmp_path / "pre"
    with pytest.raises(RuntimeError):
        with stage_run(cfg, "pretrain", out_dir=out) as first:
            claim(out, "pretrain", first.run_id)            # what run_stage records before training
            (out / "metrics.jsonl").write_text("")
            raise RuntimeError("killed")
    with stage_run(cfg, "pretrain", out_dir=out) as again:
        pass
    assert again.run_id == first.run_id
    run = again._client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dsaforge.resumed"] == "true"
    with stage_run(cfg, "pretrain", out_dir=tmp_path / "other") as fresh:   # another directory: another run
        pass
    assert fresh.run_id != first.run_id
