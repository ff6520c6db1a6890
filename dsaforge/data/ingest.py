"""Read documents from local files, fsspec URIs or the built-in `python-stdlib` source.

Every reader yields `Document`s in a deterministic order; a file that cannot be read raises `DataError` naming it.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet", ".py")


class DataError(ValueError):
    """Input data is missing, empty or corrupt; the message names the file."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _stdlib() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test fixtures are deliberately not UTF-8
        yield Document(text, f"python-stdlib:{path.relative_to(root)}")


def _read_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _from_bytes(data: bytes, name: str, text_field: str) -> Iterator[Document]:
    if name.endswith(".jsonl"):
        for lineno, line in enumerate(_read_text(data, name).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{name}:{lineno}: no string field {text_field!r}")
            yield Document(record[text_field], f"{name}:{lineno}")
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data), columns=[text_field])
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{name}: unreadable Parquet ({str(e).splitlines()[0]})") from None
        except KeyError:
            raise DataError(f"{name}: no column {text_field!r}") from None
        for row, text in enumerate(table.column(0).to_pylist()):
            if isinstance(text, str):
                yield Document(text, f"{name}#{row}")
    else:
        yield Document(_read_text(data, name), name)


def _local(path: Path, text_field: str) -> Iterator[Document]:
    if not path.exists():
        raise DataError(f"input not found: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if path.is_dir() and not files:
        raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
    for f in files:
        yield from _from_bytes(f.read_bytes(), str(f), text_field)


def _remote(uri: str, text_field: str) -> Iterator[Document]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise DataError(f"{uri}: cannot open this URI ({e})") from None
    try:
        files = [root] if fs.isfile(root) else sorted(p for p in fs.find(root) if p.endswith(SUFFIXES))
    except OSError as e:
        raise DataError(f"{uri}: cannot list ({e})") from None
    if not files:
        raise DataError(f"{uri}: no input files found")
    for f in files:
        with fs.open(f, "rb") as fh:
            yield from _from_bytes(fh.read(), fs.unstrip_protocol(f), text_field)


def read_source(source: str, text_field: str = "text") -> Iterator[Document]:
    if source == "python-stdlib":
        return _stdlib()
    if "://" in source and not source.startswith("file://"):
        return _remote(source, text_field)
    return _local(Path(source.removeprefix("file://")), text_field)
