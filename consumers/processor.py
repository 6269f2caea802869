"""The faust stream processor (``sop process``): Kafka events → assembled episodes → exactly-once Delta rows.

    app = build_app(ProcessorConfig(...))
    run_worker(app)          # until SIGINT/SIGTERM

Agents (one per topic, co-partitioned by episode id):
- ``sop.steps``: each step is held in memory with its episode (decoded, for the close) and written to the
  changelog-backed table ``episode-steps`` in chunks of consecutive arrivals (key ``<episode>#c<n>``):
  once ``chunk_steps`` steps of an episode wait, or at a tick once the oldest waiting step is
  ``chunk_age_s`` old. A step event is acknowledged once its chunk is in the table, or once its episode
  is in Delta — so after a crash a step is either in a recovered chunk or read again from Kafka (step
  indices make the replayed copy idempotent). Episodes that end within ``chunk_age_s`` (a backlog being
  caught up, short episodes) thus reach Delta without their steps ever being copied into the changelog.
- ``sop.episodes``: STARTED/ENDED recorded in ``episode-meta``; an ENDED episode closes as soon as all
  the steps it announces are here.
- ``sop.interventions``: one ``interventions`` row per event, and the takeover counted in the meta.
- ``<group>-control`` (internal): a timer sends a tick to every partition; in that partition's context
  the tick closes episodes that lost steps (after ``end_grace_s``), aborts episodes whose end never
  came (after ``abort_timeout_s``; the tick's offset is their origin), finishes closed ones (marks them
  closed, deletes their steps) and forgets old tombstones.

Exactly once: closing an episode only queues its rows; a flush timer writes them (steps, then episodes,
then interventions) through ``lakehouse.ExactlyOnceWriter`` with each table's Kafka watermarks in the
same Delta commit. ENDED and intervention events are acknowledged only after their rows are in Delta,
and an episode's steps leave the table only after that, so a crash at any point replays into the
writers' filters: no duplicate, no loss. Undecodable events go to the dead-letter topic. Chunks (not one
changelog message per step) are what lets one worker keep up with thousands of steps per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from consumers import assembly
from consumers.assembly import CLOSED, OPEN, RewardConfig, RunningBaseline
from consumers.deadletter import deadletter_headers
from consumers.values import RegistryValueSource
from lakehouse import Lakehouse
from lakehouse.maintenance import CompactionSchedule, maybe_compact
from schemas import codec

log = logging.getLogger("sop.processor")


@dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    bootstrap: str
    topics: dict[str, str]  # Step / EpisodeEvent / InterventionEvent / deadletter -> topic
    partitions: int  # of the source topics (they must all have this many)
    lake_root: str
    lake_storage_options: dict[str, str] = field(default_factory=dict)
    group_id: str = "sop-processor"
    datadir: Path = Path(".sop/processor")
    flush_interval_s: float = 1.0
    tick_interval_s: float = 2.0
    end_grace_s: float = 15.0
    abort_timeout_s: float = 120.0
    tombstone_ttl_s: float = 3600.0
    reward: RewardConfig = field(default_factory=RewardConfig)
    tracking_uri: str | None = None
    value_model_name: str = "sop-value"
    value_poll_s: float = 60.0
    compaction_min_small_files: int = 64
    compaction_interval_s: float = 900.0
    chunk_steps: int = 256  # most steps of one episode held in memory only (then one changelog entry)
    chunk_age_s: float = 5.0  # steps waiting longer go to the step store at the next tick
    metrics_file: Path | None = None
    session_timeout_s: float = 10.0
    # replay: topic -> partition -> first offset NOT to process (events from there on are skipped)
    stop_offsets: dict[str, dict[int, int]] | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("Step", "EpisodeEvent", "InterventionEvent", "deadletter"):
            if name not in self.topics:
                problems.append(f"topics lacks {name!r}")
        if self.partitions < 1:
            problems.append(f"partitions must be >= 1, got {self.partitions}")
        if self.chunk_steps < 1:
            problems.append(f"chunk_steps must be >= 1, got {self.chunk_steps}")
        for name in ("flush_interval_s", "tick_interval_s", "end_grace_s", "abort_timeout_s", "chunk_age_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if problems:
            raise ValueError("ProcessorConfig: " + "; ".join(problems))

    @property
    def control_topic(self) -> str:
        return f"{self.group_id}-control"


@dataclass
class Pending:
    """What the next flush writes, and what it acknowledges / finishes afterwards."""

    steps: list[dict] = field(default_factory=list)
    episodes: list[dict] = field(default_factory=list)
    aborted: list[dict] = field(default_factory=list)
    interventions: list[dict] = field(default_factory=list)
    events_to_ack: list[Any] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)  # (partition, episode id)


@dataclass
class EpisodeBuffer:
    """An open episode's steps in this worker's memory: every step decoded (for the close), and the raw
    bytes and unacknowledged events of the steps that are not in a changelog chunk yet."""

    partition: int
    records: dict[int, tuple[int, dict]] = field(default_factory=dict)  # step index -> (offset, record)
    unchunked: list[tuple[int, int, bytes]] = field(default_factory=list)  # (index, offset, raw)
    events: list[Any] = field(default_factory=list)  # step events to acknowledge once their steps are safe
    chunks: int = 0  # chunks of this episode in the step store
    waiting_since_s: float = 0.0  # arrival of the oldest step not in a chunk

    def ack(self) -> None:
        for event in self.events:
            event.ack()
        self.events = []


@dataclass
class Metrics:
    steps_in: int = 0
    episodes_closed: int = 0
    episodes_aborted: int = 0
    episodes_forced: int = 0
    interventions_in: int = 0
    deadletters: int = 0
    rows_written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flushes: int = 0
    last_flush_s: float = 0.0
    commit_latency_s: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    def snapshot(self, open_episodes: int) -> dict:
        lat = sorted(self.commit_latency_s[-500:])
        return {
            "steps_in": self.steps_in, "episodes_closed": self.episodes_closed,
            "episodes_aborted": self.episodes_aborted, "episodes_forced": self.episodes_forced,
            "interventions_in": self.interventions_in, "deadletters": self.deadletters,
            "rows_written": dict(self.rows_written), "flushes": self.flushes, "open_episodes": open_episodes,
            "commit_latency_p50_s": lat[len(lat) // 2] if lat else None,
            "commit_latency_p99_s": lat[int(len(lat) * 0.99)] if lat else None,
            "steps_per_s": self.steps_in / max(1e-9, time.time() - self.started_at), "updated_at": time.time(),
        }


class Processor:
    """State and logic around the faust app; the agents below call into it."""

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.lake = Lakehouse(config.lake_root, storage_options=config.lake_storage_options or None)
        topics = config.topics
        g = config.group_id
        self.steps_writer = self.lake.writer("steps", app_id_prefix=f"{g}.{topics['Step']}", topic=topics["Step"])
        self.episodes_writer = self.lake.writer("episodes", app_id_prefix=f"{g}.{topics['EpisodeEvent']}",
                                                topic=topics["EpisodeEvent"])
        self.aborted_writer = self.lake.writer("episodes", app_id_prefix=f"{g}.{config.control_topic}",
                                               topic=config.control_topic)
        self.interventions_writer = self.lake.writer("interventions", app_id_prefix=f"{g}.{topics['InterventionEvent']}",
                                                     topic=topics["InterventionEvent"])
        self.pending = Pending()
        self.closing: set[str] = set()  # queued for the next flush (not yet in Delta)
        self.finish_queue: dict[int, list[str]] = defaultdict(list)  # partition -> episodes written, to finish
        # watermark bookkeeping (in memory; rebuilt from the meta table after a restart)
        self.step_next: dict[int, int] = {}
        self.open_first_step: dict[int, dict[str, int]] = defaultdict(dict)
        self.end_next: dict[int, int] = {}
        self.open_end_offsets: dict[int, dict[str, int]] = defaultdict(dict)
        self.scanned: set[int] = set()
        self.presence: dict[str, assembly.Presence] = {}
        self.buffers: dict[str, EpisodeBuffer] = {}
        self.baseline = RunningBaseline(buckets=config.reward.baseline_buckets,
                                        max_episode_length=config.reward.max_episode_length)
        self.values = RegistryValueSource(tracking_uri=config.tracking_uri, name=config.value_model_name,
                                          poll_s=config.value_poll_s)
        self.metrics = Metrics()
        self._last_log = time.monotonic()
        self.compaction = {name: CompactionSchedule(last_compaction_at=time.time(),
                                                    min_small_files=config.compaction_min_small_files,
                                                    max_interval_s=config.compaction_interval_s)
                           for name in ("steps", "episodes", "interventions")}
        self.meta: Any = None  # faust tables, set by build_app
        self.stepbuf: Any = None
        self.deadletter_topic: Any = None

    # -- helpers called inside agents (event context of the right partition) --------------------------
    def beyond_stop(self, msg: Any) -> bool:
        """Replay with an end: events at or after the stop offset of their partition are not processed."""
        stops = self.config.stop_offsets
        if not stops or msg.topic not in stops:
            return False
        stop = stops[msg.topic].get(msg.partition)
        return stop is not None and msg.offset >= stop

    def buffer(self, eid: str, partition: int) -> EpisodeBuffer:
        buf = self.buffers.get(eid)
        if buf is None:
            buf = self.buffers[eid] = EpisodeBuffer(partition=partition)
        return buf

    def present(self, eid: str, meta: dict, *, refresh: bool = False) -> assembly.Presence:
        """The episode's held step indices: memory plus the chunks in the step store. The store is probed
        after a restart (memory is empty then) and with ``refresh``, before a decision that cannot be
        undone (a rebalance may have recovered chunks meanwhile); chunked steps not in memory are decoded."""
        found = self.presence.get(eid)
        if found is None or refresh:
            last_seen = found.last_seen_s if found is not None else time.time()
            found = assembly.Presence(last_seen_s=last_seen)
            buf = self.buffer(eid, meta["partition"])
            n = 0
            while (blob := self.stepbuf.get(assembly.chunk_key(eid, n))) is not None:  # chunks are numbered densely
                for index, offset, raw in assembly.unpack_steps(blob):
                    if index not in buf.records:
                        _, record = codec.decode(raw, validate_record=False)
                        buf.records[index] = (offset, record)
                n += 1
            buf.chunks = max(buf.chunks, n)
            found.indices.update(buf.records)
            self.presence[eid] = found
        return found

    def hold_step(self, eid: str, meta: dict, step: dict, event: Any) -> None:
        """Keep a new step in memory; a full chunk goes to the step store (call in the step's partition)."""
        msg = event.message
        buf = self.buffer(eid, meta["partition"])
        buf.records[step["step_index"]] = (msg.offset, step)
        if not buf.unchunked:
            buf.waiting_since_s = time.time()
        buf.unchunked.append((step["step_index"], msg.offset, msg.value))
        buf.events.append(event)
        if len(buf.unchunked) >= self.config.chunk_steps:
            self.write_chunk(eid)

    def write_chunk(self, eid: str) -> None:
        """The episode's steps not yet in the step store, as one changelog entry; then their events are safe
        to acknowledge. Must run in the context of an event of the episode's partition (faust writes the
        changelog to the partition of the current event)."""
        buf = self.buffers.get(eid)
        if buf is None or not buf.unchunked:
            return
        self.stepbuf[assembly.chunk_key(eid, buf.chunks)] = assembly.pack_steps(buf.unchunked)
        buf.chunks += 1
        buf.unchunked = []
        buf.ack()

    def forget_partitions(self, partitions: set[int]) -> None:
        """After a revocation: drop what memory holds of those partitions' open episodes, without acknowledging
        their events (faust seeks to the committed offsets on reassignment, so they are read again)."""
        for eid in [e for e, b in self.buffers.items() if b.partition in partitions]:
            del self.buffers[eid]
            self.presence.pop(eid, None)

    def finish_written(self, partition: int) -> None:
        """Mark episodes already in Delta as closed and drop their steps (changelog writes to ``partition``)."""
        for eid in self.finish_queue.pop(partition, []):
            key = eid.encode()
            meta = self.meta.get(key)
            if meta is None:
                continue
            buf = self.buffers.pop(eid, None)
            n = buf.chunks if buf is not None else 0
            while assembly.chunk_key(eid, n) in self.stepbuf:  # chunks memory does not know of (a restart)
                n += 1
            for i in range(n):
                with contextlib.suppress(KeyError):
                    del self.stepbuf[assembly.chunk_key(eid, i)]
            meta["status"] = CLOSED
            meta["closed_at_s"] = time.time()
            self.meta[key] = meta
            self.closing.discard(eid)
            self.presence.pop(eid, None)

    def rescan(self, partition: int) -> None:
        """After a (re)start: learn the open episodes of ``partition`` from the recovered meta table."""
        if partition in self.scanned:
            return
        self.scanned.add(partition)
        for _key, meta in list(self.meta.items()):
            if meta.get("partition") != partition or meta["status"] != OPEN:
                continue
            if meta["first_step_offset"] is not None:
                self.open_first_step[partition][meta["episode_id"]] = meta["first_step_offset"]
            end = meta.get("ended")
            if end is not None and end["topic"] == self.config.topics["EpisodeEvent"]:
                self.open_end_offsets[partition][meta["episode_id"]] = end["offset"]

    async def dead_letter(self, event: Any, error: Exception) -> None:
        msg = event.message
        self.metrics.deadletters += 1
        log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, error)
        await self.deadletter_topic.send(
            key=msg.key, value=msg.value,
            headers=deadletter_headers(error=error, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                       timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                                       processor=self.config.group_id))

    def close(self, meta: dict, *, reason: str) -> None:
        """Compute the episode's rows and queue them for the next flush (state stays OPEN until written)."""
        eid = meta["episode_id"]
        if eid in self.closing:
            return
        self.present(eid, meta, refresh=True)
        topic, partition = self.config.topics["Step"], meta["partition"]
        buf = self.buffer(eid, partition)
        steps = [(record, topic, partition, offset) for _, (offset, record) in sorted(buf.records.items())]
        try:
            self.values.refresh()
        except Exception as exc:  # the registry being away must not stop ingest: fall back to the baseline
            log.warning("value model lookup failed (%s); using the running baseline", exc)
        closed = assembly.close_episode(meta, steps, config=self.config.reward, baseline=self.baseline,
                                        value_fn=self.values if self.values.source_label else None,
                                        value_source=self.values.source_label)
        self.closing.add(eid)
        self.pending.steps.extend(closed.steps)
        if meta["ended"]["closed_by"] == "timeout":
            self.pending.aborted.append(closed.episode)
            self.metrics.episodes_aborted += 1
        else:
            self.pending.episodes.append(closed.episode)
        if reason == "forced":
            self.metrics.episodes_forced += 1
        self.pending.finished.append((meta["partition"], eid))
        self.metrics.episodes_closed += 1

    # -- the flush (runs in a worker thread; Delta writes block) -------------------------------------
    def take_pending(self) -> Pending:
        batch, self.pending = self.pending, Pending()
        return batch

    def watermarks(self, batch: Pending) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        finished = {eid for _, eid in batch.finished}
        steps_wm: dict[int, int] = {}
        for p, nxt in self.step_next.items():
            if p not in self.scanned:
                continue
            still_open = [o for eid, o in self.open_first_step[p].items() if eid not in finished]
            steps_wm[p] = min([nxt, *still_open]) - 1
        ends_wm: dict[int, int] = {}
        for p, nxt in self.end_next.items():
            if p not in self.scanned:
                continue
            still_open = [o for eid, o in self.open_end_offsets[p].items() if eid not in finished]
            ends_wm[p] = min([nxt, *still_open]) - 1
        inter_wm: dict[int, int] = {}
        for row in batch.interventions:
            p = row["kafka_partition"]
            inter_wm[p] = max(inter_wm.get(p, -1), row["kafka_offset"])
        return ({p: w for p, w in steps_wm.items() if w >= 0}, {p: w for p, w in ends_wm.items() if w >= 0},
                inter_wm)

    def write(self, batch: Pending, steps_wm: dict, ends_wm: dict, inter_wm: dict) -> None:
        t0 = time.monotonic()
        results = {}
        if batch.steps or steps_wm:
            results["steps"] = self.steps_writer.write(batch.steps, offsets=steps_wm)
        if batch.episodes or ends_wm:
            results["episodes"] = self.episodes_writer.write(batch.episodes, offsets=ends_wm)
        if batch.aborted:
            results["aborted"] = self.aborted_writer.write(batch.aborted)
        if batch.interventions:
            results["interventions"] = self.interventions_writer.write(batch.interventions, offsets=inter_wm)
        for name, res in results.items():
            table = "episodes" if name == "aborted" else name
            self.metrics.rows_written[table] += res.rows_written
            self.compaction[table].record_write(files_added=res.files_added)
        self.metrics.commit_latency_s.append(time.monotonic() - t0)
        del self.metrics.commit_latency_s[:-2000]
        for name, schedule in self.compaction.items():
            if schedule.due(now=time.time()):
                try:
                    maybe_compact(self.lake.table(name), schedule)
                except Exception as exc:  # compaction is an optimisation; never stop ingest for it
                    log.warning("compaction of %s failed: %s", name, exc)

    def after_write(self, batch: Pending) -> None:
        for event in batch.events_to_ack:
            event.ack()
        for p, eid in batch.finished:
            buf = self.buffers.get(eid)
            if buf is not None:  # its steps are in Delta now: the ones never chunked need no chunk
                buf.ack()
                buf.unchunked = []
                buf.records.clear()
            self.open_first_step[p].pop(eid, None)
            self.open_end_offsets[p].pop(eid, None)
            self.finish_queue[p].append(eid)
        self.metrics.flushes += 1
        self.metrics.last_flush_s = time.time()

    def write_metrics(self) -> None:
        snap = self.metrics.snapshot(open_episodes=sum(len(v) for v in self.open_first_step.values()))
        now = time.monotonic()
        if now - self._last_log >= 30:
            self._last_log = now
            log.info("ingest: %(steps_in)d steps, %(episodes_closed)d episodes closed (%(episodes_aborted)d aborted), "
                     "%(deadletters)d dead letters, %(open_episodes)d open, commit p50 %(commit_latency_p50_s)s "
                     "p99 %(commit_latency_p99_s)s", snap)
        if self.config.metrics_file is None:
            return
        tmp = self.config.metrics_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(snap))
        tmp.replace(self.config.metrics_file)


