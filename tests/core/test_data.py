"""Run: python -m pytest tests/core/test_data.py -q"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsaforge.config import load_config
from dsaforge.data import prepare as prep
from dsaforge.data.ingest import DataError, read_source
from dsaforge.data.tokenizer import BOS, EOS, SPECIAL_TOKENS, load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _text(i: int, n: int = 60) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)) + f" doc{i}."


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"t{i}.txt").write_text(_text(i))
    (root / "dup.txt").write_text(_text(0))                      # exact duplicate of t0.txt
    (root / "tiny.txt").write_text("short")                      # below min_doc_bytes
    with open(root / "sub" / "d.jsonl", "w") as f:
        for i in range(6, 10):
            f.write(json.dumps({"text": _text(i), "meta": i}) + "\n")
        f.write("\n")                                            # blank lines are skipped
    pq.write_table(pa.table({"text": [_text(i) for i in range(10, 14)]}), root / "sub" / "p.parquet")
    (root / "ignored.bin").write_bytes(b"\x00\x01")              # not an input suffix
    return root


def _cfg(corpus, **sets):
    overrides = [f"data.sources=[{corpus}]", "data.seq_len=32", "data.shard_sequences=7", "data.val_fraction=0.2",
                 "model.vocab_size=300", "data.max_documents=null"]
    return load_config("tiny", overrides=overrides + [f"{k}={v}" for k, v in sets.items()])


def test_prepare_counts_roundtrip_and_layout(corpus, tmp_path):
    out = tmp_path / "ds"
    m = prep.prepare(_cfg(corpus), out)
    c = m["counts"]
    assert (c["documents_read"], c["duplicates"], c["too_short"], c["documents"]) == (16, 1, 1, 14)
    assert c["train_documents"] + c["val_documents"] == 14 and c["val_documents"] >= 1
    docs = pq.read_table(out / "documents.parquet")
    assert docs.column_names == ["id", "text", "source", "bytes", "sha256", "split"]
    assert docs.num_rows == 14 and len(set(docs.column("sha256").to_pylist())) == 14
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 300 == m["vocab_size"]
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    # every document's text survives an encode/decode round trip
    for text in docs.column("text").to_pylist():
        assert tok.decode(tok.encode(text).ids) == text
    # packed rows: seq_len + 1 tokens, the stream is BOS doc EOS BOS doc EOS ...
    rows = prep.read_rows(out, "train").to_pylist()
    assert rows and all(len(r) == 33 for r in rows)
    assert c["train_sequences"] == len(rows) == c["train_tokens"] // 33
    assert sum(r["rows"] for r in m["shards"]["train"]) == len(rows)
    assert all(r["rows"] <= 7 for r in m["shards"]["train"]) and len(m["shards"]["train"]) > 1
    flat = [t for r in rows for t in r]
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert flat[0] == bos and flat.count(bos) >= flat.count(eos) >= 1
    assert json.loads((out / "manifest.json").read_text())["documents_sha256"] == m["documents_sha256"]


def test_prepare_is_deterministic(corpus, tmp_path):
    a = prep.prepare(_cfg(corpus), tmp_path / "a")
    b = prep.prepare(_cfg(corpus), tmp_path / "b")
    assert a["shards"] == b["shards"] and a["tokenizer_sha256"] == b["tokenizer_sha256"]
    c = prep.prepare(_cfg(corpus, **{"data.seed": 7}), tmp_path / "c")
    assert c["documents_sha256"] != a["documents_sha256"]           # the split column changes with the seed


def test_stdlib_source_needs_no_download():
    docs = [d for _, d in zip(range(5), read_source("python-stdlib"))]
    assert len(docs) == 5 and all(d.source.startswith("python-stdlib:") and d.text for d in docs)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "fine document here"}\n{not json}\n', r"bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', r"nofield.jsonl:1: no string field 'text'"),
    ("bad.parquet", "PAR1 this is not parquet", r"bad.parquet: unreadable Parquet"),
    ("latin.txt", b"caf\xe9 " * 10, r"latin.txt: not UTF-8 text"),
])
def test_corrupt_inputs_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        prep.prepare(_cfg(path), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prep.prepare(_cfg(tmp_path / "nope"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files in this directory"):
        prep.prepare(_cfg(tmp_path / "empty"), tmp_path / "out")
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="no documents found"):
        prep.prepare(_cfg(tmp_path / "short.txt"), tmp_path / "out")


def test_existing_output_is_never_touched(corpus, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prep.prepare(_cfg(corpus), out)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_crash_leaves_no_complete_looking_dataset(corpus, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(prep, "_write_shards", boom)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        prep.prepare(_cfg(corpus), tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.tmp-*"))
    with pytest.raises(DataError, match="no manifest.json"):
        prep.load_manifest(tmp_path / "ds")


def test_shard_tampering_is_detected(corpus, tmp_path):
    out = tmp_path / "ds"
    m = prep.prepare(_cfg(corpus), out)
    shard = out / m["shards"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataError, match="unreadable Parquet shard"):
        prep.read_rows(out, "train")


def test_too_little_text_for_one_sequence(tmp_path):
    (tmp_path / "a.txt").write_text(_text(1, 20))
    (tmp_path / "b.txt").write_text(_text(2, 20))
    with pytest.raises(DataError, match="fewer than one sequence"):
        prep.prepare(_cfg(tmp_path, **{"data.seq_len": 4096}), tmp_path / "out")


def test_fsspec_uri_source(tmp_path):
    """Remote sources go through fsspec; its in-memory filesystem stands in for s3:// or gs:// here."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/corpus-{tmp_path.name}/part{i}.txt", _text(i).encode())
    fs.pipe(f"/corpus-{tmp_path.name}/rows.jsonl", (json.dumps({"text": _text(9)}) + "\n").encode())
    m = prep.prepare(_cfg(f"memory://corpus-{tmp_path.name}", **{"data.val_fraction": 0.0}), tmp_path / "ds")
    assert m["counts"]["documents"] == 4
    sources = pq.read_table(tmp_path / "ds" / "documents.parquet").column("source").to_pylist()
    assert all(s.startswith("memory://") for s in sources)
    with pytest.raises(DataError, match="no input files found"):
        prep.prepare(_cfg("memory://nothing-here"), tmp_path / "ds2")
