"""The live view of a running loop: what a fleet operator watches during ``sop run``.

``gather`` reads the same sources anyone could query — the Delta ``episodes`` table, the processor's
and learner's status files, the consumer group's committed offsets — so the view never depends on
being the process that started things.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, TopicPartition
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from lakehouse import Lakehouse, source_columns, upgrade
from sop.settings import Settings


@dataclass
class LiveState:
    elapsed_s: float = 0.0
    per_task: list[dict] = field(default_factory=list)
    per_version: list[dict] = field(default_factory=list)
    actors: list[dict] = field(default_factory=list)
    episodes: int = 0
    episodes_per_hour: float | None = None
    intervention_rate: float | None = None
    steps_rows: int = 0
    lag: int | None = None
    processor: dict = field(default_factory=dict)
    learner: dict = field(default_factory=dict)
    autonomous_rate: float | None = None
    held_out: dict | None = None  # the latest held-out checkpoint (operator off), when the run measures them
    notes: list[str] = field(default_factory=list)


def partition_lag(bootstrap: str, group: str, settings: Settings) -> dict[str, dict[int, int]]:
    """topic -> partition -> messages of the source topics not yet committed by ``group``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         **settings.kafka_client_config})
    try:
        out: dict[str, dict[int, int]] = {}
        for name in ("Step", "EpisodeEvent", "InterventionEvent"):
            topic = settings.topics[name]
            md = consumer.list_topics(topic, timeout=5).topics[topic]
            tps = [TopicPartition(topic, p) for p in md.partitions]
            for tp in consumer.committed(tps, timeout=5):
                lo, hi = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                out.setdefault(topic, {})[tp.partition] = hi - (tp.offset if tp.offset >= 0 else lo)
        return out
    finally:
        consumer.close()


def kafka_lag(settings: Settings, group: str) -> int | None:
    """Messages of the source topics not yet committed by the processor's consumer group (None: no answer)."""
    try:
        return sum(lag for partitions in partition_lag(settings.bootstrap(), group, settings).values()
                   for lag in partitions.values())
    except Exception:
        return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


EPISODE_COLUMNS = ("task", "outcome", "end_time", "num_interventions", "human_steps", "policy_version",
                   "policy_version_text", "actor_id")


def episodes_since(lake: Lakehouse, started_at_s: float, *, columns: tuple[str, ...] | None = EPISODE_COLUMNS
                   ) -> pa.Table | None:
    """The ``episodes`` rows that ended at or after ``started_at_s`` (None before the table exists).

    Read straight from the table's Arrow dataset, not through SQL: the view polls every few seconds and one
    small table is all it needs.
    """
    if not lake.exists("episodes"):
        return None
    dataset = lake.table("episodes", create=False).to_pyarrow_dataset()
    since = pa.scalar(datetime.fromtimestamp(started_at_s, UTC), dataset.schema.field("end_time").type)
    read = source_columns(dataset.schema, columns) if columns else None
    return upgrade(dataset.to_table(columns=read, filter=pc.field("end_time") >= since))


def helped(row: dict) -> bool:
    """Whether a human stepped in during the episode (a takeover, or any step under human control)."""
    return (row.get("num_interventions") or 0) > 0 or (row.get("human_steps") or 0) > 0


