"""Progress of long work, shown one way everywhere: rich bars, also across processes.

A command that runs as a child of another (``sop run`` starts ``sop demos`` and ``sop pretrain`` with their
output in a log file) writes its bars to a small JSON file (``--progress-file``); the parent polls it and draws
the same bars in its own terminal::

    with progress_bars(console) as bars:                    # the columns every command uses
        job = bars.add_task("behaviour cloning", total=600, note="")

    out = ProgressFile(path)                                # in the child
    out.update("behaviour cloning", completed=25, total=600, note="loss 0.0213")

    mirror_until_done(child_running, path, console)         # in the parent

The file holds ``{"bars": {name: {"completed": n, "total": t, "note": text}}}``; it is replaced atomically, so a
reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bars(console: Console | None = None, *, transient: bool = False) -> Progress:
    """A rich ``Progress`` with SOP's columns: what, bar, done/total, a ``note`` field, elapsed, remaining."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=transient)


class ProgressFile:
    """The bars of one command, written for another process to show (see the module doc)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.bars: dict[str, dict[str, object]] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, name: str, *, completed: int | None = None, total: int | None = None,
               note: str | None = None) -> None:
        """Set one bar's fields (others keep their value) and rewrite the file; nothing without a path."""
        bar = self.bars.setdefault(name, {"completed": 0, "total": None, "note": ""})
        for key, value in (("completed", completed), ("total", total), ("note", note)):
            if value is not None:
                bar[key] = value
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bars": self.bars}))
        os.replace(tmp, self.path)


class PerKeyBars:
    """One bar per key (e.g. demonstrations per task), drawn here and/or written to a progress file."""

    def __init__(self, totals: dict[str, int], *, bars: Progress | None = None, out: ProgressFile | None = None,
                 label: str = "") -> None:
        self.bars, self.out, self.label = bars, out, label
        self.totals = dict(totals)
        self.done = dict.fromkeys(totals, 0)
        self.written = dict.fromkeys(totals, 0)
        self.ids: dict[str, TaskID] = {}
        for key, total in totals.items():
            if bars is not None:
                self.ids[key] = bars.add_task(f"{label}{key}", total=total, note="")
            if out is not None:
                out.update(f"{label}{key}", completed=0, total=total, note="")

    def advance(self, key: str, *, written: bool = True) -> None:
        self.done[key] = self.done.get(key, 0) + 1
        self.written[key] = self.written.get(key, 0) + int(written)
        skipped = self.done[key] - self.written[key]
        note = f"{self.written[key]} written" + (f" · {skipped} skipped" if skipped else "")
        self._show(key, self.done[key], note)

    def finish(self) -> None:
        """Every bar full: what was not advanced was already stored (skipped before any work)."""
        for key, total in self.totals.items():
            self._show(key, total, f"{self.written[key]} written · {total - self.written[key]} already stored")

    def _show(self, key: str, completed: int, note: str) -> None:
        if self.bars is not None and key in self.ids:
            self.bars.update(self.ids[key], completed=completed, note=note)
        if self.out is not None:
            self.out.update(f"{self.label}{key}", completed=completed, note=note)


def read_progress(path: Path) -> dict[str, dict[str, object]]:
    """The bars a child wrote (empty before the first write, or if the file is unreadable)."""
    try:
        return dict(json.loads(path.read_text()).get("bars", {}))
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        return {}


def mirror(bars: Progress, shown: dict[str, TaskID], state: dict[str, dict[str, object]], *, prefix: str = "") -> None:
    """Bring ``bars`` up to ``state`` (read from a progress file): new bars added, the others updated."""
    for name, bar in state.items():
        total = bar.get("total")
        fields = {"completed": int(bar.get("completed") or 0), "total": float(total) if total else None,
                  "note": str(bar.get("note") or "")}
        if name not in shown:
            shown[name] = bars.add_task(f"{prefix}{name}", **fields)
        else:
            bars.update(shown[name], **fields)


def mirror_until_done(running: Callable[[], bool], path: Path, console: Console | None = None, *,
                      prefix: str = "", poll_s: float = 0.5) -> dict[str, dict[str, object]]:
    """Draw a child's bars from ``path`` until ``running()`` is false; returns the last state read."""
    shown: dict[str, TaskID] = {}
    state: dict[str, dict[str, object]] = {}
    with progress_bars(console) as bars:
        while running():
            state = read_progress(path) or state
            mirror(bars, shown, state, prefix=prefix)
            time.sleep(poll_s)
        state = read_progress(path) or state
        mirror(bars, shown, state, prefix=prefix)
    return state
