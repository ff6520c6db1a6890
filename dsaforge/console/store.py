"""The console's job queue: one SQLite table of runs that outlives the console process.

Workers write their own progress into it (started, MLflow run, outcome), so a run that finishes while the console
is down is recorded all the same; the console only queues, starts, cancels and reconciles.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ACTIVE = (QUEUED, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,            -- also the pipeline run id (kfp.pipeline_run_id) of a local run
    pipeline TEXT NOT NULL,
    backend TEXT NOT NULL,          -- local | kfp
    preset TEXT NOT NULL,
    config_json TEXT NOT NULL,      -- the validated config, as submitted
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,                    -- the local worker's process (group) id while it runs
    remote_id TEXT,                 -- the KFP run id of a remote run
    remote_url TEXT,
    mlflow_run_id TEXT,
    error TEXT,
    note TEXT,                      -- what the console did to the run (cancelled, found interrupted, ...)
    resubmit_of TEXT                -- the run this one re-submitted with edits
);
"""


@dataclass
class Run:
    id: str
    pipeline: str
    backend: str
    preset: str
    config_json: str
    status: str
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    pid: Optional[int] = None
    remote_id: Optional[str] = None
    remote_url: Optional[str] = None
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    note: Optional[str] = None
    resubmit_of: Optional[str] = None
    config: dict = field(default_factory=dict, repr=False)

    @property
    def seconds(self) -> Optional[float]:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


_COLUMNS = [f.name for f in fields(Run) if f.name != "config"]


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: the console's threads and the workers' processes share the file.
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def add(self, pipeline: str, backend: str, preset: str, config: dict, **extra) -> Run:
        run = Run(id=uuid.uuid4().hex, pipeline=pipeline, backend=backend, preset=preset,
                  config_json=json.dumps(config), status=QUEUED, created=time.time(), **extra)
        values = [getattr(run, c) for c in _COLUMNS]
        with self._db() as db:
            db.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        run.config = config
        return run

    def get(self, run_id: str) -> Optional[Run]:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run(row) if row else None

    def list(self, limit: int = 200, status: Optional[tuple[str, ...]] = None) -> list[Run]:
        query, args = "SELECT * FROM runs", []
        if status:
            query += f" WHERE status IN ({', '.join('?' * len(status))})"
            args += list(status)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [_run(r) for r in rows]

    def update(self, run_id: str, only_if: Optional[tuple[str, ...]] = None, only_pid: Optional[int] = None,
               **values) -> bool:
        """Set columns of one run; with `only_if`, only while its status is one of those, and with `only_pid`, only
        while its worker is that process (no lost races)."""
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown run columns: {sorted(unknown)}")
        query = f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        args = [*values.values(), run_id]
        if only_if:
            query += f" AND status IN ({', '.join('?' * len(only_if))})"
            args += list(only_if)
        if only_pid is not None:
            query += " AND pid = ?"
            args.append(only_pid)
        with self._db() as db:
            return db.execute(query, args).rowcount == 1


def _run(row: sqlite3.Row) -> Run:
    run = Run(**{k: row[k] for k in _COLUMNS})
    run.config = json.loads(run.config_json)
    return run
