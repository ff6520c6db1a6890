"""The `prepare-data` stage: corpus -> deduplicated documents -> BPE tokenizer -> packed Parquet token shards.

Run: `dsaforge stage prepare-data --preset tiny --out DIR` (CPU); in a pipeline it is the first component.
Output layout (written to a temporary sibling and renamed, so a crash never leaves a complete-looking dataset):
  documents.parquet  id, text, source, bytes, sha256, split
  tokenizer.json     byte-level BPE with DeepSeek-V3.2's special tokens
  train-00000.parquet, val-00000.parquet, ...   `tokens`: list<int32> of seq_len + 1 (a row gives seq_len targets)
  manifest.json      schema version, counts, hashes, special-token ids
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dsaforge.config import Config
from dsaforge.data.ingest import DataError, Document, read_source
from dsaforge.data.tokenizer import BOS, EOS, SPECIAL_TOKENS, train_tokenizer
from dsaforge.outputs import check_out_dir, staged_dir
from dsaforge.progress import Progress

SCHEMA_VERSION = 1
ROW_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()), nullable=False)])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode()
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", errors="ignore")


def collect_documents(cfg: Config) -> tuple[list[Document], dict]:
    d = cfg.data
    docs, seen, stats = [], set(), {"documents_read": 0, "duplicates": 0, "too_short": 0, "truncated": 0}
    with Progress("ingest", total=d.max_documents, unit="doc") as progress:
        for source in d.sources:
            for doc in read_source(source, d.text_field):
                stats["documents_read"] += 1
                text = doc.text
                if len(text.encode()) < d.min_doc_bytes:
                    stats["too_short"] += 1
                    continue
                if len(text.encode()) > d.max_doc_bytes:
                    text, stats["truncated"] = _truncate_utf8(text, d.max_doc_bytes), stats["truncated"] + 1
                    doc = Document(text, doc.source)
                if d.dedup:
                    if doc.sha256 in seen:
                        stats["duplicates"] += 1
                        continue
                    seen.add(doc.sha256)
                docs.append(doc)
                progress.update(1)
                if d.max_documents and len(docs) >= d.max_documents:
                    break
            if d.max_documents and len(docs) >= d.max_documents:
                break
    if not docs:
        raise DataError(f"no documents found in {', '.join(d.sources)} (after dropping documents under "
                        f"{d.min_doc_bytes} bytes and duplicates)")
    return docs, stats


def _split(doc: Document, seed: int, val_fraction: float) -> str:
    # Hash-based split: a document's split does not depend on what else is in the corpus.
    h = int(hashlib.sha256(f"{seed}:{doc.sha256}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def pack(token_lists: Iterator[list[int]], row_len: int) -> Iterator[list[int]]:
    """Concatenate documents and cut rows of exactly `row_len` tokens; the final partial row is dropped."""
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= row_len:
            yield buf[:row_len]
            buf = buf[row_len:]


def _write_shards(rows: Iterator[list[int]], out: Path, split: str, shard_rows: int) -> list[dict]:
    shards, batch = [], []

    def flush() -> None:
        path = out / f"{split}-{len(shards):05d}.parquet"
        pq.write_table(pa.table({"tokens": pa.array(batch, type=pa.list_(pa.int32()))}, schema=ROW_SCHEMA), path)
        shards.append({"file": path.name, "rows": len(batch), "bytes": path.stat().st_size, "sha256": _sha256_file(path)})
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) == shard_rows:
            flush()
    if batch:
        flush()
    return shards


def prepare(cfg: Config, out_dir: Path) -> dict:
    """Build the dataset in a temporary sibling of `out_dir`, then rename it into place."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DataError(f"output directory is not empty: {out_dir} (choose a new one; nothing was changed)")
    check_out_dir(out_dir, "prepare-data", resumable=False)      # a file in the way
    t0 = time.time()
    d, seed = cfg.data, cfg.data.seed
    docs, stats = collect_documents(cfg)
    splits = [_split(doc, seed, d.val_fraction) for doc in docs]
    if d.val_fraction > 0 and "val" not in splits:
        splits[-1] = "val"   # a tiny corpus still gets a validation document
    if "train" not in splits:
        raise DataError(f"only {len(docs)} document(s): too few to split into train and validation")

    with staged_dir(out_dir) as tmp:
        pq.write_table(pa.table({
            "id": [f"doc-{i:08d}" for i in range(len(docs))],
            "text": [doc.text for doc in docs],
            "source": [doc.source for doc in docs],
            "bytes": pa.array([len(doc.text.encode()) for doc in docs], pa.int64()),
            "sha256": [doc.sha256 for doc in docs],
            "split": splits,
        }), tmp / "documents.parquet")

        def tokenizer_corpus() -> Iterator[str]:
            budget = d.tokenizer_train_bytes
            for doc, split in zip(docs, splits):
                if split == "train" and budget > 0:
                    budget -= len(doc.text.encode())
                    yield doc.text

        tok = train_tokenizer(tokenizer_corpus(), cfg.model.vocab_size)
        tok.save(str(tmp / "tokenizer.json"))
        bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)

        counts = {"train": {"documents": 0, "tokens": 0, "bytes": 0}, "val": {"documents": 0, "tokens": 0, "bytes": 0}}
        shards = {}
        row_len = d.seq_len + 1
        for split in ("train", "val"):
            chosen = [doc for doc, s in zip(docs, splits) if s == split]

            def encoded(chosen=chosen, split=split) -> Iterator[list[int]]:
                with Progress(f"tokenize {split}", total=len(chosen), unit="doc") as progress:
                    for i in range(0, len(chosen), 64):
                        batch = chosen[i:i + 64]
                        for doc, enc in zip(batch, tok.encode_batch([x.text for x in batch])):
                            ids = [bos, *enc.ids, eos]
                            counts[split]["documents"] += 1
                            counts[split]["tokens"] += len(ids)
                            counts[split]["bytes"] += len(doc.text.encode())
                            yield ids
                        progress.update(len(batch))

            shards[split] = _write_shards(pack(encoded(), row_len), tmp, split, d.shard_sequences)
        if not shards["train"]:
            raise DataError(f"the training split has {counts['train']['tokens']} tokens: fewer than one sequence "
                            f"of {row_len}; add documents or lower data.seq_len")

        tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "seq_len": d.seq_len,
            "row_tokens": row_len,
            "vocab_size": tok.get_vocab_size(),
            "model_vocab_size": cfg.model.vocab_size,
            "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
            "seed": seed,
            "sources": list(d.sources),
            "counts": {**stats, "documents": len(docs), **{f"{s}_{k}": v for s in counts for k, v in counts[s].items()},
                       "train_sequences": sum(s["rows"] for s in shards["train"]),
                       "val_sequences": sum(s["rows"] for s in shards["val"])},
            "bytes_per_token": (counts["train"]["bytes"] + counts["val"]["bytes"]) / max(tokens, 1),
            "shards": shards,
            "documents_sha256": _sha256_file(tmp / "documents.parquet"),
            "tokenizer_sha256": _sha256_file(tmp / "tokenizer.json"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    manifest["seconds"] = round(time.time() - t0, 2)
    return manifest


_MANIFEST_KEYS = ("schema_version", "seq_len", "row_tokens", "vocab_size", "special_tokens", "shards")


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no manifest.json (not a prepared dataset, or an incomplete one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON manifest ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a dataset manifest (top level is {type(manifest).__name__}, not an object)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {manifest.get('schema_version')} (this dsaforge reads {SCHEMA_VERSION})")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path}: the manifest lacks {', '.join(missing)}")
    shards = manifest["shards"]
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")) or not all(
            isinstance(x, dict) and {"file", "rows", "sha256"} <= set(x) for s in ("train", "val") for x in shards[s]):
        raise DataError(f"{path}: `shards` must hold train and val lists of {{file, rows, sha256}} entries")
    return manifest