def build_app(config: ProcessorConfig) -> tuple[faust.App, Processor]:
    proc = Processor(config)
    config.datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        config.group_id, broker=f"kafka://{config.bootstrap}", store="memory://", datadir=str(config.datadir),
        topic_replication_factor=1, topic_partitions=config.partitions, web_enabled=False,
        consumer_auto_offset_reset="earliest", stream_wait_empty=False, broker_commit_interval=1.0,
        # a killed worker's partitions move to its replacement after this long (faust's default is 60 s)
        broker_session_timeout=config.session_timeout_s, broker_heartbeat_interval=config.session_timeout_s / 4,
        producer_max_request_size=8 * 1024 * 1024, consumer_max_fetch_size=16 * 1024 * 1024,
        # changelog writes (one per step) batched instead of one produce request each
        producer_linger=0.01, producer_max_batch_size=1024 * 1024, stream_buffer_maxsize=16384,
        table_cleanup_interval=3600.0,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    steps_topic = app.topic(config.topics["Step"], **raw)
    episodes_topic = app.topic(config.topics["EpisodeEvent"], **raw)
    interventions_topic = app.topic(config.topics["InterventionEvent"], **raw)
    control_topic = app.topic(config.control_topic, partitions=config.partitions, internal=True, **raw)
    proc.deadletter_topic = app.topic(config.topics["deadletter"], **raw)
    proc.meta = app.Table("episode-meta", partitions=config.partitions, key_type=bytes)  # JSON values
    proc.stepbuf = app.Table("episode-steps", partitions=config.partitions, key_type=bytes, value_type=bytes)
    meta = proc.meta

    def decoded(event: Any, expected: str) -> dict:
        name, record = codec.decode(event.value)
        if name != expected:
            raise codec.InvalidMessageError(f"a {name} record on the {expected} topic {event.message.topic}")
        return record

    async def admit(event: Any, expected: str, *, ack: bool) -> dict | None:
        """The start of every data event: skip what lies past a replay's end, finish what is written in this
        partition, then decode — or dead-letter and move on."""
        msg = event.message
        if proc.beyond_stop(msg):
            if ack:
                event.ack()
            return None
        proc.rescan(msg.partition)
        proc.finish_written(msg.partition)
        try:
            return decoded(event, expected)
        except codec.DecodeError as exc:
            await proc.dead_letter(event, exc)
            if ack:
                event.ack()
            return None

    async def guarded(event: Any, handle: Any, *, ack: bool) -> None:
        """Run one event's handler; an unexpected error dead-letters that event instead of killing the agent."""
        try:
            await handle(event)
        except Exception as exc:
            log.exception("unexpected error on %s[%d]@%d", event.message.topic, event.message.partition,
                          event.message.offset)
            await proc.dead_letter(event, exc)
            if ack:
                event.ack()

    @app.agent(steps_topic)
    async def on_steps(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            await guarded(event, handle_step, ack=True)

    async def handle_step(event: Any) -> None:
        step = await admit(event, "Step", ack=True)
        if step is None:
            return
        msg = event.message
        p = msg.partition
        proc.step_next[p] = max(proc.step_next.get(p, 0), msg.offset + 1)
        eid = step["episode_id"]
        key = eid.encode()
        m = meta.get(key)
        if m is not None and (m["status"] == CLOSED or eid in proc.closing):
            event.ack()  # a replayed or late step of an episode already written
            return
        now = time.time()
        created = m is None
        m = m or assembly.new_meta(eid, p, now)
        present = proc.present(eid, m)
        if step["step_index"] in present.indices:
            event.ack()  # a second copy of a step already held
        else:
            present.indices.add(step["step_index"])
            proc.metrics.steps_in += 1
            proc.hold_step(eid, m, step, event)
        present.last_seen_s = now
        if assembly.on_step(m, step, offset=msg.offset) or created:
            meta[key] = m
        proc.open_first_step[p].setdefault(eid, m["first_step_offset"])
        if m["ended"] is not None and assembly.is_complete(m, present):
            proc.close(m, reason="complete")

    @app.agent(episodes_topic)
    async def on_episodes(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            await guarded(event, handle_episode_event, ack=True)

    async def handle_episode_event(event: Any) -> None:
        ev = await admit(event, "EpisodeEvent", ack=True)
        if ev is None:
            return
        msg = event.message
        p = msg.partition
        proc.end_next[p] = max(proc.end_next.get(p, 0), msg.offset + 1)
        eid = ev["episode_id"]
        key = eid.encode()
        m = meta.get(key)
        if m is not None and m["status"] == CLOSED:
            event.ack()
            return
        m = m or assembly.new_meta(eid, p, time.time())
        assembly.on_episode_event(m, ev, topic=msg.topic, partition=p, offset=msg.offset)
        meta[key] = m
        present = proc.present(eid, m)
        present.last_seen_s = time.time()
        end = m["ended"]
        if ev["kind"] == "STARTED" or end is None or end["offset"] != msg.offset or eid in proc.closing:
            event.ack()  # nothing to write for it (its state is in the changelog) or a duplicate end
            return
        proc.open_end_offsets[p][eid] = msg.offset
        proc.pending.events_to_ack.append(event)
        if assembly.is_complete(m, present):
            proc.close(m, reason="complete")

    @app.agent(interventions_topic)
    async def on_interventions(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            await guarded(event, handle_intervention, ack=True)

    async def handle_intervention(event: Any) -> None:
        ev = await admit(event, "InterventionEvent", ack=True)
        if ev is None:
            return
        msg = event.message
        p = msg.partition
        key = ev["episode_id"].encode()
        m = meta.get(key)
        if m is None or m["status"] == OPEN:
            m = m or assembly.new_meta(ev["episode_id"], p, time.time())
            assembly.on_intervention(m, ev)
            meta[key] = m
            proc.present(ev["episode_id"], m).last_seen_s = time.time()
        proc.pending.interventions.append({**ev, "kafka_topic": msg.topic, "kafka_partition": p,
                                           "kafka_offset": msg.offset})
        proc.pending.events_to_ack.append(event)
        proc.metrics.interventions_in += 1

    @app.agent(control_topic)
    async def on_control(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await handle_tick(event)
            except Exception:  # a tick carries no data: log and wait for the next one
                log.exception("tick handling failed")

    async def handle_tick(event: Any) -> None:
        msg = event.message
        p = msg.partition
        proc.rescan(p)
        proc.finish_written(p)
        now = time.time()
        cfg = proc.config
        for key, m in list(meta.items()):
            if m.get("partition") != p:
                continue
            eid = m["episode_id"]
            if m["status"] == CLOSED:
                if now - (m.get("closed_at_s") or now) > cfg.tombstone_ttl_s:
                    del meta[key]
                continue
            if eid in proc.closing:
                continue
            buf = proc.buffers.get(eid)
            if buf is not None and buf.unchunked and now - buf.waiting_since_s >= cfg.chunk_age_s:
                proc.write_chunk(eid)  # a long episode's steps become durable and their events acknowledged
            present = proc.present(eid, m)
            if assembly.is_complete(m, present):
                proc.close(m, reason="complete")
            elif assembly.should_force_close(m, present, now_s=now, grace_s=cfg.end_grace_s) and \
                    not assembly.is_complete(m, present := proc.present(eid, m, refresh=True)):
                log.warning("episode %s: %d of %d steps after %.0fs; closing with what arrived", eid,
                            present.count, m["ended"]["num_steps"], cfg.end_grace_s)
                proc.close(m, reason="forced")
            elif assembly.is_complete(m, present):
                proc.close(m, reason="complete")
            elif assembly.should_abort(m, present, now_s=now, timeout_s=cfg.abort_timeout_s):
                assembly.abort(m, present, topic=msg.topic, partition=p, offset=msg.offset, now_us=int(now * 1e6))
                meta[key] = m
                log.warning("episode %s: no end after %.0fs of silence; stored as ABORTED", eid,
                            cfg.abort_timeout_s)
                proc.close(m, reason="aborted")

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set, **_: Any) -> None:
        proc.forget_partitions({tp.partition for tp in revoked if tp.topic == config.topics["Step"]})

    @app.timer(config.tick_interval_s)
    async def tick() -> None:
        for p in range(config.partitions):
            await control_topic.send(key=None, value=b"tick", partition=p)

    flush_lock = asyncio.Lock()

    @app.timer(config.flush_interval_s)
    async def flush() -> None:
        async with flush_lock:
            batch = proc.take_pending()
            steps_wm, ends_wm, inter_wm = proc.watermarks(batch)
            if not (batch.steps or batch.episodes or batch.aborted or batch.interventions or steps_wm or ends_wm):
                proc.write_metrics()
                return
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, proc.write, batch, steps_wm, ends_wm, inter_wm)
            except Exception:
                log.exception("Delta write failed; the batch will be retried")
                # put the batch back in front so nothing is lost; the writers drop what did land
                proc.pending = _merge(batch, proc.pending)
                return
            proc.after_write(batch)
            proc.write_metrics()

    return app, proc


def _merge(first: Pending, then: Pending) -> Pending:
    return Pending(steps=first.steps + then.steps, episodes=first.episodes + then.episodes,
                   aborted=first.aborted + then.aborted, interventions=first.interventions + then.interventions,
                   events_to_ack=first.events_to_ack + then.events_to_ack, finished=first.finished + then.finished)


class _QuietFlushOverlap(logging.Filter):
    """The flush timer overlapping itself only means a Delta commit took longer than the flush interval
    (the next flush then takes a bigger batch): expected under load, and it flooded the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        overlap = isinstance(record.msg, str) and record.msg.startswith("Timer %s is overlapping")
        return not (overlap and bool(record.args) and "flush" in str(record.args[0]))


def run_worker(app: faust.App, *, loglevel: str = "warning") -> None:
    """Run the faust worker in this process until SIGINT/SIGTERM."""
    from faust.worker import Worker

    logging.getLogger("mode.timers").addFilter(_QuietFlushOverlap())

    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # faust's terminal spinner lowers the root logger to DEBUG (so every aiokafka send builds a log record,
    # ~10% of the processor's time) and writes escape codes into log files
    worker.spinner = None
    worker.execute_from_commandline()
