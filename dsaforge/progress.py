"""Progress for long work: a rich bar on a terminal, a plain line every few seconds in logs (KFP pods, CI)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`with Progress("train", total=steps) as p: ... p.update(1, loss=...)`; shows rate and ETA."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it", every_s: float = 5.0,
                 stream=None) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.stream = stream or sys.stderr
        self.n, self.fields = 0, {}
        self._t0 = self._last = time.monotonic()
        self._rich = None
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      transient=False)
            self._task = self._rich.add_task(desc, total=total, info="")

    def __enter__(self) -> "Progress":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()
        else:
            self._line(final=True)

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self.fields.update(fields)
        if self._rich is not None:
            self._rich.update(self._task, advance=n, info=self._info())
        elif time.monotonic() - self._last >= self.every_s:
            self._line()

    def _info(self) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total and not final and rate > 0:
            parts.append(f"{100 * self.n / self.total:.0f}% eta {_fmt((self.total - self.n) / rate)}")
        parts.append(f"{rate:.3g} {self.unit}/s, {_fmt(elapsed)}" + (" done" if final else ""))
        if self.fields:
            parts.append(self._info())
        print(" | ".join(parts), file=self.stream, flush=True)


def track(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total=total, unit=unit) as p:
        for item in items:
            yield item
            p.update(1)
