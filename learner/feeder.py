"""Delta -> sampler: the learner's view of the lakehouse.

``DeltaFeeder`` fills an ``AdaptiveSampler``'s per-task buffers from two Delta tables:

- ``demonstrations`` -> the *offline* buffers,
- ``steps`` -> the *online* buffers, whole closed episodes only (the stream processor writes an episode's
  steps when it closes, ``episode_length`` rows of it; fewer rows means the rest is still to come).

At start (``load_initial``) it reads, per table and task, only the newest episodes that fit the task's buffer:
first the light columns of a snapshot, then the full rows of the chosen episodes at that same version. Then
a background thread polls each table with ``lakehouse.IncrementalReader`` (the commits after the version read,
nothing else) and adds what is new. Rows keep their images as JPEG bytes; the sampler's batch builder decodes
them. ``versions()`` is the lineage: the Delta version of each table the buffers reflect.

With several learner processes (DDP) every rank feeds its own sampler; ``shard=(rank, world)`` keeps only the
episodes whose id hashes to the rank (lower memory, disjoint samples) at the price that a rank may hold no
online data of a task that has little of it yet.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lakehouse import (
    DEMONSTRATIONS,
    STEPS,
    IncrementalReader,
    Lakehouse,
    ReaderFellBehindError,
    snapshot,
    upgrade,
)
from lakehouse.reader import sql_predicate
from learner.batch import Source
from learner.config import ConfigError
from learner.sampler import AdaptiveSampler

log = logging.getLogger("sop.learner.feeder")

# What the learner keeps of a stored step (the Kafka origin, ingest times and partition columns stay on disk).
READ_COLUMNS: tuple[str, ...] = (
    "episode_id", "actor_id", "task", "instruction", "step_index", "policy_version", "images", "proprio",
    "action", "policy_action", "controller", "success", "reward", "mc_return", "value", "advantage",
    "advantage_source", "outcome", "episode_length", "event_time_us",
)
_LIGHT = ("task", "episode_id", "step_index", "event_time_us", "episode_length")
TABLE_SOURCES: Mapping[str, Source] = {DEMONSTRATIONS.name: "offline", STEPS.name: "online"}


@dataclass(frozen=True, kw_only=True)
class FeederConfig:
    """Which tables feed which buffers, and how often they are polled."""

    tables: tuple[str, ...] = (DEMONSTRATIONS.name, STEPS.name)
    tasks: tuple[str, ...] | None = None  # None = every task found
    poll_interval_s: float = 1.0
    max_versions_per_poll: int = 100  # bounds the rows one poll holds in memory
    # An episode whose rows are not all there yet is held back this many polls, then dropped.
    incomplete_patience_polls: int = 60
    shard: tuple[int, int] | None = None  # (rank, world): keep only this rank's share of the episodes

    def __post_init__(self) -> None:
        unknown = [t for t in self.tables if t not in TABLE_SOURCES]
        if unknown or not self.tables:
            raise ConfigError(f"FeederConfig.tables must name some of {sorted(TABLE_SOURCES)}; got {self.tables!r}")
        if self.tasks is not None and not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"FeederConfig.tasks must be task names or None (all); got {self.tasks!r}")
        if not self.poll_interval_s > 0:
            raise ConfigError(f"FeederConfig.poll_interval_s must be > 0; got {self.poll_interval_s}")
        if self.max_versions_per_poll < 1:
            raise ConfigError(f"FeederConfig.max_versions_per_poll must be >= 1; got {self.max_versions_per_poll}")
        if self.incomplete_patience_polls < 1:
            raise ConfigError("FeederConfig.incomplete_patience_polls must be >= 1; "
                              f"got {self.incomplete_patience_polls}")
        if self.shard is not None:
            rank, world = self.shard
            if not (world >= 1 and 0 <= rank < world):
                raise ConfigError(f"FeederConfig.shard must be (rank, world) with 0 <= rank < world; got {self.shard}")


@dataclass
class TableProgress:
    """What the feeder has read of one table."""

    version: int | None = None  # Delta version the buffers reflect
    rows_read: int = 0
    episodes_added: int = 0
    rows_added: int = 0  # rows kept by the sampler (the algorithm may refuse some)
    incomplete_dropped: int = 0
    polls: int = 0
    last_new_data: float | None = None  # time.time() of the last poll that brought rows


@dataclass
class FeederStats:
    tables: dict[str, TableProgress] = field(default_factory=dict)
    errors: int = 0
    last_error: str | None = None


def in_shard(episode_id: str, shard: tuple[int, int] | None) -> bool:
    if shard is None or shard[1] == 1:
        return True
    return zlib.crc32(episode_id.encode()) % shard[1] == shard[0]


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows as dicts the sampler takes (the normalised return under the name the batch builder reads)."""
    rows = table.to_pylist()
    for row in rows:
        row["normalised_return"] = row.get("mc_return")
    return rows


