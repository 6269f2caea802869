"""Stored episodes, read back from the lakehouse as one object each: its steps in order, its row of the
``episodes`` table and its takeovers (the ``interventions`` rows paired STARTED → ENDED).

    episodes = load_episodes(lake, ["actor-01-3f2a1b9c-000004"])
    episodes = load_episodes(lake, where="task = 'drawer-open-v3' AND outcome = 'SUCCESS'", limit=5)

Episode ids are looked up in ``steps`` first, then in ``demonstrations`` (offline episodes have no
``episodes`` or ``interventions`` rows; their controller column still says who drove).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lakehouse import Lakehouse, query

STEP_TABLES = ("steps", "demonstrations")
STEP_COLUMNS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
                "policy_version_text", "images", "proprio", "action", "policy_action", "controller", "env_reward", "success", "reward",
                "mc_return", "value", "advantage", "advantage_source", "outcome", "episode_length")
INTERVENTION_COLUMNS = ("episode_id", "kind", "step_index", "event_time_us", "operator_id", "reason")


class EpisodeNotFoundError(LookupError):
    """No stored steps for the episode ids (or the condition) asked for."""


@dataclass(frozen=True)
class Takeover:
    """One human takeover: the operator drove steps ``start_step`` … ``end_step - 1``."""

    start_step: int
    end_step: int  # the step at which the policy drove again (the episode's length when it ended first)
    operator_id: str
    reason: str  # why the human took over
    end_reason: str | None  # why control was handed back; None when no ENDED event was stored
    start_time_us: int
    end_time_us: int | None


@dataclass(frozen=True)
class Episode:
    episode_id: str
    table: str  # the table the steps came from: steps | demonstrations
    steps: list[dict[str, Any]]  # ordered by step_index
    summary: dict[str, Any] | None = None  # the `episodes` row (None for demonstrations)
    interventions: list[dict[str, Any]] = field(default_factory=list)  # STARTED / ENDED rows, in step order

    @property
    def first(self) -> dict[str, Any]:
        return self.steps[0]

    @property
    def task(self) -> str:
        return str(self.first["task"])

    @property
    def instruction(self) -> str:
        return str(self.first["instruction"])

    @property
    def actor_id(self) -> str:
        return str(self.first["actor_id"])

    @property
    def outcome(self) -> str:
        return str(self.summary["outcome"] if self.summary else self.first["outcome"])

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def step_index(self) -> np.ndarray:
        return np.array([s["step_index"] for s in self.steps], dtype=np.int64)

    @property
    def time_us(self) -> np.ndarray:
        return np.array([s["event_time_us"] for s in self.steps], dtype=np.int64)

    @property
    def human(self) -> np.ndarray:
        """Who drove each step: True where the controller was HUMAN."""
        return np.array([s["controller"] == "HUMAN" for s in self.steps], dtype=bool)

    @property
    def cameras(self) -> list[str]:
        """Camera names in the order the steps carry them."""
        names: dict[str, None] = {}
        for s in self.steps:
            for image in s["images"] or ():
                names.setdefault(image["camera"], None)
        return list(names)

    def vectors(self, column: str) -> np.ndarray:
        """``proprio`` / ``action`` / ``policy_action`` as an (n, d) float array (NaN rows where a step has none)."""
        dims = max((len(s[column]) for s in self.steps if s[column] is not None), default=0)
        out = np.full((self.num_steps, dims), np.nan, dtype=np.float64)
        for i, s in enumerate(self.steps):
            if s[column] is not None:
                out[i, : len(s[column])] = s[column]
        return out

    def scalars(self, column: str) -> np.ndarray:
        """A per-step number column (``reward``, ``mc_return``, ``value``, ``advantage``) with NaN for nulls."""
        return np.array([np.nan if s[column] is None else s[column] for s in self.steps], dtype=np.float64)

    def policy_versions(self) -> list[tuple[int, str]]:
        """(step index, version) where the version the steps were produced by changes (the first step included);
        the version as the event carried it ("12", or "expert" for a scripted demonstration)."""
        out: list[tuple[int, str]] = []
        for s in self.steps:
            if not out or out[-1][1] != s["policy_version_text"]:
                out.append((int(s["step_index"]), str(s["policy_version_text"])))
        return out

    def takeovers(self) -> list[Takeover]:
        """The ``interventions`` rows paired into takeovers (a STARTED without ENDED lasts to the end)."""
        spans: list[Takeover] = []
        open_: dict[str, Any] | None = None
        for row in self.interventions:
            if row["kind"] == "STARTED":
                if open_ is not None:  # two STARTED in a row: the first lasted until the second
                    spans.append(_span(open_, row["step_index"], None, None))
                open_ = row
            elif row["kind"] == "ENDED" and open_ is not None:
                spans.append(_span(open_, row["step_index"], row["reason"], row["event_time_us"]))
                open_ = None
        if open_ is not None:
            spans.append(_span(open_, self.num_steps, None, None))
        return spans


def _span(started: dict[str, Any], end_step: int, end_reason: str | None, end_time_us: int | None) -> Takeover:
    return Takeover(start_step=int(started["step_index"]), end_step=int(end_step), operator_id=str(started["operator_id"]),
                    reason=str(started["reason"]), end_reason=end_reason, start_time_us=int(started["event_time_us"]),
                    end_time_us=end_time_us)


def _quoted(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def load_episodes(lake: Lakehouse, episode_ids: Sequence[str] = (), *, where: str | None = None,
                  table: str | None = None, limit: int | None = None) -> list[Episode]:
    """The episodes named by ``episode_ids`` and/or matching ``where`` (an SQL condition on the step table's
    columns), in the order asked for (``where`` matches by first event time). ``table`` fixes the step table
    (``steps`` or ``demonstrations``); by default both are searched. Raises :class:`EpisodeNotFoundError` naming
    what is missing."""
    if table is not None and table not in STEP_TABLES:
        raise ValueError(f"table must be one of {STEP_TABLES}, got {table!r}")
    existing = set(lake.existing())
    tables = [t for t in ([table] if table else STEP_TABLES) if t in existing]
    if not tables:
        raise EpisodeNotFoundError(f"no {' or '.join([table] if table else STEP_TABLES)} table under {lake.root}")
    wanted: list[tuple[str, str]] = []  # (episode id, table)
    if episode_ids:
        left = list(dict.fromkeys(episode_ids))
        for name in tables:
            if not left:
                break
            found = {r["episode_id"] for r in query(
                lake, f"SELECT DISTINCT episode_id FROM {name} WHERE episode_id IN ({_quoted(left)})").to_pylist()}
            wanted += [(e, name) for e in left if e in found]
            left = [e for e in left if e not in found]
        if left:
            raise EpisodeNotFoundError(f"no stored steps for episode(s) {left} in {', '.join(tables)}")
        order = {e: i for i, e in enumerate(dict.fromkeys(episode_ids))}
        wanted.sort(key=lambda w: order[w[0]])
    if where:
        matched: list[tuple[int, str, str]] = []  # (first event time, episode id, table)
        for name in tables:
            rows = query(lake, f"SELECT episode_id, min(event_time_us) AS t FROM {name} WHERE ({where}) "
                               "GROUP BY episode_id").to_pylist()
            matched += [(r["t"], r["episode_id"], name) for r in rows]
        wanted += [(e, name) for _, e, name in sorted(matched) if (e, name) not in wanted]
        if not wanted:
            raise EpisodeNotFoundError(f"no episode in {', '.join(tables)} matches {where!r}")
    if limit is not None:
        wanted = wanted[:limit]
    episodes = []
    for name in dict.fromkeys(t for _, t in wanted):
        ids = [e for e, t in wanted if t == name]
        episodes += _read(lake, name, ids, existing)
    position = {w: i for i, w in enumerate(wanted)}
    return sorted(episodes, key=lambda ep: position[(ep.episode_id, ep.table)])


def _read(lake: Lakehouse, table: str, ids: list[str], existing: set[str]) -> list[Episode]:
    cond = f"episode_id IN ({_quoted(ids)})"
    steps: dict[str, list[dict[str, Any]]] = {e: [] for e in ids}
    for row in query(lake, f"SELECT {', '.join(STEP_COLUMNS)} FROM {table} WHERE {cond} "
                           "ORDER BY episode_id, step_index").to_pylist():
        steps[row["episode_id"]].append(row)
    summaries: dict[str, dict[str, Any]] = {}
    takeovers: dict[str, list[dict[str, Any]]] = {e: [] for e in ids}
    if table == "steps" and "episodes" in existing:
        for row in query(lake, f"SELECT * EXCLUDE (kafka_topic, kafka_partition, kafka_offset) FROM episodes "
                               f"WHERE {cond}").to_pylist():
            summaries[row["episode_id"]] = row
    if table == "steps" and "interventions" in existing:
        for row in query(lake, f"SELECT {', '.join(INTERVENTION_COLUMNS)} FROM interventions WHERE {cond} "
                               "ORDER BY episode_id, step_index, event_time_us").to_pylist():
            takeovers[row["episode_id"]].append(row)
    return [Episode(e, table, steps[e], summaries.get(e), takeovers[e]) for e in ids if steps[e]]
