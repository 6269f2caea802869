"""The adaptive online/offline sampler of the SOP paper, its bounded buffers, and a prefetch thread.

Every batch gives each task the same number of samples (1/M each). Inside task m a share
``omega_on`` of its samples comes from the online buffer (robot rollouts and human takeovers) and the rest
from its offline demonstrations, with

    omega_on = exp(alpha * l_on) / (exp(alpha * l_on) + exp(l_off)),   clipped to [0.2, 0.8],

``l_on`` / ``l_off`` the mean per-sample training losses on the task's online / offline samples over the
last ~200 learner steps (fed back through ``record_losses``). A task with no online data yet is sampled
offline only. ``mode="fixed"`` uses a constant share instead (the ablation).

``mode="paper"`` applies the formula to the losses as they are. Its exponent ``alpha*l_on - l_off`` is of the
order of the losses, so with action-MSE losses of 0.003-0.06 it stays near 0 and omega_on near 0.5 whatever the
two losses do. ``mode="normalised"`` measures both losses in units of the task's offline loss (the running scale
the window already keeps), ``z = alpha * l_on / l_off - 1``: equal losses give the paper's share at losses of 1,
and an online loss twice the offline one tilts the mix as a difference of one unit of loss would.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from learner.batch import HUMAN, SOURCES, Batch, BatchSource, Row, Source, prepare_episode
from learner.config import SamplerConfig
from learner.quarantine import Quarantine, RejectedRows, RowSpec, row_problem

T = TypeVar("T")
BuildBatch = Callable[[Sequence[Row], Sequence[bool]], Batch]
Accept = Callable[[Mapping[str, Any], Source], bool]


class NoData(RuntimeError):
    """No task has any row yet; the trainer has nothing to learn from."""


def online_share(l_on: float, l_off: float, alpha: float, clip: tuple[float, float] = (0.2, 0.8), *,
                 scale: float = 1.0) -> float:
    """``exp(a*l_on/s) / (exp(a*l_on/s) + exp(l_off/s))`` clipped to ``clip`` (a stable sigmoid); ``s = scale``
    is 1 for the paper's formula, the offline loss for the normalised mix."""
    if not scale > 0 or not math.isfinite(scale):
        scale = 1.0  # an offline loss of 0 (a memorised task): no scale to measure in, use the paper's
    z = (alpha * l_on - l_off) / scale
    share = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return min(max(share, clip[0]), clip[1])


class RingBuffer(Generic[T]):
    """A bounded FIFO of items with uniform random sampling; the oldest items fall out first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = capacity
        self._items: list[T] = []
        self._next = 0
        self.total_added = 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, item: T) -> None:
        if len(self._items) < self.capacity:
            self._items.append(item)
        else:
            self._items[self._next] = item
        self._next = (self._next + 1) % self.capacity
        self.total_added += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def remove(self, doomed: Iterable[T]) -> int:
        """Drop these very items (by identity); the others keep their order, the oldest still fall out first."""
        ids = {id(item) for item in doomed}
        if self._next and len(self._items) == self.capacity:  # full: rotate so the oldest comes first
            self._items = self._items[self._next:] + self._items[:self._next]
        before = len(self._items)
        self._items = [item for item in self._items if id(item) not in ids]
        self._next = len(self._items) % self.capacity
        return before - len(self._items)

    def sample(self, rng: np.random.Generator, n: int) -> list[T]:
        if not self._items:
            raise IndexError("cannot sample from an empty buffer")
        return [self._items[i] for i in rng.integers(0, len(self._items), size=n)]

    def items(self) -> list[T]:
        return list(self._items)


class LossWindow:
    """Mean of the per-sample losses recorded over the last ``steps`` learner steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._entries: deque[tuple[int, float, int]] = deque()  # (learner step, sum, count)

    def add(self, step: int, losses: np.ndarray) -> None:
        finite = losses[np.isfinite(losses)]
        if finite.size:
            self._entries.append((step, float(finite.sum()), int(finite.size)))

    def entries(self) -> list[tuple[int, float, int]]:
        return list(self._entries)

    def restore(self, entries: Iterable[tuple[int, float, int]]) -> None:
        self._entries = deque(entries)

    def mean(self, now: int) -> float | None:
        while self._entries and self._entries[0][0] <= now - self.steps:
            self._entries.popleft()
        count = sum(c for _, _, c in self._entries)
        return sum(s for _, s, _ in self._entries) / count if count else None


