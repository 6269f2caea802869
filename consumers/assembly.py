"""Episode assembly and the columns computed when an episode closes — pure functions, no Kafka, no faust.

The processor keeps, per open episode, a small JSON-able *meta* dict (what started it, which steps
arrived, its end event, its takeovers) and the steps themselves; these functions update the meta for
each event and, at close, turn the steps into ``steps`` rows (RECAP reward, normalised Monte-Carlo
return, value, N-step advantage) and one ``episodes`` row.

Units: ``reward`` is raw (−1 per step, 0 on success's last step, −C_fail on a failure's); ``mc_return``
in the steps table is the *normalised* return-to-go in [−1, 0] (the value model's target, divided by
``max_episode_length + C_fail`` of the task); ``value`` and ``advantage`` share those normalised units.
In the episodes table ``mc_return`` is the raw episode return.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rewards import recap

OPEN, CLOSED = "open", "closed"

# A function V(task, step records) -> values in normalised units (the registered value model), or None.
ValueFn = Callable[[str, Sequence[dict]], np.ndarray]


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    max_episode_length: int = 150
    c_fail: float | None = None  # None: = max_episode_length (RECAP's "large" failure penalty)
    advantage_horizon: int = 50  # N of the N-step advantage
    timeout_is_failure: bool = True
    baseline_buckets: int = 16  # step-index buckets of the running per-task baseline

    def __post_init__(self) -> None:
        if self.max_episode_length < 1:
            raise ValueError(f"max_episode_length must be >= 1, got {self.max_episode_length}")
        if self.c_fail is not None and self.c_fail < 0:
            raise ValueError(f"c_fail must be >= 0, got {self.c_fail}")
        if self.advantage_horizon < 1:
            raise ValueError(f"advantage_horizon must be >= 1, got {self.advantage_horizon}")


# -- meta updates ----------------------------------------------------------------------------------

def new_meta(episode_id: str, partition: int, now_s: float) -> dict:
    """The persisted state of an open episode; written when the episode appears and when its end, a
    takeover or a new policy version arrives — not per step (the steps themselves live in the step store)."""
    return {"episode_id": episode_id, "partition": partition, "status": OPEN, "first_seen_s": now_s,
            "first_step_offset": None, "started": None, "ended": None, "interventions": [], "versions": [],
            "closed_at_s": None}


# -- step chunks: how an open episode's steps are kept in the changelog-backed step store -------------
# One store entry holds consecutive arrivals of one episode (key ``<episode>#c<n>``, n = 0, 1, …), so the
# changelog gets one message per chunk instead of one per step (and one tombstone per chunk at the end).
_CHUNK_ENTRY = struct.Struct(">iqI")  # step index, Kafka offset, length of the encoded step


def chunk_key(episode_id: str, n: int) -> bytes:
    return f"{episode_id}#c{n}".encode()


def pack_steps(entries: Iterable[tuple[int, int, bytes]]) -> bytes:
    """(step index, Kafka offset, encoded step) entries → one chunk value."""
    parts = []
    for index, offset, raw in entries:
        parts.append(_CHUNK_ENTRY.pack(index, offset, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def unpack_steps(blob: bytes) -> list[tuple[int, int, bytes]]:
    """The inverse of :func:`pack_steps`; a truncated chunk raises ``ValueError``."""
    out, pos, view = [], 0, memoryview(blob)
    while pos < len(blob):
        if pos + _CHUNK_ENTRY.size > len(blob):
            raise ValueError(f"truncated step chunk: header at byte {pos} of {len(blob)}")
        index, offset, size = _CHUNK_ENTRY.unpack_from(blob, pos)
        pos += _CHUNK_ENTRY.size
        if pos + size > len(blob):
            raise ValueError(f"truncated step chunk: step {index} needs {size} bytes at {pos} of {len(blob)}")
        out.append((index, offset, bytes(view[pos:pos + size])))
        pos += size
    return out


@dataclass
class Presence:
    """Which step indices of an open episode are stored, and when it was last heard of (memory only:
    rebuilt from the step store after a restart, so a crash cannot make the two disagree)."""

    indices: set[int] = field(default_factory=set)
    last_seen_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.indices)


def on_step(meta: dict, step: dict, *, offset: int) -> bool:
    """Account for a step in the persisted meta; returns whether the meta changed (and must be written)."""
    changed = False
    if meta["first_step_offset"] is None or offset < meta["first_step_offset"]:
        meta["first_step_offset"] = offset
        changed = True
    if step["policy_version"] not in meta["versions"]:
        meta["versions"].append(step["policy_version"])
        changed = True
    for key in ("task", "actor_id", "instruction"):
        if key not in meta:
            meta[key] = step[key]
            changed = True
    return changed


def on_episode_event(meta: dict, event: dict, *, topic: str, partition: int, offset: int) -> dict:
    for key in ("task", "actor_id", "instruction"):
        meta.setdefault(key, event[key])
    if event["kind"] == "STARTED":
        meta["started"] = {"policy_version": event["policy_version"], "event_time_us": event["event_time_us"],
                           "seed": event.get("seed")}
    elif meta["ended"] is None:  # the first end wins; a duplicate (replay, late robot) changes nothing
        meta["ended"] = {"outcome": event["outcome"], "num_steps": event["num_steps"],
                         "event_time_us": event["event_time_us"], "topic": topic, "partition": partition,
                         "offset": offset, "closed_by": "end_event", "seed": event.get("seed"),
                         "policy_version": event["policy_version"]}
    return meta


def on_intervention(meta: dict, event: dict) -> dict:
    for key in ("task", "actor_id"):
        meta.setdefault(key, event[key])
    entry = [event["kind"], event["step_index"]]
    if entry not in meta["interventions"]:
        meta["interventions"].append(entry)
    return meta


def abort(meta: dict, present: Presence, *, topic: str, partition: int, offset: int, now_us: int) -> dict:
    """Close an episode whose end never came (the robot died) as ABORTED, anchored on a control offset."""
    meta["ended"] = {"outcome": "ABORTED", "num_steps": present.count, "event_time_us": now_us, "topic": topic,
                     "partition": partition, "offset": offset, "closed_by": "timeout", "seed": None,
                     "policy_version": (meta["versions"] or ["unknown"])[-1]}
    return meta


def is_complete(meta: dict, present: Presence) -> bool:
    """The end arrived and every step it announced is here."""
    end = meta["ended"]
    return end is not None and present.count >= end["num_steps"]


def should_force_close(meta: dict, present: Presence, *, now_s: float, grace_s: float) -> bool:
    """The end arrived but steps are still missing after ``grace_s`` without news: close with what we have."""
    return meta["status"] == OPEN and meta["ended"] is not None and not is_complete(meta, present) and \
        now_s - present.last_seen_s >= grace_s


def should_abort(meta: dict, present: Presence, *, now_s: float, timeout_s: float) -> bool:
    return meta["status"] == OPEN and meta["ended"] is None and now_s - present.last_seen_s >= timeout_s


# -- close -----------------------------------------------------------------------------------------

@dataclass
class RunningBaseline:
    """Per-task running mean of the normalised return-to-go by step-index bucket (when no value model)."""

    buckets: int = 16
    max_episode_length: int = 150
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def _bucket(self, n: int) -> np.ndarray:
        idx = np.arange(n) * self.buckets // max(1, self.max_episode_length)
        return np.minimum(idx, self.buckets - 1)

    def values(self, task: str, n: int) -> np.ndarray:
        if task not in self.sums:
            return np.zeros(n)
        b = self._bucket(n)
        counts = self.counts[task][b]
        return np.where(counts > 0, self.sums[task][b] / np.maximum(counts, 1), 0.0)

    def update(self, task: str, normalised_returns: np.ndarray) -> None:
        s = self.sums.setdefault(task, np.zeros(self.buckets))
        c = self.counts.setdefault(task, np.zeros(self.buckets))
        b = self._bucket(len(normalised_returns))
        np.add.at(s, b, normalised_returns)
        np.add.at(c, b, 1)


@dataclass(frozen=True)
class ClosedEpisode:
    steps: list[dict]  # rows of the steps table
    episode: dict  # the row of the episodes table


CLOSED_BY = {"complete": "end_event", "forced": "forced", "aborted": "aborted"}


def close_episode(meta: dict, steps: Sequence[tuple[dict, str, int, int]], *, config: RewardConfig,
                  baseline: RunningBaseline, value_fn: ValueFn | None = None,
                  value_source: str | None = None, reason: str | None = None, late_steps: int = 0,
                  duplicate_steps: int = 0) -> ClosedEpisode:
    """Rows for a closed episode. ``steps``: (Step record, topic, partition, offset), any order, no duplicates.

    ``reason`` (complete / forced / aborted; default from the end's ``closed_by``) and the late and duplicate
    step counts become the episode row's data-quality columns, next to the announced and missing step counts.
    """
    end = meta["ended"]
    ordered = sorted(steps, key=lambda s: s[0]["step_index"])
    n = len(ordered)
    task = meta.get("task") or (ordered[0][0]["task"] if ordered else "unknown")
    outcome = end["outcome"]
    interventions = meta["interventions"]
    human = np.array([s[0]["controller"] == "HUMAN" for s in ordered], dtype=bool)
    ep_return = 0.0
    step_rows: list[dict] = []
    source = None
    if n:
        penalty = float(config.max_episode_length if config.c_fail is None else config.c_fail)
        records = [s[0] for s in ordered]
        values = value_fn(task, records) if value_fn is not None else None
        if values is not None:
            source = value_source or "value_model"
        else:
            values = baseline.values(task, n)
            source = "running_baseline"
        targets = recap.episode_targets(outcome, n, max_episode_length=config.max_episode_length, c_fail=penalty,
                                        n_step=config.advantage_horizon, values=np.asarray(values, np.float64),
                                        timeout_is_failure=config.timeout_is_failure)
        baseline.update(task, targets.normalised_returns)
        ep_return = float(targets.returns[0])
        for i, (rec, topic, partition, offset) in enumerate(ordered):
            row = {k: rec[k] for k in ("episode_id", "actor_id", "task", "instruction", "step_index",
                                       "event_time_us", "policy_version", "images", "proprio", "action",
                                       "policy_action", "controller", "env_reward", "success")}
            row.update(reward=float(targets.rewards[i]), mc_return=float(targets.normalised_returns[i]),
                       value=float(values[i]), advantage=float(targets.advantages[i]), advantage_source=source,
                       outcome=outcome, episode_length=n, kafka_topic=topic, kafka_partition=partition,
                       kafka_offset=offset)
            step_rows.append(row)
    started = meta["started"] or {}
    start_us = started.get("event_time_us") or (ordered[0][0]["event_time_us"] if ordered else end["event_time_us"])
    episode = {
        "episode_id": meta["episode_id"], "actor_id": meta.get("actor_id", "unknown"), "task": task,
        "instruction": meta.get("instruction", ""),
        "policy_version": started.get("policy_version") or end["policy_version"],
        "policy_versions": list(meta["versions"]) or [end["policy_version"]],
        "outcome": outcome, "num_steps": n,
        "num_interventions": sum(1 for kind, *_ in interventions if kind == "STARTED"),
        "human_steps": int(human.sum()), "mc_return": ep_return,
        "start_time": _ts(start_us), "end_time": _ts(end["event_time_us"]),
        "seed": started.get("seed", end.get("seed")), "advantage_source": source,
        "closed_by": CLOSED_BY[reason] if reason else ("aborted" if end["closed_by"] == "timeout" else end["closed_by"]),
        "announced_steps": None if end["closed_by"] == "timeout" else end["num_steps"],
        "missing_steps": 0 if end["closed_by"] == "timeout" else max(0, end["num_steps"] - n),
        "late_steps": late_steps, "duplicate_steps": duplicate_steps,
        "kafka_topic": end["topic"], "kafka_partition": end["partition"], "kafka_offset": end["offset"],
    }
    return ClosedEpisode(steps=step_rows, episode=episode)


def _ts(us: int):  # noqa: ANN202 - datetime
    from datetime import UTC, datetime

    return datetime.fromtimestamp(us / 1e6, tz=UTC)
