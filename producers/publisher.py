"""The event publisher: Avro-encoded records onto Kafka, idempotently, with nothing lost silently.

    publisher = EventPublisher(PublisherConfig(bootstrap="127.0.0.1:9092", topics=settings.topics))
    publisher.publish("Step", step, key=step["episode_id"])   # blocks (back-pressure) if the queue is full
    publisher.flush()                                         # returns how many are still undelivered
    publisher.stats                                           # produced / delivered / failed counts

With ``PublisherConfig(signer=Signer(principal, key))`` (Kafka security on: the robot's identity of
`sop robot add`) every event carries the robot's signature headers (:mod:`schemas.identity`), which the
processor verifies before it believes the event's ``actor_id``.

Every message ends in exactly one of two counters: ``delivered`` (acknowledged by all in-sync
replicas) or ``failed`` (reported through ``on_failure`` and kept in ``failures``), never neither.

With a spool (``EventPublisher(config, spool=SpoolConfig(directory=...))``, what ``sop actor`` runs)
a long Kafka outage costs nothing either: messages go to a bounded on-disk spool
(:mod:`producers.spool`) and are drained from it, in order, when Kafka is back:

- When to spill: a delivery report fails with a retriable error (the delivery timeout expired,
  ``SOP_PUBLISH_DELIVERY_TIMEOUT_MS``), or no acknowledgement came for ``spill_after_s`` while
  messages wait (the earlier signal: an outage is seen in seconds, not after the delivery timeout).
  Then everything still in librdkafka's RAM queue is purged into the spool, sorted back into the
  order it was produced. Errors that a retry cannot fix (message too large, unknown topic,
  authorisation) are not spooled: they stay ``failed``, as without a spool.
- Ordering: once the spool holds anything, *new events go into the spool too*, behind the older
  ones, and only the spool feeds Kafka until it is empty; then the publisher produces directly
  again. The alternative, sending new events directly while draining older ones, would put an
  episode's late steps (or its ENDED) on the topic before its early ones; with one ordered path
  the topic gets each key's events in the order they were produced (librdkafka keeps per-partition
  order on retries, ``enable.idempotence``), at the cost of new events waiting behind the backlog.
  While the broker is down the publisher sends one spooled message at a time (a probe); the first
  acknowledgement opens a window of ``drain_window`` messages.
- Re-produced messages keep their original Kafka timestamp, key and headers.
- Duplicates: a message librdkafka may already have written when it was purged or timed out
  ("possibly persisted"; confluent-kafka 2.16 does not expose librdkafka's per-message persistence
  status) is counted in ``stats.ambiguous`` and sent again: one that was produced while librdkafka
  reported all brokers down was never sent and is not counted. The processor de-duplicates steps by
  (episode, step index), ends by episode, interventions by (episode, kind, step), so a copy is harmless.
- The bound: new events are refused while the spool is full: :meth:`EventPublisher.wait_for_room`
  (the actor calls it before each step) pauses, or raises :class:`SpoolFullError` under
  ``when_full="fail"``; ``publish`` itself blocks (or raises) only past a headroom above the bound,
  so the records of the step in progress and the episode's ENDED still fit. Messages that were
  already in the RAM queue are always kept, bound or not.
- ``flush``/``close`` make everything durable: what Kafka has not acknowledged by the timeout is in
  the spool, and a publisher that opens the same spool directory later (a restarted actor) drains it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Producer

from producers.spool import Spool, SpoolConfig, SpoolError, SpoolFullError
from schemas import codec
from schemas.identity import Signer

__all__ = [
    "BackpressureTimeout", "DeliveryFailedError", "EventPublisher", "Failure", "PublishError", "PublisherConfig",
    "PublisherStats", "SpoolConfig", "SpoolError", "SpoolFullError", "ambiguous_failure", "spoolable",
]

# librdkafka's own log lines (connection refused while a broker restarts, …) go to Python logging.
KAFKA_LOG = logging.getLogger("sop.kafka")
LOG = logging.getLogger("sop.publisher")

DIRECT, SPOOLING, DRAINING = "direct", "spooling", "draining"

# Delivery errors that mean "not now" rather than "never": the message goes to the spool.
SPOOLABLE_CODES = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TIMED_OUT_QUEUE, KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.BROKER_NOT_AVAILABLE,
})
# Errors with which the broker said it did not write the message.
NOT_WRITTEN_CODES = frozenset({
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
})


def spoolable(code: int, *, retriable: bool, fatal: bool) -> bool:
    """Whether a failed delivery should be retried later from the spool (else it is reported failed)."""
    return not fatal and (code in SPOOLABLE_CODES or retriable)


def ambiguous_failure(code: int, *, produce_no: int, down_since_produce_no: int | None) -> bool:
    """Whether Kafka may have written a message that failed with ``code``. ``produce_no`` numbers the
    produce calls; ``down_since_produce_no`` is the number of the last one before librdkafka reported
    all brokers down (None while a broker is up): a message produced after that had no connection."""
    if code == KafkaError._PURGE_INFLIGHT:
        return True
    if code in NOT_WRITTEN_CODES:
        return False
    return down_since_produce_no is None or produce_no <= down_since_produce_no


class PublishError(RuntimeError):
    """Publishing failed in a way the caller must handle."""


class BackpressureTimeout(PublishError):
    """The local queue stayed full for longer than ``max_block_s`` (the broker is down or too slow)."""


class DeliveryFailedError(PublishError):
    """A message could not be delivered (raised by ``flush``/``close`` when ``raise_on_failure``)."""


@dataclass(frozen=True)
class Failure:
    topic: str
    key: str | None
    error: str
    retriable: bool


@dataclass
class PublisherStats:
    produced: int = 0  # publish calls
    delivered: int = 0  # acknowledged by Kafka (drained ones included)
    failed: int = 0  # reported failed (never spooled: a retry cannot fix them)
    backpressure_waits: int = 0
    bytes_produced: int = 0
    # the spool (all zero without one)
    spool_state: str = "off"  # off | direct | spooling (Kafka unreachable: probing) | draining
    spooled: int = 0  # messages written to the spool by this process
    drained: int = 0  # spooled messages Kafka acknowledged (also counted in delivered)
    recovered: int = 0  # messages found in the spool at start (left by an earlier process)
    spool_pending: int = 0  # messages in the spool not yet acknowledged
    spool_bytes: int = 0
    spool_max_bytes: int = 0
    ambiguous: int = 0  # sent again although Kafka may have written them (a possible duplicate)
    spills: int = 0  # times the publisher switched to the spool
    paused: bool = False  # the spool is full: the actor waits for room
    spool_full_waits: int = 0
    spool_truncated_bytes: int = 0  # a torn last record cut off at start (a crash mid-write)
    spool_corrupt_bytes: int = 0  # quarantined as <segment>.corrupt at start

    @property
    def in_flight(self) -> int:
        """Messages held only in RAM (neither acknowledged, failed nor in the spool)."""
        return self.produced + self.recovered - self.delivered - self.failed - self.spool_pending


@dataclass(frozen=True, kw_only=True)
class PublisherConfig:
    bootstrap: str
    topics: dict[str, str]  # record name -> topic
    client_config: dict[str, str] = field(default_factory=dict)
    compression: str = "lz4"
    linger_ms: int = 5
    batch_bytes: int = 1_000_000
    queue_max_messages: int = 100_000
    queue_max_kbytes: int = 256 * 1024
    delivery_timeout_ms: int = 120_000
    max_message_bytes: int = 8 * 1024 * 1024
    max_block_s: float = 300.0
    client_id: str = "sop-publisher"
    # Kafka security on: the robot's identity; every event carries its signature headers (schemas.identity)
    signer: Signer | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("PublisherConfig.bootstrap is empty: set SOP_KAFKA_BOOTSTRAP or run `sop up`")
        missing = {"Step", "EpisodeEvent", "InterventionEvent"} - set(self.topics)
        if missing:
            raise ValueError(f"PublisherConfig.topics lacks a topic for {sorted(missing)}")

    def librdkafka(self) -> dict[str, object]:
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": self.compression,
            "linger.ms": self.linger_ms,
            "batch.size": self.batch_bytes,
            "queue.buffering.max.messages": self.queue_max_messages,
            "queue.buffering.max.kbytes": self.queue_max_kbytes,
            "delivery.timeout.ms": self.delivery_timeout_ms,
            "message.max.bytes": self.max_message_bytes,
            **self.client_config,
        }


@dataclass
class _Failed:
    """A direct message librdkafka gave back, waiting to be written to the spool in produce order."""

    seq: int
    topic: str
    value: bytes
    key: bytes | None
    headers: list | None
    timestamp_ms: int
    ambiguous: bool


class EventPublisher:
    """Implements ``producers.interfaces.EventSink`` on confluent-kafka (see the module docstring)."""

    def __init__(
        self,
        config: PublisherConfig,
        *,
        on_failure: Callable[[Failure], None] | None = None,
        raise_on_failure: bool = True,
        spool: SpoolConfig | None = None,
        spill_after_s: float = 30.0,
        drain_window: int = 500,
    ) -> None:
        if not spill_after_s > 0:
            raise ValueError(f"spill_after_s must be > 0, got {spill_after_s}")
        self.config = config
        self.stats = PublisherStats()
        self.failures: list[Failure] = []
        self._on_failure = on_failure
        self._raise_on_failure = raise_on_failure
        self._lock = threading.RLock()
        self._since_poll = 0
        self._spool: Spool | None = None
        extra: dict[str, object] = {"logger": KAFKA_LOG}
        if spool is not None:
            self._spool = Spool(spool)
            extra["error_cb"] = self._on_client_error
        self._producer = Producer({**config.librdkafka(), **extra})
        if self._spool is None:
            return
        # -- spool state: guarded by _lock; every poll of the producer holds _poll_lock (taken before _lock)
        self._poll_lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._spill_after_s = spill_after_s
        self._drain_window = max(1, min(drain_window, config.queue_max_messages // 2))
        self._drain_bytes = max(1 << 20, config.queue_max_kbytes * 1024 // 4)
        self._headroom = max(1 << 20, spool.max_bytes // 16)
        self._seq = 0  # direct messages, in produce order
        self._produce_no = 0  # every produce call, direct or from the spool
        self._down_since: int | None = None  # _produce_no when librdkafka last reported all brokers down
        self._direct_in_flight = 0
        self._spool_in_flight = 0
        self._returned: list[_Failed] = []  # direct messages given back by librdkafka, to spool
        self._rewind = False  # a spooled message failed: read again from the oldest unacknowledged
        self._probing = True
        self._kafka_down = False  # seen unreachable (a spill, a failed probe) since the last acknowledgement
        self._last_progress = time.monotonic()
        self._last_commit = time.monotonic()
        self._closed = False
        s = self.stats
        s.recovered = s.spool_pending = self._spool.pending
        s.spool_truncated_bytes, s.spool_corrupt_bytes = self._spool.truncated_bytes, self._spool.corrupt_bytes
        s.spool_max_bytes = spool.max_bytes
        self._mode = SPOOLING if self._spool.pending else DIRECT
        self._update_gauges()
        if s.recovered:
            LOG.warning("spool %s holds %d message(s) from an earlier run: draining them before new events",
                        spool.directory, s.recovered)
        self._pump_stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name="publisher-spool", daemon=True)
        self._pump.start()

    # -- EventSink -----------------------------------------------------------------------------
    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        """Encode and queue one record on its topic; blocks while the local queue is full."""
        topic = self.config.topics[record_name]
        value = codec.encode(record_name, record)
        signer = self.config.signer
        self.publish_raw(topic, value, key=key, headers=signer.headers(topic, key=key, value=value) if signer else None)

    def publish_raw(self, topic: str, value: bytes, *, key: str | None, headers: list | None = None) -> None:
        """Queue already-encoded bytes (replay, dead letters, benchmarks)."""
        if self._spool is not None:
            self._publish_spooled(topic, value, key, headers)
            return
        deadline: float | None = None
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._delivered, headers=headers)
                break
            except BufferError:
                # Back-pressure: the queue holds queue_max_* messages; serve delivery reports until room frees up.
                self.stats.backpressure_waits += 1
                now = time.monotonic()
                deadline = deadline or now + self.config.max_block_s
                if now > deadline:
                    raise BackpressureTimeout(
                        f"local queue full for {self.config.max_block_s:.0f}s: is Kafka at {self.config.bootstrap} up?"
                    ) from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise PublishError(f"could not queue a message on {topic}: {exc}") from exc
        with self._lock:
            self.stats.produced += 1
            self.stats.bytes_produced += len(value)
        self._since_poll += 1
        if self._since_poll >= 256:
            self._since_poll = 0
            self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for delivery reports; return the number of messages still in flight.

        With a spool: waits until Kafka acknowledged everything, or until what is left is in the spool
        and Kafka is unreachable; at the timeout the rest goes to the spool. Returns the messages held
        only in RAM (0 unless the spool could not be written)."""
        if self._spool is None:
            remaining = self._producer.flush(timeout_s)
            self._check_failures()
            return remaining
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                idle = not self._returned and self._direct_in_flight == 0
                if idle and (self._mode == DIRECT or (self._mode == SPOOLING and self._kafka_down)):
                    break  # all acknowledged, or all on disk while Kafka does not answer
            if time.monotonic() >= deadline:
                self._spill("flush timed out")
                break
            time.sleep(0.02)
        self._check_failures()
        return self.stats.in_flight

    # -- the spool -----------------------------------------------------------------------------
    def wait_for_room(self, stop: threading.Event | None = None) -> None:
        """Return at once unless the spool is full; then pause until there is room again (or ``stop`` is
        set), or raise :class:`SpoolFullError` when the spool's policy is ``fail``. The actor calls this
        before each step, so a full spool stops the robot between steps rather than mid-record."""
        if self._spool is None or not self._spool.full:
            return
        with self._room:
            if not self._spool.full:
                return
            if self._spool.config.when_full == "fail":
                raise SpoolFullError(self._full_message())
            LOG.warning("%s: pausing until there is room", self._full_message())
            self.stats.paused = True
            self.stats.spool_full_waits += 1
            try:
                while self._spool.full and not (stop is not None and stop.is_set()) and not self._closed:
                    self._room.wait(0.2)
            finally:
                self.stats.paused = False

    @property
    def spool_directory(self) -> str | None:
        return None if self._spool is None else str(self._spool.directory)

    def _full_message(self) -> str:
        assert self._spool is not None
        return (f"the spool {self._spool.directory} is full ({self._spool.bytes / 2**20:,.1f} of "
                f"{self._spool.config.max_bytes / 2**20:,.1f} MiB, {self._spool.pending:,} messages) while Kafka at "
                f"{self.config.bootstrap} is unreachable (SOP_ACTOR_SPOOL_MAX_BYTES, SOP_ACTOR_SPOOL_WHEN_FULL)")

    def _publish_spooled(self, topic: str, value: bytes, key: str | None, headers: list | None) -> None:
        assert self._spool is not None
        ts = time.time_ns() // 1_000_000
        deadline: float | None = None
        while True:
            with self._lock:
                if self._mode != DIRECT:
                    self._append_new(topic, value, key, headers, ts)
                    return
                self._seq += 1
                self._produce_no += 1
                try:
                    self._producer.produce(topic, value, key, headers=headers, timestamp=ts, on_delivery=functools.partial(
                        self._delivered_direct, self._seq, self._produce_no, ts))
                except BufferError:
                    self._seq -= 1
                    self._produce_no -= 1
                except KafkaException as exc:
                    raise PublishError(f"could not queue a message on {topic}: {exc}") from exc
                else:
                    self._direct_in_flight += 1
                    self.stats.produced += 1
                    self.stats.bytes_produced += len(value)
                    self._since_poll += 1
                    if self._since_poll < 256:
                        return
                    self._since_poll = 0
                    break
            # back-pressure: the pump serves delivery reports (and spills if Kafka stopped answering)
            self.stats.backpressure_waits += 1
            now = time.monotonic()
            deadline = deadline or now + self.config.max_block_s
            if now > deadline:
                raise BackpressureTimeout(f"local queue full for {self.config.max_block_s:.0f}s: "
                                          f"is Kafka at {self.config.bootstrap} up?")
            time.sleep(0.02)
        self._serve_reports()

    def _serve_reports(self) -> None:
        """Serve delivery reports from the publishing thread too (as without a spool): handing them all to
        the pump thread costs a thread switch per batch."""
        if self._poll_lock.acquire(blocking=False):
            try:
                self._producer.poll(0)
            finally:
                self._poll_lock.release()

    def _append_new(self, topic: str, value: bytes, key: str | None, headers: list | None, ts: int) -> None:
        """A new event while the spool is in use: behind the spooled ones (under _lock)."""
        assert self._spool is not None
        while not self._spool.has_room(len(value) + 64, self._headroom):
            if self._spool.config.when_full == "fail":
                raise SpoolFullError(self._full_message())
            self.stats.paused = True
            self._room.wait(0.2)
        self.stats.paused = False
        self._spool.append(topic, value, key=key, headers=headers, timestamp_ms=ts)
        self.stats.produced += 1
        self.stats.bytes_produced += len(value)
        self.stats.spooled += 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        assert self._spool is not None
        self.stats.spool_pending = self._spool.pending
        self.stats.spool_bytes = self._spool.bytes
        self.stats.spool_state = self._mode

    def _on_client_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            with self._lock:
                self._down_since = self._produce_no

    def _delivered_direct(self, seq: int, produce_no: int, ts: int, err: KafkaError | None, msg) -> None:  # noqa: ANN001
        with self._lock:
            self._direct_in_flight -= 1
            if err is None:
                self.stats.delivered += 1
                self._last_progress = time.monotonic()
                self._down_since = None
                self._kafka_down = False
                return
            code = err.code()
            if not spoolable(code, retriable=err.retriable(), fatal=err.fatal()):
                self._record_failure(err, msg)
                return
            self._returned.append(_Failed(seq, msg.topic(), msg.value(), msg.key(), msg.headers(), ts, ambiguous_failure(
                code, produce_no=produce_no, down_since_produce_no=self._down_since)))

    def _delivered_spooled(self, seq: int, produce_no: int, err: KafkaError | None, msg) -> None:  # noqa: ANN001
        assert self._spool is not None
        with self._lock:
            self._spool_in_flight -= 1
            if err is None:
                self._spool.ack(seq)
                self.stats.delivered += 1
                self.stats.drained += 1
                self.stats.spool_pending = self._spool.pending
                self._last_progress = time.monotonic()
                self._down_since = None
                self._kafka_down = False
                if self._mode == SPOOLING:
                    LOG.warning("Kafka at %s answers again: draining %d spooled message(s)", self.config.bootstrap,
                                self._spool.pending)
                    self._mode = DRAINING
                self._probing = False
                return
            code = err.code()
            if not spoolable(code, retriable=err.retriable(), fatal=err.fatal()):
                self._spool.ack(seq)  # resolved: reported failed, never retried
                self.stats.spool_pending = self._spool.pending
                self._record_failure(err, msg)
                return
            if ambiguous_failure(code, produce_no=produce_no, down_since_produce_no=self._down_since):
                self.stats.ambiguous += 1
            self._rewind = True
            self._probing = True
            self._kafka_down = True
            self._mode = SPOOLING

    def _note_failure(self, err: KafkaError, msg) -> Failure:  # noqa: ANN001
        """Count and keep a message reported failed for good (the caller holds the lock)."""
        self.stats.failed += 1
        key = msg.key()
        failure = Failure(topic=msg.topic(), key=key.decode() if key else None, error=str(err),
                          retriable=err.retriable())
        self.failures.append(failure)
        return failure

    def _record_failure(self, err: KafkaError, msg) -> None:  # noqa: ANN001
        failure = self._note_failure(err, msg)
        if self._on_failure is not None:
            self._on_failure(failure)

    def _spill(self, reason: str) -> None:
        """Purge librdkafka's queue and write what it gives back, and what it gave back before, to the spool
        in produce order; from now on new events go to the spool."""
        assert self._spool is not None
        with self._poll_lock, self._lock:
            if self._mode == DIRECT:
                self.stats.spills += 1
                LOG.warning("Kafka at %s: %s; spooling to %s", self.config.bootstrap, reason, self._spool.directory)
            self._mode = SPOOLING
            self._probing = True
            self._kafka_down = True
            if self._direct_in_flight or self._spool_in_flight:
                self._producer.purge(in_queue=True, in_flight=True, blocking=True)
                deadline = time.monotonic() + 10.0
                while (self._direct_in_flight or self._spool_in_flight) and time.monotonic() < deadline:
                    self._producer.poll(0.01)
            self._spool_returned()
            self._update_gauges()

    def _spool_returned(self) -> None:
        assert self._spool is not None
        returned, self._returned = sorted(self._returned, key=lambda f: f.seq), []
        for f in returned:  # bound or not: these were accepted already
            self._spool.append(f.topic, f.value, key=f.key, headers=f.headers, timestamp_ms=f.timestamp_ms)
            self.stats.spooled += 1
            self.stats.ambiguous += f.ambiguous

    def _pump_loop(self) -> None:
        while not self._pump_stop.is_set():
            try:
                self._pump_once()
            except Exception:  # the pump must not die silently: the actor would stall without a word
                LOG.exception("the publisher's spool pump failed; retrying")
                time.sleep(0.5)

    def _pump_once(self) -> None:
        assert self._spool is not None
        with self._poll_lock:
            self._producer.poll(0.05)
        now = time.monotonic()
        spill = None
        with self._lock:
            if self._mode == DIRECT:
                if self._returned:
                    spill = "deliveries failed"
                elif self._direct_in_flight == 0:
                    self._last_progress = now
                elif now - self._last_progress > self._spill_after_s:
                    spill = f"no acknowledgement for {now - self._last_progress:.0f}s"
        if spill is not None:
            self._spill(spill)
        with self._lock:
            if self._mode != DIRECT:
                if self._returned:  # stragglers given back after a spill
                    self._spool_returned()
                self._drain()
            self._spool.maybe_sync()
            if now - self._last_commit >= 0.5 or (self._mode != DIRECT and self._spool.pending == 0):
                self._last_commit = now
                self._spool.commit()
                self._room.notify_all()
            if self._mode != DIRECT and self._spool.pending == 0 and self._spool_in_flight == 0 and not self._returned:
                LOG.warning("spool drained: publishing directly to Kafka again")
                self._mode = DIRECT
                self._last_progress = now
            self._update_gauges()

    def _drain(self) -> None:
        """Produce spooled messages, oldest first: one while probing, up to the window once Kafka answers."""
        assert self._spool is not None
        if self._rewind:
            if self._spool_in_flight:
                return  # wait for every outstanding one, so that a rewind never doubles one in flight
            self._spool.rewind()
            self._rewind = False
        window = 1 if self._probing else self._drain_window
        while self._spool_in_flight < window and self._spool.unread:
            for rec in self._spool.read(max_records=window - self._spool_in_flight, max_bytes=self._drain_bytes):
                self._produce_no += 1
                try:
                    self._producer.produce(rec.topic, rec.value, rec.key, headers=rec.headers,
                                           timestamp=rec.timestamp_ms,
                                           on_delivery=functools.partial(self._delivered_spooled, rec.seq,
                                                                         self._produce_no))
                except (BufferError, KafkaException) as exc:
                    LOG.warning("could not queue spooled message %d (%s): retrying", rec.seq, exc)
                    self._rewind = True
                    return
                self._spool_in_flight += 1

    # -- lifecycle -----------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (call from idle loops)."""
        if self._spool is None:
            self._producer.poll(timeout_s)
        elif timeout_s > 0:
            time.sleep(timeout_s)  # the pump thread serves them

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush and report: returns the number of messages that are neither delivered nor failed
        (with a spool: nor in the spool, where the next publisher on the same directory finds them)."""
        if self._spool is None:
            return self.flush(timeout_s)
        if self._closed:
            return self.stats.in_flight
        try:
            self.flush(timeout_s)
        finally:
            self._pump_stop.set()
            self._pump.join(10)
            if self._direct_in_flight or self._spool_in_flight:
                self._spill("closing")
            with self._lock:
                self._closed = True
                self._room.notify_all()
                self._update_gauges()
                self._spool.close()
            if self.stats.spool_pending:
                LOG.warning("%d message(s) stay in the spool %s: the next publisher on it drains them",
                            self.stats.spool_pending, self._spool.directory)
        return self.stats.in_flight

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _delivered(self, err: KafkaError | None, msg) -> None:  # noqa: ANN001 - confluent Message
        with self._lock:
            if err is None:
                self.stats.delivered += 1
                return
            failure = self._note_failure(err, msg)
        if self._on_failure is not None:
            self._on_failure(failure)

    def _check_failures(self) -> None:
        if self._raise_on_failure and self.failures:
            first = self.failures[0]
            raise DeliveryFailedError(
                f"{len(self.failures)} message(s) could not be delivered (first: {first.topic} key={first.key}: {first.error})"
            )