def verify_dataset(dataset_dir: str | Path, model_vocab_size: int | None = None) -> dict:
    """Check that the files are what the manifest promises, once per stage: every shard listed once, with its
    size and sha256; the tokenizer's vocabulary size; every row seq_len + 1 tokens long with ids inside the
    vocabulary (and inside the model's embedding). Returns what was verified (recorded in the stage's run)."""
    import pyarrow.compute as pc

    root = Path(dataset_dir)
    manifest = load_manifest(root)
    where = root / "manifest.json"
    entries = [(split, x) for split in ("train", "val") for x in manifest["shards"][split]]
    names = [x["file"] for _, x in entries]
    digests = [x["sha256"] for _, x in entries]
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:         # identical content under two names is legal (a repetitive corpus); one file twice is not
        raise DataError(f"{where}: shard {dup[0]} is listed more than once")
    if manifest["row_tokens"] != manifest["seq_len"] + 1:
        raise DataError(f"{where}: row_tokens {manifest['row_tokens']} is not seq_len {manifest['seq_len']} + 1")
    vocab = manifest["vocab_size"]
    tok_path = root / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer

        real = Tokenizer.from_file(str(tok_path)).get_vocab_size()
        if real != vocab:
            raise DataError(f"{where}: vocab_size {vocab} but {tok_path.name} has {real} tokens")
    if model_vocab_size is not None and vocab > model_vocab_size:
        raise DataError(f"{where}: vocab_size {vocab} exceeds model.vocab_size {model_vocab_size}")
    for key, name in (("documents_sha256", "documents.parquet"), ("tokenizer_sha256", "tokenizer.json")):
        if key in manifest and (root / name).is_file() and _sha256_file(root / name) != manifest[key]:
            raise DataError(f"{root / name}: sha256 does not match the manifest's {key}")
    total = 0
    for split, x in entries:
        path = root / x["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if "bytes" in x and size != x["bytes"]:
            raise DataError(f"{path}: {size} bytes, the manifest says {x['bytes']}")
        if _sha256_file(path) != x["sha256"]:
            raise DataError(f"{path}: sha256 does not match the manifest (a changed, swapped or foreign shard)")
        total += size
        try:
            col = pq.read_table(path).column("tokens")
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise DataError(f"{path}: unreadable Parquet shard ({str(e).splitlines()[0]})") from None
        lengths = pc.list_value_length(col)
        if len(col) and (pc.min(lengths).as_py() != manifest["row_tokens"] or
                         pc.max(lengths).as_py() != manifest["row_tokens"]):
            raise DataError(f"{path}: rows are not row_tokens={manifest['row_tokens']} long "
                            f"(seq_len {manifest['seq_len']} + 1) as the manifest says")
        values = pc.list_flatten(col)
        if len(values):
            lo, hi = pc.min(values).as_py(), pc.max(values).as_py()
            if lo < 0 or hi >= vocab:
                raise DataError(f"{path}: token id {hi if hi >= vocab else lo} outside the manifest's vocab_size {vocab}")
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return {"digest": digest, "shards": len(entries), "bytes": total, "vocab_size": vocab,
            "seq_len": manifest["seq_len"]}


def read_rows(dataset_dir: str | Path, split: str) -> pa.ChunkedArray:
    """All packed rows of a split as one [N, row_tokens] int32 array source (verified against the manifest)."""
    manifest = load_manifest(dataset_dir)
    tables = []
    for shard in manifest["shards"][split]:
        path = Path(dataset_dir) / shard["file"]
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet shard ({str(e).splitlines()[0]})") from None
        if table.schema != ROW_SCHEMA or table.num_rows != shard["rows"]:
            raise DataError(f"{path}: shard does not match the manifest (schema or row count)")
        tables.append(table)
    return pa.concat_tables(tables).column("tokens") if tables else pa.chunked_array([], pa.list_(pa.int32()))


def run(ctx) -> dict:
    """Stage entry point (see dsaforge.stages)."""
    cfg, tracker = ctx.cfg, ctx.tracker
    tracker.log_params({f"data.{k}": v for k, v in cfg.data.model_dump().items()})
    manifest = prepare(cfg, ctx.out_dir)
    c = manifest["counts"]
    metrics = {"documents": c["documents"], "duplicates": c["duplicates"], "train_tokens": c["train_tokens"],
               "val_tokens": c["val_tokens"], "train_sequences": c["train_sequences"],
               "val_sequences": c["val_sequences"], "bytes_per_token": manifest["bytes_per_token"],
               "vocab_size": manifest["vocab_size"], "seconds": manifest["seconds"]}
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(ctx.out_dir / "manifest.json")
    tracker.log_artifact(ctx.out_dir / "tokenizer.json")
    tracker.log_dataset("corpus", ",".join(cfg.data.sources), manifest["documents_sha256"][:16], context="training",
                        profile={"documents": c["documents"], "tokens": c["train_tokens"] + c["val_tokens"]})
    return metrics