def group_episodes(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows by episode id, in the order episodes first appear."""
    episodes: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        episodes.setdefault(str(row["episode_id"]), []).append(row)
    return episodes


def is_whole(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Every step the episode announced (``episode_length``) is there, each step index once."""
    length = rows[0].get("episode_length")
    if length is None:
        return True
    return len({int(r["step_index"]) for r in rows}) >= int(length)


def _episode_summary(light: pa.Table) -> pa.Table:
    return light.group_by(["task", "episode_id"]).aggregate(
        [("step_index", "count_distinct"), ("event_time_us", "max"), ("episode_length", "max")])


def incomplete_episodes(light: pa.Table) -> dict[str, list[str]]:
    """Per task, the ids of episodes with fewer distinct steps than their ``episode_length`` says."""
    if light.num_rows == 0:
        return {}
    grouped = _episode_summary(light)
    lengths = pc.fill_null(grouped.column("episode_length_max"), 0)
    short = grouped.filter(pc.less(grouped.column("step_index_count_distinct"), lengths))
    out: dict[str, list[str]] = {}
    for task, episode_id in zip(short.column("task").to_pylist(), short.column("episode_id").to_pylist(), strict=True):
        out.setdefault(str(task), []).append(str(episode_id))
    return out


def newest_episodes(light: pa.Table, capacity: int, *, whole_only: bool) -> dict[str, list[str]]:
    """Per task, the ids of the newest episodes whose rows fit in ``capacity`` rows (at least one), newest first."""
    if light.num_rows == 0:
        return {}
    grouped = _episode_summary(light)
    chosen: dict[str, list[str]] = {}
    for task in pc.unique(grouped.column("task")).to_pylist():
        sub = grouped.filter(pc.equal(grouped.column("task"), task))
        if whole_only:
            lengths = pc.fill_null(sub.column("episode_length_max"), 0)
            sub = sub.filter(pc.greater_equal(sub.column("step_index_count_distinct"), lengths))
        sub = sub.sort_by([("event_time_us_max", "descending")])
        total, ids = 0, []
        for episode_id, count in zip(sub.column("episode_id").to_pylist(),
                                     sub.column("step_index_count_distinct").to_pylist(), strict=True):
            if ids and total + count > capacity:
                break
            ids.append(episode_id)
            total += count
        if ids:
            chosen[str(task)] = ids
    return chosen


class DeltaFeeder:
    """Keeps a sampler's buffers fed from Delta, incrementally, on a background thread (see the module doc)."""

    def __init__(self, lake: Lakehouse, sampler: AdaptiveSampler, config: FeederConfig | None = None) -> None:
        self.lake = lake
        self.sampler = sampler
        self.config = config or FeederConfig()
        self._readers: dict[str, IncrementalReader] = {}
        self._pending: dict[str, dict[str, tuple[int, list[Mapping[str, Any]]]]] = {t: {} for t in self.config.tables}
        self._lock = threading.Lock()  # one poll at a time (the thread, or a caller of poll_once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = FeederStats(tables={t: TableProgress() for t in self.config.tables})

    # ---- lineage and stats ----------------------------------------------------------------------------
    # Read without the poll lock: the trainer's status updates must not wait for a poll in progress.
    def versions(self) -> dict[str, int | None]:
        """The Delta version of each table that the buffers reflect (None: table not read yet)."""
        return {t: p.version for t, p in self._stats.tables.items()}

    def stats(self) -> FeederStats:
        return FeederStats(tables={t: TableProgress(**vars(p)) for t, p in self._stats.tables.items()},
                           errors=self._stats.errors, last_error=self._stats.last_error)

    # ---- reading ----------------------------------------------------------------------------------------
    def load_initial(self) -> dict[str, int | None]:
        """Fill the buffers with the newest episodes of each existing table that fit them; returns versions."""
        with self._lock:
            for name in self.config.tables:
                if name not in self._readers and self.lake.exists(name):
                    self._load_table(name)
        return self.versions()

    def poll_once(self) -> int:
        """Read what each table committed since the last read; returns the episodes added."""
        added = 0
        with self._lock:
            for name in self.config.tables:
                if name not in self._readers:
                    if self.lake.exists(name):
                        added += self._load_table(name)
                    continue
                added += self._poll_table(name)
        return added

    def _capacity(self, source: Source) -> int:
        c = self.sampler.config
        return c.online_capacity if source == "online" else c.offline_capacity

    def _load_table(self, name: str) -> int:
        source = TABLE_SOURCES[name]
        table = self.lake.table(name, create=False)
        tasks = list(self.config.tasks) if self.config.tasks is not None else None
        light, version = snapshot(table, columns=list(_LIGHT), tasks=tasks)
        if self.config.shard is not None:
            keep = [in_shard(e, self.config.shard) for e in light.column("episode_id").to_pylist()]
            light = light.filter(pa.array(keep, pa.bool_()))
        chosen = newest_episodes(light, self._capacity(source), whole_only=source == "online")
        # Episodes whose last rows are still to come wait for them like those seen in later polls.
        partial = incomplete_episodes(light) if source == "online" else {}
        at_version = self.lake.table(name, as_of=version) if chosen or partial else table
        added = 0
        progress = self._stats.tables[name]
        for task in sorted(set(chosen) | set(partial)):
            ids = chosen.get(task, [])
            dataset = at_version.to_pyarrow_dataset(file_pruning_predicate=sql_predicate(tasks=[task]))
            rows = upgrade(dataset.to_table(columns=list(READ_COLUMNS), filter=(pc.field("task") == task)
                                            & pc.field("episode_id").isin(ids + partial.get(task, []))))
            progress.rows_read += rows.num_rows
            episodes = group_episodes(rows_of(rows))
            # Oldest first, so the ring buffers end with the newest episodes.
            for episode_id in reversed(ids):
                if episode_id in episodes:
                    added += self._add(name, source, episodes[episode_id])
            for episode_id in partial.get(task, []):
                if episode_id in episodes:
                    self._pending[name][episode_id] = (0, episodes[episode_id])
        self._readers[name] = IncrementalReader(table, start=version, columns=list(READ_COLUMNS), tasks=tasks,
                                                max_versions=self.config.max_versions_per_poll)
        progress.version = version
        if added:
            progress.last_new_data = time.time()
        log.info("%s: loaded %d episodes at version %d", name, added, version)
        return added

    def _poll_table(self, name: str) -> int:
        source = TABLE_SOURCES[name]
        reader = self._readers[name]
        progress = self._stats.tables[name]
        try:
            new = reader.poll()
        except ReaderFellBehindError as exc:
            # The files of versions not read yet were compacted and vacuumed away; continue from now on.
            log.warning("%s: %s; continuing from the latest version", name, exc)
            reader.table.update_incremental()
            reader.version = reader.table.version()
            progress.version = reader.version
            return 0
        progress.polls += 1
        if new.num_rows == 0:
            progress.version = reader.version
            return self._age_pending(name)
        progress.rows_read += new.num_rows
        progress.last_new_data = time.time()
        added = 0
        pending = self._pending[name]
        for episode_id, rows in group_episodes(rows_of(new)).items():
            if not in_shard(episode_id, self.config.shard):
                continue
            if source == "online":
                held = pending.pop(episode_id, (0, []))[1]
                rows = held + list(rows)
                if not is_whole(rows):
                    pending[episode_id] = (0, rows)
                    continue
            added += self._add(name, source, rows)
        progress.version = reader.version  # only once its rows are in the buffers (lineage)
        return added + self._age_pending(name)

    def _age_pending(self, name: str) -> int:
        pending = self._pending[name]
        for episode_id, (age, rows) in list(pending.items()):
            if age + 1 >= self.config.incomplete_patience_polls:
                del pending[episode_id]
                self._stats.tables[name].incomplete_dropped += 1
                log.warning("%s: episode %s still has %d of %s rows; dropped", name, episode_id, len(rows),
                            rows[0].get("episode_length"))
            else:
                pending[episode_id] = (age + 1, rows)
        return 0

    def _add(self, name: str, source: Source, rows: Sequence[Mapping[str, Any]]) -> int:
        kept = self.sampler.add_episode(rows, source=source)
        progress = self._stats.tables[name]
        progress.episodes_added += 1
        progress.rows_added += kept
        return 1

    # ---- the background thread --------------------------------------------------------------------------
    def start(self) -> DeltaFeeder:
        if self._thread is not None:
            raise RuntimeError("the feeder is already running")
        self._thread = threading.Thread(target=self._run, name="sop-delta-feeder", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = self.config.poll_interval_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
                backoff = self.config.poll_interval_s
            except Exception as exc:  # a storage hiccup must not stop the learner; it is counted and retried
                self._stats.errors += 1
                self._stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("polling Delta failed (%s); retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._stop.wait(max(0.0, self.config.poll_interval_s - (time.monotonic() - started)))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            self._thread = None

    def __enter__(self) -> DeltaFeeder:
        self.load_initial()
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_rows(sampler: AdaptiveSampler, *, min_rows: int = 1, timeout_s: float = 60.0,
                  stop: threading.Event | None = None) -> bool:
    """Block until the sampler holds ``min_rows`` rows in all (True), or until the timeout / stop (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = sum(n for sizes in sampler.sizes().values() for n in sizes.values())
        if total >= min_rows:
            return True
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            return False
        time.sleep(0.05)
