"""`dsaforge eval compare RUN RUN ...`: a side-by-side table of two or more MLflow runs' evaluation metrics.

A RUN is an evaluate stage's run id or a pipeline run's id (its evaluate stage is used). Rows are the metrics under
`--prefix` (default `eval/`) that any of the runs logged; with exactly two runs a last column gives B - A. The table
is printed and written to `--out` (.md, .csv or .json by extension).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional, Sequence

from dsaforge.config import ConfigError


def collect(uri: str, run_ids: Sequence[str], prefix: str = "eval/") -> tuple[list[str], list[str], list[list]]:
    """(column headers, metric names, rows of values or None) for the runs."""
    from dsaforge.tracking_query import run_record

    if len(run_ids) < 2:
        raise ConfigError("eval compare needs at least two runs")
    records = [run_record(uri, r) for r in run_ids]
    names = sorted({k for rec in records for k in rec["metrics"] if k.startswith(prefix)})
    if not names:
        raise ConfigError(f"none of the runs logged a metric under {prefix!r}")
    headers = [f"{rec['tags'].get('dsaforge.eval.checkpoint', rec['name'])} [{rec['run_id'][:8]}]" for rec in records]
    rows = [[rec["metrics"].get(n) for rec in records] for n in names]
    if len(records) == 2:
        headers.append("B - A")
        for row in rows:
            row.append(row[1] - row[0] if None not in row[:2] else None)
    return headers, names, rows


def _cell(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def render_text(headers: list[str], names: list[str], rows: list[list]) -> str:
    first = max(len("metric"), *(len(n) for n in names))
    widths = [max(len(h), *(len(_cell(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(["metric".ljust(first)] + [h.rjust(w) for h, w in zip(headers, widths)])]
    lines.append("  ".join(["-" * first] + ["-" * w for w in widths]))
    for n, r in zip(names, rows):
        lines.append("  ".join([n.ljust(first)] + [_cell(v).rjust(w) for v, w in zip(r, widths)]))
    return "\n".join(lines)


def render_file(path: Path, headers: list[str], names: list[str], rows: list[list]) -> None:
    ext = path.suffix.lower()
    if ext == ".json":
        text = json.dumps({"columns": headers, "metrics": {n: r for n, r in zip(names, rows)}}, indent=2)
    elif ext == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["metric", *headers])
        w.writerows([n, *("" if v is None else v for v in r)] for n, r in zip(names, rows))
        text = buf.getvalue()
    elif ext == ".md":
        text = "\n".join(["| metric | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
                         + [f"| {n} | " + " | ".join(_cell(v) for v in r) + " |" for n, r in zip(names, rows)]) + "\n"
    else:
        raise ConfigError(f"--out {path}: use a .md, .csv or .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def compare(uri: str, run_ids: Sequence[str], out: Optional[Path] = None, prefix: str = "eval/") -> str:
    headers, names, rows = collect(uri, run_ids, prefix)
    if out is not None:
        render_file(Path(out), headers, names, rows)
    return render_text(headers, names, rows)