def episode_stats(episodes: pa.Table, *, now_s: float, elapsed_s: float, window: int = 20) -> dict:
    """What the view shows of the episodes closed since the start: per task (raw success overall and over the
    last ``window`` episodes, *autonomous* success — succeeded with no human step — the same ways, takeover
    rate), per policy version (newest 8; the same three rates), per actor (the version of its latest episode),
    totals, and episodes per hour over the last 10 minutes. ABORTED episodes (a robot stopped mid-episode) say
    nothing about the policy and count only in the totals."""
    table = upgrade(episodes)
    rows = sorted(table.select([c for c in EPISODE_COLUMNS if c in table.column_names]).to_pylist(),
                  key=lambda r: r["end_time"])

    def rate(rs: list[dict], hit: Callable[[dict], bool]) -> float | None:
        rs = [r for r in rs if r["outcome"] != "ABORTED"]
        return sum(hit(r) for r in rs) / len(rs) if rs else None

    def success(rs: list[dict]) -> float | None:
        return rate(rs, lambda r: r["outcome"] == "SUCCESS")

    def autonomous(rs: list[dict]) -> float | None:
        return rate(rs, lambda r: r["outcome"] == "SUCCESS" and not helped(r))

    def takeovers(rs: list[dict]) -> float | None:
        return rate(rs, helped)

    by: dict[str, dict[str, list[dict]]] = {"task": {}, "policy_version_text": {}, "actor_id": {}}
    for r in rows:
        for key, groups in by.items():
            groups.setdefault(r[key], []).append(r)
    per_task = [{"task": task, "episodes": len(rs), "success_all": success(rs), "success_recent": success(rs[-window:]),
                 "autonomous_all": autonomous(rs), "autonomous_recent": autonomous(rs[-window:]),
                 "takeover_rate": takeovers(rs), "takeover_recent": takeovers(rs[-window:])}
                for task, rs in sorted(by["task"].items())]
    # by the version as the event said it ("12", or "expert" where no registry version acted)
    newest_versions = sorted(by["policy_version_text"].items(), key=lambda kv: kv[1][-1]["end_time"], reverse=True)[:8]
    per_version = [{"policy_version": v, "episodes": len(rs), "success": success(rs), "autonomous": autonomous(rs),
                    "takeover_rate": takeovers(rs)} for v, rs in newest_versions]
    actors = [{"actor_id": a, "version": rs[-1]["policy_version_text"], "episodes": len(rs)}
              for a, rs in sorted(by["actor_id"].items())]
    last10 = sum(r["end_time"].timestamp() >= now_s - 600 for r in rows)
    span = min(600.0, elapsed_s)
    return {"per_task": per_task, "per_version": per_version, "actors": actors, "episodes": len(rows),
            "intervention_rate": takeovers(rows), "autonomous_rate": autonomous(rows),
            "episodes_per_hour": last10 * 3600 / span if span > 30 else None}


def gather(settings: Settings, *, started_at_s: float, window: int = 20,
           learner_status: Path | None = None, held_out: Callable[[], dict | None] | None = None) -> LiveState:
    now = time.time()
    st = LiveState(elapsed_s=now - started_at_s, held_out=held_out() if held_out is not None else None)
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    try:
        episodes = episodes_since(lake, started_at_s)
        if episodes is not None:
            for key, value in episode_stats(episodes, now_s=now, elapsed_s=st.elapsed_s, window=window).items():
                setattr(st, key, value)
    except Exception as exc:  # the view must keep drawing while tables are being created
        st.notes.append(f"episodes: {exc}")
    if lake.exists("steps"):
        with contextlib.suppress(Exception):
            actions = pa.table(lake.table("steps", create=False).get_add_actions(flatten=True))
            st.steps_rows = int(pc.sum(actions.column("num_records")).as_py() or 0)
    if learner_status is not None:
        st.learner = _json(learner_status)
    st.lag = kafka_lag(settings, settings.processor_group)
    return st


class LiveFeed:
    """``read()`` over and over on a daemon thread; the caller takes the newest state without waiting.

    The loop's stop conditions (duration, Ctrl-C, SIGTERM) must stay on time whatever a read does: with
    every core busy simulating, one read of the tables can take many seconds, and a read blocked inside
    native code cannot even be interrupted by Ctrl-C.
    """

    def __init__(self, read: Callable[[], LiveState], *, every_s: float = 2.0) -> None:
        self._read, self.every_s = read, every_s
        self._latest: LiveState | None = None
        self._read_at = time.time()
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sop-live-feed", daemon=True)

    def start(self) -> LiveFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._latest, self._error = self._read(), None
            except Exception as exc:  # noqa: BLE001 - shown in the view, the next read tries again
                self._error = f"{type(exc).__name__}: {exc}"
            self._read_at = time.time()
            self._stop.wait(self.every_s)

    def latest(self, *, elapsed_s: float) -> LiveState:
        """The newest state (an empty one before the first read ends), with a note when it is stale."""
        state = replace(self._latest) if self._latest is not None else LiveState()
        state.elapsed_s, state.notes = elapsed_s, list(state.notes)
        age = time.time() - self._read_at
        if self._error:
            state.notes.append(f"last read failed: {self._error}")
        if age > max(10.0, 5 * self.every_s):
            state.notes.append(f"reading the tables is slow: the figures are {age:.0f} s old")
        return state

    def close(self) -> None:
        self._stop.set()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _versions_roles(gate: dict) -> dict[str, str]:
    """version -> what the gate says of it (champion, candidate, promoted, rejected)."""
    roles: dict[str, str] = {}
    for d in gate.get("recent") or []:
        roles[str(d.get("version"))] = {"promote": "promoted", "reject": "rejected"}.get(d.get("decision"), "")
    if gate.get("champion") is not None:
        roles[str(gate["champion"])] = "champion"
    if gate.get("pending") is not None:
        roles[str(gate["pending"])] = "candidate"
    return roles


