"""Stage output directories: refused when they hold something else, built aside and published atomically.

A stage either writes its whole output in a temporary sibling and renames it into place (`staged_dir`:
prepare-data, synthesize), so a kill leaves the previous state or the complete new one and never a mix; or, for
the training stages, resumes inside its own directory, which a marker file ties to the stage that owns it
(`claim`), while everything a later stage reads (the HF export, metrics.json) is itself written atomically.

Temporary siblings of killed runs are removed by the next run that publishes into the same place.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dsaforge.config import ConfigError

MARKER = ".dsaforge-stage.json"


def check_out_dir(out: Path, stage: str, resumable: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory that is not this stage's own unfinished output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a directory (give a new or empty directory)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    owner = _owner(out)
    if resumable and owner and owner.get("stage") == stage:
        if (out / "metrics.json").exists():
            raise ConfigError(f"output directory {out} already holds a finished {stage} output "
                              "(choose a new one; nothing was changed)")
        return                                           # this stage's own unfinished work: resume it
    what = f"the output of stage {owner['stage']!r}" if owner else "other files"
    raise ConfigError(f"output directory is not empty: {out} holds {what} (choose a new or empty one; "
                      "nothing was changed)")


def _owner(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def claim(out: Path, stage: str, run_id: str | None = None) -> None:
    """Mark `out` as `stage`'s resumable output, with the tracking run that logs it (a resumed attempt reopens
    that run: `previous_run_id`)."""
    out.mkdir(parents=True, exist_ok=True)
    owner = _owner(out) or {}
    if owner.get("stage") != stage or (run_id and owner.get("run_id") != run_id):
        write_atomic(out / MARKER, json.dumps({"stage": stage, "run_id": run_id or owner.get("run_id")}))


def previous_run_id(out: Path, stage: str) -> str | None:
    """The tracking run of an interrupted attempt of `stage` in `out`, if any."""
    owner = _owner(Path(out)) or {}
    return owner.get("run_id") if owner.get("stage") == stage else None


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader sees the old content or the new, never a prefix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of `out` left by runs that were killed (their process is gone)."""
    removed = []
    for p in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success rename it to `out` (which must be absent or empty),
    on any error or kill remove it. `out` is untouched until the rename."""
    out = Path(out)
    check_out_dir(out, "", resumable=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()          # empty (checked above); KFP creates output directories before the task runs
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
