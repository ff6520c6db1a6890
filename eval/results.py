"""What every suite returns and how it is kept: per-item rows as Parquet, a JSON summary, and the summary's
numbers as MLflow metrics under `eval/<suite>/`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class SuiteResult:
    suite: str
    rows: list[dict[str, Any]]                           # one per scored item (prompt, sample, cell, ...)
    summary: dict[str, Any]                              # flat numbers (and a few strings) a reader checks first
    info: dict[str, Any] = field(default_factory=dict)   # settings and notes kept in the JSON only

    def metrics(self) -> dict[str, float]:
        """The summary's finite numbers, named eval/<suite>/<key>."""
        return {f"eval/{self.suite}/{k}": float(v) for k, v in self.summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}

    def write(self, out_dir: Path) -> Path:
        d = Path(out_dir) / self.suite
        d.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self.rows) if self.rows else pa.table({"empty": pa.array([], pa.bool_())})
        tmp = d / "results.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(d / "results.parquet")
        (d / "summary.json").write_text(json.dumps({"suite": self.suite, "summary": self.summary, **self.info},
                                                   indent=2, default=str) + "\n")
        return d


def read_results(out_dir: Path, suite: str) -> tuple[pa.Table, dict]:
    d = Path(out_dir) / suite
    return pq.read_table(d / "results.parquet"), json.loads((d / "summary.json").read_text())