def _gate_lines(gate: dict) -> list[str]:
    if not gate:
        return []
    z = gate.get("z") or {}
    lines = []
    if gate.get("pending") is not None:
        lines.append(
            f"gate: candidate v{gate['pending']} {gate.get('candidate_episodes', 0)}/{gate.get('min_episodes', '-')} "
            f"episodes · autonomous {_pct(gate.get('candidate_autonomous'))} vs champion v{gate.get('champion')} "
            f"{_pct(gate.get('champion_autonomous'))} · takeovers {_pct(gate.get('candidate_takeover'))} vs "
            f"{_pct(gate.get('champion_takeover'))}"
            + (" · z " + ", ".join(f"{k} {v:+.2f}" for k, v in z.items()) if z else ""))
    decided = gate.get("recent") or []
    if decided:
        lines.append("gate decisions: " + " · ".join(
            f"v{d['version']} {'promoted' if d['decision'] == 'promote' else 'rejected'}" for d in decided[-5:]))
    return lines


def render(st: LiveState, *, title: str = "SOP — closed loop") -> Panel:
    tasks = Table(title="per task (recent: last episodes; autonomous: no human step; raw: rescues counted)",
                  expand=True)
    for col in ("task", "episodes", "autonomous", "raw", "takeovers", "autonomous (all)", "held-out", "ω_on"):
        tasks.add_column(col)
    omega = st.learner.get("omega", {}) or {}
    held = (st.held_out or {}).get("per_task") or {}
    for r in st.per_task:
        tasks.add_row(r["task"], str(r["episodes"]), _pct(r.get("autonomous_recent")), _pct(r["success_recent"]),
                      _pct(r.get("takeover_recent", r["takeover_rate"])), _pct(r.get("autonomous_all")),
                      _pct(held.get(r["task"])), _pct(omega.get(r["task"])))
    gate = st.learner.get("gate") or {}
    roles = _versions_roles(gate)
    versions = Table(title="per policy version", expand=True)
    for col in ("version", "role", "episodes", "autonomous", "raw", "takeovers"):
        versions.add_column(col)
    for r in st.per_version:
        versions.add_row(str(r["policy_version"]), roles.get(str(r["policy_version"]), ""), str(r["episodes"]),
                         _pct(r.get("autonomous")), _pct(r["success"]), _pct(r.get("takeover_rate")))
    actors = Table(title="actors", expand=True)
    for col in ("actor", "version", "episodes"):
        actors.add_column(col)
    for r in st.actors:
        actors.add_row(r["actor_id"], str(r["version"]), str(r["episodes"]))
    lrn = st.learner
    loss = lrn.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "-"
    eph = f"{st.episodes_per_hour:.0f}" if st.episodes_per_hour else "-"
    rate = lrn.get("samples_per_s")
    rate_text = f"{rate:.0f}" if isinstance(rate, int | float) else "-"
    held_text = ""
    if st.held_out:
        held_text = (f" · held-out (operator off) v{st.held_out.get('version')} {_pct(st.held_out.get('mean'))} "
                     f"at {st.held_out.get('t_min', 0):.1f} min")
    head = (f"elapsed {st.elapsed_s / 60:5.1f} min · episodes {st.episodes} · {eph} episodes/h · "
            f"autonomous success {_pct(st.autonomous_rate)} · takeover rate {_pct(st.intervention_rate)} · "
            f"Delta step rows {st.steps_rows:,} · Kafka lag {st.lag if st.lag is not None else '-'}{held_text}\n"
            f"learner step {lrn.get('step', '-')} · loss {loss_text} · "
            f"last registered version {lrn.get('last_version', '-')} · samples/s {rate_text}")
    parts = [head, *_gate_lines(gate), tasks, versions, actors, *st.notes[-2:]]
    return Panel(Group(*parts), title=title)
