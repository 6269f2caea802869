"""The live view of a running loop: what a fleet operator watches (``sop run``, ``sop status --watch``).

``gather`` reads the same sources anyone could query — the Delta ``episodes`` table, the processor's
and learner's status files, the consumer group's committed offsets — so the view never depends on
being the process that started things.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, TopicPartition
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from lakehouse import Lakehouse, query
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
    notes: list[str] = field(default_factory=list)


def kafka_lag(settings: Settings, group: str) -> int | None:
    """Messages of the source topics not yet committed by the processor's consumer group."""
    try:
        c = Consumer({"bootstrap.servers": settings.bootstrap(), "group.id": group, "enable.auto.commit": False,
                      **settings.kafka_client_config})
        try:
            tps = []
            for name in ("Step", "EpisodeEvent", "InterventionEvent"):
                topic = settings.topics[name]
                md = c.list_topics(topic, timeout=5).topics[topic]
                tps += [TopicPartition(topic, p) for p in md.partitions]
            lag = 0
            for tp in c.committed(tps, timeout=5):
                hi = c.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                lag += hi - (tp.offset if tp.offset >= 0 else c.get_watermark_offsets(tp, timeout=5)[0])
            return lag
        finally:
            c.close()
    except Exception:
        return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def gather(settings: Settings, *, started_at_s: float, window: int = 20,
           learner_status: Path | None = None) -> LiveState:
    st = LiveState(elapsed_s=time.time() - started_at_s)
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    since = f"epoch_us(end_time) >= {int(started_at_s * 1e6)}"
    if lake.exists("episodes"):
        try:
            st.per_task = query(lake, f"""
                SELECT task, count(*) AS episodes,
                       avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) AS success_all,
                       (SELECT avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) FROM (
                           SELECT outcome FROM episodes e2 WHERE e2.task = e.task AND {since}
                           ORDER BY end_time DESC LIMIT {window})) AS success_recent,
                       avg(CASE WHEN num_interventions > 0 THEN 1.0 ELSE 0.0 END) AS takeover_rate
                FROM episodes e WHERE {since} GROUP BY task ORDER BY task""").to_pylist()
            st.per_version = query(lake, f"""
                SELECT policy_version, count(*) AS episodes,
                       avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) AS success
                FROM episodes WHERE {since} GROUP BY 1 ORDER BY max(end_time) DESC LIMIT 8""").to_pylist()
            st.actors = query(lake, f"""
                SELECT actor_id, arg_max(policy_version, end_time) AS version, count(*) AS episodes
                FROM episodes WHERE {since} GROUP BY 1 ORDER BY 1""").to_pylist()
            totals = query(lake, f"""
                SELECT count(*) AS n, avg(CASE WHEN num_interventions > 0 THEN 1.0 ELSE 0.0 END) AS takeovers,
                       count(*) FILTER (WHERE epoch_us(end_time) >= {int((time.time() - 600) * 1e6)}) AS last10
                FROM episodes WHERE {since}""").to_pylist()[0]
            st.episodes = totals["n"]
            st.intervention_rate = totals["takeovers"]
            span = min(600.0, st.elapsed_s)
            st.episodes_per_hour = totals["last10"] * 3600 / span if span > 30 else None
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(st: LiveState, *, title: str = "SOP — closed loop") -> Panel:
    tasks = Table(title="success per task", expand=True)
    for col in ("task", "episodes", "recent", "all", "takeovers", "ω_on"):
        tasks.add_column(col)
    omega = st.learner.get("omega", {}) or {}
    for r in st.per_task:
        tasks.add_row(r["task"], str(r["episodes"]), _pct(r["success_recent"]), _pct(r["success_all"]),
                      _pct(r["takeover_rate"]), _pct(omega.get(r["task"])))
    versions = Table(title="per policy version", expand=True)
    for col in ("version", "episodes", "success"):
        versions.add_column(col)
    for r in st.per_version:
        versions.add_row(str(r["policy_version"]), str(r["episodes"]), _pct(r["success"]))
    actors = Table(title="actors", expand=True)
    for col in ("actor", "version", "episodes"):
        actors.add_column(col)
    for r in st.actors:
        actors.add_row(r["actor_id"], str(r["version"]), str(r["episodes"]))
    lrn = st.learner
    loss = lrn.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "-"
    eph = f"{st.episodes_per_hour:.0f}" if st.episodes_per_hour else "-"
    head = (f"elapsed {st.elapsed_s / 60:5.1f} min · episodes {st.episodes} · {eph} episodes/h · "
            f"takeover rate {_pct(st.intervention_rate)} · Delta step rows {st.steps_rows:,} · "
            f"Kafka lag {st.lag if st.lag is not None else '-'}\n"
            f"learner step {lrn.get('step', '-')} · loss {loss_text} · "
            f"last registered version {lrn.get('last_version', '-')} · samples/s {lrn.get('samples_per_s', '-')}")
    parts = [head, tasks, versions, actors, *st.notes[-2:]]
    return Panel(Group(*parts), title=title)