class AdaptiveSampler:
    """Per-task online and offline ring buffers of still-compressed rows, sampled as the paper describes.

    With a ``spec`` (``RowSpec.for_policy(model_config)``) every row is checked as it arrives
    (``quarantine.row_problem``) and a row that fails never enters a buffer; a row whose images fail to
    decode when a batch is built is taken out of its buffer and the batch sampled again. Both are counted
    by reason in ``quarantine`` (``Quarantine.counts()``).

    Thread-safe: rows may be added from an ingest thread while a prefetch thread builds batches.
    """

    def __init__(self, config: SamplerConfig, build: BuildBatch, *, chunk: int = 1,
                 accept: Accept | None = None, spec: RowSpec | None = None,
                 quarantine: Quarantine | None = None) -> None:
        self.config = config
        self._build = build
        self._chunk = chunk
        self._accept = accept
        self.spec = spec
        self.quarantine = quarantine or Quarantine()
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.Lock()
        self._buffers: dict[str, dict[Source, RingBuffer[Row]]] = {}
        self._windows: dict[tuple[str, Source], LossWindow] = {}
        self.step = 0  # learner steps seen through record_batch

    # ---- filling -------------------------------------------------------------------------------------
    def add_episode(self, rows: Sequence[Mapping[str, Any]], *, source: Source) -> int:
        """Label one episode's rows (``prepare_episode``) and keep those the algorithm accepts."""
        _check_source(source)
        if self.spec is not None:
            rows = self.admit(rows, source=source)
        if not rows:
            return 0
        kept = [r for r in prepare_episode(rows, source=source, chunk=self._chunk)
                if self._accept is None or self._accept(r, source)]
        by_task: dict[str, list[Row]] = {}
        for r in kept:
            by_task.setdefault(str(r["task"]), []).append(r)
        for task, task_rows in by_task.items():
            self.add_rows(task, source, task_rows)
        return len(kept)

    def admit(self, rows: Sequence[Mapping[str, Any]], *, source: Source) -> list[Mapping[str, Any]]:
        """The rows that pass ``row_problem``; the others are quarantined (counted and logged)."""
        if self.spec is None:
            return list(rows)
        admitted = []
        for row in rows:
            problem = row_problem(row, self.spec)
            if problem is None:
                admitted.append(row)
            else:
                self.quarantine.record(row, *problem, source=source)
        return admitted

    def add_rows(self, task: str, source: Source, rows: Iterable[Row]) -> None:
        """Add rows already prepared by ``prepare_episode``."""
        _check_source(source)
        with self._lock:
            self._task_buffers(task)[source].extend(rows)

    def _task_buffers(self, task: str) -> dict[Source, RingBuffer[Row]]:
        if task not in self._buffers:
            self._buffers[task] = {"online": RingBuffer(self.config.online_capacity),
                                   "offline": RingBuffer(self.config.offline_capacity)}
        return self._buffers[task]

    # ---- feedback ------------------------------------------------------------------------------------
    def record_losses(self, task: str, source: Source, losses: np.ndarray | Sequence[float], *,
                      step: int | None = None) -> None:
        """Feed back per-sample training losses of ``task``'s ``source`` samples (NaN entries are ignored)."""
        _check_source(source)
        arr = np.asarray(losses, dtype=np.float64).reshape(-1)
        with self._lock:
            window = self._windows.setdefault((task, source), LossWindow(self.config.window_steps))
            window.add(self.step if step is None else step, arr)

    def record_batch(self, batch: Batch, per_sample: torch.Tensor | np.ndarray) -> None:
        """Feed back one learner step's per-sample losses, grouped by task and source; counts the step."""
        losses = per_sample.detach().cpu().numpy() if isinstance(per_sample, torch.Tensor) else np.asarray(per_sample)
        online = batch.online.cpu().numpy()
        tasks = np.asarray(batch.tasks)
        for task in np.unique(tasks):
            for source, is_online in (("online", True), ("offline", False)):
                sel = (tasks == task) & (online == is_online)
                if sel.any():
                    self.record_losses(str(task), source, losses[sel])
        with self._lock:
            self.step += 1

    def window_state(self) -> dict[str, Any]:
        """The loss windows and the step counter, JSON-ready (what a resumed learner restores)."""
        with self._lock:
            return {"step": self.step, "windows": [[task, source, window.steps, list(map(list, window.entries()))]
                                                   for (task, source), window in self._windows.items()]}

    def restore_windows(self, state: Mapping[str, Any]) -> None:
        """Put back what ``window_state`` returned (replacing the current windows)."""
        with self._lock:
            self.step = int(state.get("step", 0))
            self._windows = {}
            for task, source, steps, entries in state.get("windows", []):
                window = LossWindow(int(steps))
                window.restore([(int(s), float(total), int(n)) for s, total, n in entries])
                self._windows[(str(task), _checked_source(source))] = window

    # ---- sampling ------------------------------------------------------------------------------------
    def losses(self) -> dict[str, tuple[float | None, float | None]]:
        """``(l_on, l_off)`` per task over the current window."""
        with self._lock:
            return {task: self._window_means(task) for task in self._buffers}

    def _window_means(self, task: str) -> tuple[float | None, float | None]:
        def mean(source: Source) -> float | None:
            window = self._windows.get((task, source))
            return None if window is None else window.mean(self.step)

        return mean("online"), mean("offline")

    def omega(self) -> dict[str, float]:
        """The online share each task is sampled with now (what the learner logs as omega_on)."""
        with self._lock:
            return {task: self._omega(task) for task in self._buffers}

    def _omega(self, task: str) -> float:
        n_on = len(self._buffers[task]["online"])
        n_off = len(self._buffers[task]["offline"])
        if n_on == 0:
            return 0.0
        if n_off == 0:
            return 1.0
        if self.config.mode == "fixed":
            return self.config.fixed_online_share
        l_on, l_off = self._window_means(task)
        if l_on is None or l_off is None:
            # No feedback yet for one side: start in the middle until both losses are measured.
            return online_share(0.0, 0.0, self.config.alpha, self.config.share_clip)
        return online_share(l_on, l_off, self.config.alpha, self.config.share_clip,
                            scale=l_off if self.config.mode == "normalised" else 1.0)

    def sizes(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {task: {s: len(b) for s, b in bufs.items()} for task, bufs in self._buffers.items()}

    def advantages(self, source: Source = "online") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per task, the stored advantages (NaN where missing) and human flags of ``source`` rows: what
        ``Recap.refresh_epsilons`` needs to keep each task's positive share on target."""
        _check_source(source)
        with self._lock:
            rows = {task: bufs[source].items() for task, bufs in self._buffers.items()}
        return {task: (np.array([np.nan if r.get("advantage") is None else float(r["advantage"]) for r in items]),
                       np.array([bool(r[HUMAN]) for r in items], dtype=bool))
                for task, items in rows.items()}

    def sample_rows(self, batch_size: int | None = None) -> tuple[list[Row], list[bool]]:
        """Rows for one batch and whether each came from the online buffer."""
        n = batch_size or self.config.batch_size
        with self._lock:
            tasks = sorted(t for t, b in self._buffers.items() if len(b["online"]) + len(b["offline"]) > 0)
            if not tasks:
                raise NoData("the sampler holds no rows yet; add demonstrations or online episodes first")
            rows: list[Row] = []
            online: list[bool] = []
            for task, count in zip(tasks, _equal_counts(n, len(tasks), self._rng), strict=True):
                n_on = int(self._rng.binomial(count, self._omega(task)))
                buffers = self._buffers[task]
                if n_on:
                    rows += buffers["online"].sample(self._rng, n_on)
                    online += [True] * n_on
                if count - n_on:
                    rows += buffers["offline"].sample(self._rng, count - n_on)
                    online += [False] * (count - n_on)
        return rows, online

    def next_batch(self) -> Batch:
        while True:
            rows, online = self.sample_rows()
            try:
                return self._build(rows, online)  # decoding happens here, outside the lock
            except RejectedRows as exc:
                # Each retry removes at least one row, so this ends (in NoData once nothing is left).
                self._remove_rejected(rows, online, exc)

    def _remove_rejected(self, rows: Sequence[Row], online: Sequence[bool], exc: RejectedRows) -> None:
        doomed: dict[int, tuple[Row, Source, str, str]] = {}
        for i, reason, detail in exc.rejected:
            doomed.setdefault(id(rows[i]), (rows[i], "online" if online[i] else "offline", reason, detail))
        with self._lock:
            for row, source, _, _ in doomed.values():
                buffers = self._buffers.get(str(row["task"]))
                if buffers is not None:
                    buffers[source].remove([row])
        for row, source, reason, detail in doomed.values():
            self.quarantine.record(row, reason, detail, source=source)


def _equal_counts(n: int, tasks: int, rng: np.random.Generator) -> list[int]:
    """``n`` samples over ``tasks`` tasks as evenly as possible; the remainder goes to random tasks."""
    counts = [n // tasks] * tasks
    for i in rng.choice(tasks, size=n % tasks, replace=False):
        counts[int(i)] += 1
    return counts


def _checked_source(source: str) -> Source:
    _check_source(source)
    return "online" if source == "online" else "offline"


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")


class Prefetcher:
    """Builds batches on a background thread so the trainer only takes them off a queue.

    A ``BatchSource`` itself. ``waits`` counts the batches the trainer had to wait for (it should stay
    near zero; when it grows, batch building is the bottleneck).
    """

    def __init__(self, source: BatchSource, *, depth: int = 4, idle_sleep_s: float = 0.05) -> None:
        self._source = source
        self._queue: queue.Queue[Batch] = queue.Queue(maxsize=depth)
        self._idle_sleep_s = idle_sleep_s
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sop-prefetch", daemon=True)
        self.batches_built = 0
        self.waits = 0
        self.wait_s = 0.0

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._source.next_batch()
            except NoData:
                self._stop.wait(self._idle_sleep_s)
                continue
            except BaseException as e:  # handed to the trainer, which re-raises it
                self._error = e
                return
            self.batches_built += 1
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next_batch(self, timeout_s: float | None = None) -> Batch:
        if not self._thread.is_alive() and self._queue.empty():
            if self._error is not None:
                raise RuntimeError("the prefetch thread failed") from self._error
            raise RuntimeError("the prefetcher is not running; call start() first")
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        self.waits += 1
        start = time.perf_counter()
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            try:
                batch = self._queue.get(timeout=0.1)
                self.wait_s += time.perf_counter() - start
                return batch
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError("the prefetch thread failed") from self._error
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError(f"no batch within {timeout_s} s") from None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> Prefetcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
