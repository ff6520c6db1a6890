"""The offline corpus behind the search tool: the data stage's documents when available, else docstrings of the
standard library read with `ast` (no module is imported, so nothing runs)."""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Optional


def stdlib_documents(limit: int) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        mod = path.stem if path.name != "__init__.py" else path.parent.name
        for node in [tree] + [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                name = mod if node is tree else f"{mod}.{node.name}"
                docs.append({"id": f"stdlib:{name}", "title": name, "text": doc[:2000]})
                if len(docs) >= limit:
                    return docs
    return docs


def parquet_documents(path: Path, limit: int) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "text"])
    docs = []
    for row in table.slice(0, limit).to_pylist():
        text = str(row["text"]).strip()
        if len(text) > 80:
            docs.append({"id": f"doc:{row['id']}", "title": text.split("\n", 1)[0][:60], "text": text[:2000]})
    return docs


def build_corpus(out_file: Path, data_dir: Optional[Path], limit: int = 1500) -> dict:
    docs = []
    source = "stdlib-docstrings"
    if data_dir is not None and (data_dir / "documents.parquet").exists():
        docs = parquet_documents(data_dir / "documents.parquet", limit)
        source = "prepare-data"
    if len(docs) < 50:          # too small a data-stage corpus to hide facts in: top up from the standard library
        docs += stdlib_documents(limit - len(docs))
        source = source if source == "stdlib-docstrings" else source + "+stdlib-docstrings"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return {"documents": len(docs), "source": source}
