"""The faust stream processor (``sop process``): a thin shell around :class:`consumers.machine.EpisodeMachine`.

    app, shell = build_app(ProcessorConfig(...))
    run_worker(app)          # until SIGINT/SIGTERM

What the shell does, and nothing more:
- one agent per input topic (``sop.steps``, ``sop.episodes``, ``sop.interventions``, co-partitioned by episode
  id, read with ``noack``) hands each event to the machine and carries out what it asks: acknowledge events,
  send dead letters (an event is acknowledged only once the broker has its dead letter);
- ``<group>-control`` (internal): a timer sends a tick to every partition; in that partition's context the
  machine chunks aged steps, force-closes or aborts stalled episodes (asking the broker for the partition's high
  watermarks first, so nothing is closed while a backlog is still being read) and forgets old tombstones;
- a flush timer takes the machine's batch, computes its rows (RECAP columns, value-model inference) and writes
  ``steps``, ``episodes`` and ``interventions`` through :class:`lakehouse.ExactlyOnceWriter` with each table's
  Kafka watermarks in the same Delta commit — all in a worker thread, off the event loop — then tells the
  machine, which acknowledges the events and finishes the episodes; compaction and vacuum run there too;
- assignment and revocation reset the machine's bookkeeping of those partitions (rebuilt from the recovered
  changelog-backed tables ``episode-meta`` and ``episode-steps`` at their first event).

The decisions and why they are safe are documented in :mod:`consumers.machine`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from consumers import commit_guard
from consumers.assembly import RewardConfig, RunningBaseline
from consumers.deadletter import deadletter_headers
from consumers.machine import (
    Authenticator,
    Batch,
    DeadLetter,
    EpisodeMachine,
    Inbound,
    Kind,
    MachineConfig,
    Outbox,
    Rows,
    Validator,
    build_rows,
)
from consumers.metrics import CLOSE_REASONS, ProcessorMetrics
from consumers.values import RegistryValueSource
from infra.kafka_client import aiokafka_settings
from lakehouse import Lakehouse
from lakehouse.maintenance import CompactionSchedule, VacuumSchedule, maybe_compact, maybe_vacuum

log = logging.getLogger("sop.processor")


@dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    bootstrap: str  # one broker or a comma-separated list
    topics: dict[str, str]  # Step / EpisodeEvent / InterventionEvent / deadletter -> topic
    partitions: int  # of the source topics (they must all have this many)
    # librdkafka-style client settings (SASL/TLS), mapped onto faust/aiokafka (infra.kafka_client)
    client_config: dict[str, str] = field(default_factory=dict)
    # the topics faust creates (the changelogs of episode-meta and episode-steps, the control topic)
    replication_factor: int = 1
    min_insync_replicas: int | None = None  # None: the broker's default
    control_retention_ms: int = 7 * 24 * 3600 * 1000
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
    value_model_version: str | None = None  # pinned (replay with a new value model, a frozen run); None: champion
    value_poll_s: float = 60.0
    # architecture name -> builder of a verified value version (`sop process`: sop-value); empty: no value model
    value_architectures: dict[str, Any] = field(default_factory=dict)
    compaction_min_small_files: int = 64
    compaction_interval_s: float = 900.0
    vacuum_interval_s: float = 6 * 3600.0
    vacuum_retention_hours: float | None = None  # None: the tables' own (one week)
    chunk_steps: int = 256  # most steps of one episode held in memory only (then one changelog entry)
    chunk_age_s: float = 5.0  # steps waiting longer go to the step store at the next tick
    metrics_file: Path | None = None
    session_timeout_s: float = 10.0
    validator: Validator | None = None  # edge validation beyond the codec (task contracts, clock skew, keys)
    authenticator: Authenticator | None = None  # Kafka security on: the producing robot's identity (signatures)
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
        if self.replication_factor < 1:
            problems.append(f"replication_factor must be >= 1, got {self.replication_factor}")
        if self.min_insync_replicas is not None and not 1 <= self.min_insync_replicas <= self.replication_factor:
            problems.append(f"min_insync_replicas must be in 1..{self.replication_factor}, got {self.min_insync_replicas}")
        for name in ("flush_interval_s", "tick_interval_s", "end_grace_s", "abort_timeout_s", "chunk_age_s",
                     "vacuum_interval_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if problems:
            raise ValueError("ProcessorConfig: " + "; ".join(problems))

    @property
    def control_topic(self) -> str:
        return f"{self.group_id}-control"

    @property
    def brokers(self) -> list[str]:
        """faust's broker URLs, one per bootstrap server."""
        return [f"kafka://{server.strip()}" for server in self.bootstrap.split(",") if server.strip()]

    def internal_topic_config(self) -> dict[str, str]:
        """Topic configs of the topics faust creates (replication is faust's ``topic_replication_factor``)."""
        return {"min.insync.replicas": str(self.min_insync_replicas)} if self.min_insync_replicas else {}

    def broker_settings(self) -> dict[str, Any]:
        """faust App settings for ``client_config``: ``broker_credentials`` (SASL and/or TLS) and
        ``broker_client_id``. Raises :class:`infra.kafka_client.ClientConfigError` naming a key it cannot map."""
        auth = aiokafka_settings(self.client_config)
        out: dict[str, Any] = {}
        protocol = auth["security_protocol"]
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            out["broker_credentials"] = faust.SASLCredentials(
                username=auth["sasl_plain_username"], password=auth["sasl_plain_password"],
                mechanism=auth["sasl_mechanism"], ssl_context=auth.get("ssl_context"))
        elif protocol == "SSL":
            out["broker_credentials"] = faust.SSLCredentials(auth["ssl_context"])
        if "client_id" in auth:
            out["broker_client_id"] = auth["client_id"]
        return out

    def machine_config(self) -> MachineConfig:
        return MachineConfig(
            topics={k: self.topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent")},
            control_topic=self.control_topic, chunk_steps=self.chunk_steps, chunk_age_s=self.chunk_age_s,
            end_grace_s=self.end_grace_s, abort_timeout_s=self.abort_timeout_s, tombstone_ttl_s=self.tombstone_ttl_s,
            tick_gap_s=max(10.0, 5 * self.tick_interval_s),
            stop_offsets=self.stop_offsets)


@dataclass
class Metrics:
    rows_written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flushes: int = 0
    flush_failures: int = 0
    value_model_errors: int = 0
    deadletters_failed: int = 0  # sends the broker refused (retried; the input stays unacknowledged)
    last_flush_s: float = 0.0
    commit_latency_s: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    events_in: Counter[str] = field(default_factory=Counter)  # topic -> every event read from it
    lag: dict[str, dict[str, int]] = field(default_factory=dict)  # topic -> partition -> not committed yet

    def snapshot(self, machine: EpisodeMachine) -> dict:
        lat = sorted(self.commit_latency_s[-500:])
        c = machine.counts
        return {
            "steps_in": c["steps_in"],
            "episodes_closed": c["episodes_complete"] + c["episodes_forced"] + c["episodes_aborted"],
            "episodes_aborted": c["episodes_aborted"], "episodes_forced": c["episodes_forced"],
            "episodes_poisoned": c["episodes_poisoned"], "interventions_in": c["interventions_in"],
            "deadletters": sum(machine.deadletters.values()),
            "deadletters_by_reason": {str(k): v for k, v in machine.deadletters.items()},
            "counted": {k: v for k, v in c.items()
                        if k.endswith(("_duplicate", "_replayed", "_reread", "_beyond_stop", "_after_close"))},
            "rows_written": dict(self.rows_written), "flushes": self.flushes, "flush_failures": self.flush_failures,
            "value_model_errors": self.value_model_errors, "deadletters_failed": self.deadletters_failed,
            "open_episodes": machine.open_count,
            "commit_latency_p50_s": lat[len(lat) // 2] if lat else None,
            "commit_latency_p99_s": lat[int(len(lat) * 0.99)] if lat else None,
            "steps_per_s": c["steps_in"] / max(1e-9, time.time() - self.started_at), "updated_at": time.time(),
            "events_in": dict(self.events_in), "lag": self.lag,
            "episodes_closed_by": {r: c[f"episodes_{r}"] for r in CLOSE_REASONS},
        }


def compacts_here(partitions: set[int]) -> bool:
    """Whether the worker whose partitions (rebuilt, being processed) are ``partitions`` maintains the tables: the
    owner of partition 0, one worker of a group at a time (but for the moment of a rebalance)."""
    return 0 in partitions


class Shell:
    """The Delta writers, the value model and the metrics around one machine (the agents call into it)."""

    def __init__(self, config: ProcessorConfig, *, meta: Any, chunks: Any) -> None:
        self.config = config
        self.lake = Lakehouse(config.lake_root, storage_options=config.lake_storage_options or None)
        topics, g = config.topics, config.group_id
        self.writers = {
            "steps": self.lake.writer("steps", app_id_prefix=f"{g}.{topics['Step']}", topic=topics["Step"]),
            "episodes": self.lake.writer("episodes", app_id_prefix=f"{g}.{topics['EpisodeEvent']}",
                                         topic=topics["EpisodeEvent"]),
            "aborted": self.lake.writer("episodes", app_id_prefix=f"{g}.{config.control_topic}",
                                        topic=config.control_topic),
            "interventions": self.lake.writer("interventions", app_id_prefix=f"{g}.{topics['InterventionEvent']}",
                                              topic=topics["InterventionEvent"]),
        }
        self.writers_lock = threading.Lock()
        self.machine = EpisodeMachine(config.machine_config(), meta=meta, chunks=chunks, validator=config.validator,
                                      authenticator=config.authenticator, committed=_WritersState(self))
        self.baseline = RunningBaseline(buckets=config.reward.baseline_buckets,
                                        max_episode_length=config.reward.max_episode_length)
        self.values = RegistryValueSource(tracking_uri=config.tracking_uri, name=config.value_model_name,
                                          pinned=config.value_model_version, poll_s=config.value_poll_s,
                                          architectures=config.value_architectures)
        self.metrics = Metrics()
        self.prometheus = ProcessorMetrics()  # served by `sop process` (infra.metrics)
        self.lag: Callable[[], dict[str, dict[str, int]]] | None = None  # set by build_app
        self._last_log = time.monotonic()
        now = time.monotonic()
        self.compaction = {name: CompactionSchedule(last_compaction_at=now,
                                                    min_small_files=config.compaction_min_small_files,
                                                    max_interval_s=config.compaction_interval_s)
                           for name in ("steps", "episodes", "interventions")}
        self.vacuum = {name: VacuumSchedule(interval_s=config.vacuum_interval_s,
                                            retention_hours=config.vacuum_retention_hours, last_vacuum_at=now)
                       for name in ("steps", "episodes", "interventions")}

    # -- the flush (runs in a worker thread: Delta writes and value-model inference block) ---------------
    def write(self, batch: Batch) -> Rows:
        try:
            self.values.refresh()
        except Exception as exc:  # the registry being away must not stop ingest: fall back to the baseline
            log.warning("value model lookup failed (%s); using the running baseline", exc)
        label = self.values.source_label
        rows = build_rows(batch, topics=self.config.topics, reward=self.config.reward, baseline=self.baseline,
                          value_fn=self.values if label else None, value_source=label)
        steps_wm, ends_wm, inter_wm = batch.watermarks(rows.poisoned)
        with self.writers_lock:
            self._commit(rows, steps_wm, ends_wm, inter_wm)
        self.maintain()
        return rows

    def _commit(self, rows: Rows, steps_wm: dict, ends_wm: dict, inter_wm: dict) -> None:
        t0 = time.monotonic()
        results = {}
        if rows.steps or steps_wm:
            results["steps"] = self.writers["steps"].write(rows.steps, offsets=steps_wm)
        if rows.episodes or ends_wm:
            results["episodes"] = self.writers["episodes"].write(rows.episodes, offsets=ends_wm)
        if rows.aborted:
            results["aborted"] = self.writers["aborted"].write(rows.aborted)
        if rows.interventions:
            results["interventions"] = self.writers["interventions"].write(rows.interventions, offsets=inter_wm)
        for name, res in results.items():
            table = "episodes" if name == "aborted" else name
            self.metrics.rows_written[table] += res.rows_written
            self.compaction[table].record_write(files_added=res.files_added)
        if results:
            self.metrics.commit_latency_s.append(time.monotonic() - t0)
            self.prometheus.commit(self.metrics.commit_latency_s[-1])
            del self.metrics.commit_latency_s[:-2000]
        self.metrics.value_model_errors += rows.value_errors

    def maintain(self) -> None:
        """Compaction and vacuum when due (maintenance is an optimisation: it never stops ingest), in one worker of
        the group only: the one holding input partition 0. delta-rs 1.6 lets two concurrent compactions of one
        table both commit, and every row they both rewrote is then in the table twice (two workers on the cluster
        profile duplicated 119,706 steps so; tests/unit/lakehouse/test_maintenance_concurrency.py)."""
        if not compacts_here(self.machine.ready):
            return
        now = time.monotonic()
        for name in self.compaction:
            try:
                maybe_compact(self.lake.table(name), self.compaction[name], now=now)
                maybe_vacuum(self.lake.table(name), self.vacuum[name], now=now)
            except Exception as exc:  # noqa: BLE001
                log.warning("maintenance of %s failed: %s", name, exc)

    def write_metrics(self) -> None:
        if self.lag is not None:
            try:
                self.metrics.lag = self.lag()
            except Exception as exc:  # noqa: BLE001 - metrics never stop ingest
                log.debug("consumer lag unavailable: %s", exc)
        snap = self.metrics.snapshot(self.machine)
        self.prometheus.publish(snap)
        now = time.monotonic()
        if now - self._last_log >= 30:
            self._last_log = now
            log.info("ingest: %(steps_in)d steps, %(episodes_closed)d episodes closed (%(episodes_aborted)d aborted, "
                     "%(episodes_forced)d forced), %(deadletters)d dead letters, %(open_episodes)d open, commit p50 "
                     "%(commit_latency_p50_s)s p99 %(commit_latency_p99_s)s", snap)
        if self.config.metrics_file is None:
            return
        tmp = self.config.metrics_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(snap))
        tmp.replace(self.config.metrics_file)


class _WritersState:
    """What the Delta writers say is stored (read at a partition's first event after an assignment)."""

    def __init__(self, shell: Shell) -> None:
        topics = shell.config.topics
        self.by_kind = {Kind.STEP: shell.writers["steps"], Kind.EPISODE: shell.writers["episodes"],
                        Kind.INTERVENTION: shell.writers["interventions"]}
        self.by_topic = {topics["Step"]: shell.writers["steps"], topics["EpisodeEvent"]: shell.writers["episodes"],
                         topics["InterventionEvent"]: shell.writers["interventions"],
                         shell.config.control_topic: shell.writers["aborted"]}

        self.lock = shell.writers_lock  # the flush thread writes through the same table handles

    def watermark(self, kind: Kind, partition: int) -> int | None:
        with self.lock:
            return self.by_kind[kind].committed_offset(partition)

    def is_stored(self, topic: str, partition: int, offset: int) -> bool:
        writer = self.by_topic.get(topic)
        if writer is None:
            return False
        with self.lock:
            return writer.is_committed(partition, offset)


def build_app(config: ProcessorConfig) -> tuple[faust.App, Shell]:
    # offsets delivered to the agents and not acknowledged yet, per partition: commits never pass them. A count
    # per offset: after a rebalance the same offset can be delivered twice in one generation (a message fetched
    # before it, and the same one read again from the committed offset), and acknowledging one copy (counted as
    # re-read) must not release the other, still held.
    held: dict[Any, Counter[int]] = defaultdict(Counter)
    commit_guard.install(lambda tp: held.get(tp, ()))
    commit_guard.install_drain()
    commit_guard.install_rewind(config.topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent"))
    config.datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        config.group_id, broker=config.brokers, store="memory://", datadir=str(config.datadir),
        topic_replication_factor=config.replication_factor, topic_partitions=config.partitions, web_enabled=False,
        consumer_auto_offset_reset="earliest", stream_wait_empty=False, broker_commit_interval=1.0,
        # a killed worker's partitions move to its replacement after this long (faust's default is 60 s)
        broker_session_timeout=config.session_timeout_s, broker_heartbeat_interval=config.session_timeout_s / 4,
        producer_max_request_size=8 * 1024 * 1024, consumer_max_fetch_size=16 * 1024 * 1024,
        producer_linger=0.01, producer_max_batch_size=1024 * 1024, stream_buffer_maxsize=16384,
        table_cleanup_interval=3600.0,
        **config.broker_settings(),
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    topic_of = {Kind.STEP: config.topics["Step"], Kind.EPISODE: config.topics["EpisodeEvent"],
                Kind.INTERVENTION: config.topics["InterventionEvent"]}
    steps_topic = app.topic(topic_of[Kind.STEP], **raw)
    episodes_topic = app.topic(topic_of[Kind.EPISODE], **raw)
    interventions_topic = app.topic(topic_of[Kind.INTERVENTION], **raw)
    internal = config.internal_topic_config()
    control_topic = app.topic(config.control_topic, partitions=config.partitions, internal=True,
                              retention=config.control_retention_ms / 1000, config=internal or None, **raw)
    deadletter_topic = app.topic(config.topics["deadletter"], **raw)
    meta = app.Table("episode-meta", partitions=config.partitions, key_type=bytes,  # JSON values
                     extra_topic_configs=internal)
    chunks = app.Table("episode-steps", partitions=config.partitions, key_type=bytes, value_type=bytes,
                       extra_topic_configs=internal)
    shell = Shell(config, meta=meta, chunks=chunks)
    machine = shell.machine
    inputs = frozenset(topic_of.values())

    def lag() -> dict[str, dict[str, int]]:
        """topic -> partition -> high watermark (as last fetched) - committed offset, of the assigned inputs."""
        out: dict[str, dict[str, int]] = {}
        committed = getattr(app.consumer, "_committed_offset", {})
        for tp in app.consumer.assignment():
            done = committed.get(tp)
            if tp.topic in inputs and done is not None:
                high = app.consumer.highwater(tp)
                if high is not None:
                    out.setdefault(tp.topic, {})[str(tp.partition)] = max(0, int(high) - int(done))
        return out

    shell.lag = lag
    # Handles are (event, generation): an acknowledgement decided before the last rebalance (a flush that
    # finished after it, a dead letter delivered after it) must not reach faust, whose commit bookkeeping
    # for the partition restarted from the committed offset.
    generation = [0]

    def ack(handle: Any) -> None:
        if handle is not None and handle[1] == generation[0]:
            event = handle[0]
            event.ack()
            copies = held[event.message.tp]
            copies[event.message.offset] -= 1
            if copies[event.message.offset] <= 0:
                del copies[event.message.offset]

    def send_letter(letter: DeadLetter) -> None:
        """Send one dead letter; its input is acknowledged when the broker confirms it (re-sent until then)."""
        async def go() -> None:
            while True:
                try:
                    fut = await deadletter_topic.send(
                        key=letter.key, value=letter.value,
                        headers=deadletter_headers(error=letter.error, reason=letter.reason,
                                                   topic=letter.topic, partition=letter.partition, offset=letter.offset,
                                                   timestamp_ms=letter.timestamp_ms, processor=config.group_id,
                                                   origin_identity=letter.identity))
                    await fut
                except Exception as exc:  # noqa: BLE001 - keep the input unacknowledged and try again
                    shell.metrics.deadletters_failed += 1
                    log.warning("dead letter for %s[%d]@%d not delivered (%s); retrying", letter.topic,
                                letter.partition, letter.offset, exc)
                    await asyncio.sleep(1.0)
                    continue
                ack(letter.handle)
                return

        log.warning("dead letter (%s) from %s[%d]@%d: %s", letter.reason, letter.topic, letter.partition,
                    letter.offset, letter.error)
        app.loop.create_task(go())

    def carry_out(out: Outbox) -> None:
        for handle in out.acks:
            ack(handle)
        for letter in out.letters:
            send_letter(letter)

    def handler(kind: Kind, method: Any) -> Any:
        async def consume(stream: faust.StreamT) -> None:
            async for event in stream.noack().events():
                msg = event.message
                held[msg.tp][msg.offset] += 1
                shell.metrics.events_in[msg.topic] += 1
                inbound = Inbound(kind=kind, partition=msg.partition, offset=msg.offset, value=msg.value,
                                  key=msg.key, timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                                  handle=(event, generation[0]), headers=msg.headers)
                try:
                    method(inbound, now_s=time.time())
                except Exception as exc:  # noqa: BLE001 - an unexpected error dead-letters this event only
                    log.exception("unexpected error on %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                    machine.failed(inbound, exc)
                out = machine.drain()
                if out:
                    carry_out(out)
        consume.__name__ = f"on_{kind}"
        return consume

    app.agent(steps_topic, name="on_steps")(handler(Kind.STEP, machine.on_step))
    app.agent(episodes_topic, name="on_episodes")(handler(Kind.EPISODE, machine.on_episode_event))
    app.agent(interventions_topic, name="on_interventions")(handler(Kind.INTERVENTION, machine.on_intervention))

    async def positions(p: int) -> tuple[dict[Kind, int | None], dict[Kind, int | None]]:
        """High watermarks from the broker (a ListOffsets request) and the committed positions of ``p``."""
        tps = {kind: TP(topic_of[kind], p) for kind in (Kind.STEP, Kind.EPISODE)}
        try:
            hws = await asyncio.wait_for(app.consumer.highwaters(*tps.values()), timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - unknown = not caught up: close nothing this tick
            log.info("high watermarks of partition %d unavailable: %s", p, exc)
            machine.broker_unreachable(now_s=time.time())
            hws = {}
        else:
            machine.broker_reachable(now_s=time.time())
        committed = getattr(app.consumer, "_committed_offset", {})
        return ({k: hws.get(tp) for k, tp in tps.items()}, {k: committed.get(tp) for k, tp in tps.items()})

    @app.agent(control_topic)
    async def on_control(stream: faust.StreamT) -> None:
        async for event in stream.events():
            p = event.message.partition
            try:
                now = time.time()
                hws = starts = None
                if machine.wants_highwaters(p, now_s=now):
                    hws, starts = await positions(p)
                machine.tick(p, now_s=time.time(), control_offset=event.message.offset, highwaters=hws,
                             positions=starts)
            except Exception:  # a tick carries no data: log and wait for the next one
                log.exception("tick of partition %d failed", p)
            out = machine.drain()
            if out:
                carry_out(out)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set, **_: Any) -> None:
        generation[0] += 1
        machine.revoke({tp.partition for tp in revoked if tp.topic == topic_of[Kind.STEP]})

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: set, **_: Any) -> None:
        generation[0] += 1
        held.clear()  # everything is read again from the committed offsets, and held anew
        commit_guard.forget_acknowledgements(app.consumer, assigned)
        machine.assign({tp.partition for tp in assigned if tp.topic == topic_of[Kind.STEP]})

    @app.timer(config.tick_interval_s)
    async def tick() -> None:
        for p in range(config.partitions):
            await control_topic.send(key=None, value=b"tick", partition=p)

    flush_lock = asyncio.Lock()

    @app.timer(config.flush_interval_s)
    async def flush() -> None:
        async with flush_lock:
            batch = machine.take_batch()
            if batch.empty and not (batch.step_marks or batch.end_marks):
                shell.write_metrics()
                return
            if batch.needs_durable_state:  # the closing episodes' metas durable before their rows are in Delta
                await app.producer.flush()
            loop = asyncio.get_running_loop()
            try:
                rows = await loop.run_in_executor(None, shell.write, batch)
            except Exception:
                log.exception("Delta write failed; the batch will be retried")
                shell.metrics.flush_failures += 1
                machine.requeue(batch)
                return
            machine.committed(batch, poisoned=rows.poisoned)
            shell.metrics.flushes += 1
            shell.metrics.last_flush_s = time.time()
            out = machine.drain()
            if out:
                carry_out(out)
            shell.write_metrics()

    return app, shell


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
