"""Progress across processes: a child's bars, written to a file, drawn by the parent (``sop run``)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from rich.console import Console

from sop.progress import PerKeyBars, ProgressFile, mirror_until_done, progress_bars, read_progress


def test_a_childs_bars_are_drawn_by_the_parent_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "progress" / "pretrain.json"
    finished = threading.Event()

    def child() -> None:
        out = ProgressFile(path)
        for step in range(0, 101, 25):
            out.update("behaviour cloning", completed=step, total=100, note=f"loss {1 / (step + 1):.4f}")
            time.sleep(0.05)
        finished.set()

    threading.Thread(target=child).start()
    screen = io.StringIO()
    state = mirror_until_done(lambda: not finished.is_set(), path, Console(file=screen, width=120), poll_s=0.01)
    assert state == {"behaviour cloning": {"completed": 100, "total": 100, "note": "loss 0.0099"}}
    assert "behaviour cloning" in screen.getvalue() and "100/100 loss 0.0099" in screen.getvalue()


def test_progress_file_is_whole_or_absent(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    assert read_progress(path) == {}
    path.write_text('{"bars": {"a": ')  # a torn write is read as nothing, never half a bar
    assert read_progress(path) == {}
    ProgressFile(path).update("a", completed=1, total=2)
    assert json.loads(path.read_text()) == {"bars": {"a": {"completed": 1, "total": 2, "note": ""}}}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def test_one_bar_per_task(tmp_path: Path) -> None:
    path = tmp_path / "demos.json"
    screen = io.StringIO()
    with progress_bars(Console(file=screen, width=120)) as bars:
        per_task = PerKeyBars({"reach-v3": 2, "drawer-open-v3": 3}, bars=bars, out=ProgressFile(path), label="demos ")
        per_task.advance("reach-v3")
        per_task.advance("drawer-open-v3", written=False)
        assert read_progress(path)["demos drawer-open-v3"] == {"completed": 1, "total": 3,
                                                               "note": "0 written · 1 skipped"}
        per_task.finish()
    assert read_progress(path)["demos reach-v3"]["completed"] == 2
    assert "demos drawer-open-v3" in screen.getvalue() and "3/3" in screen.getvalue()
