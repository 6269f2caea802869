"""The processor's decisions as a plain, synchronous state machine: Kafka events in, actions out.

Everything ``sop process`` decides lives here — admit or dead-letter, hold, chunk, complete / force /
abort, what to acknowledge and when, the Delta watermarks, assignment and revocation — so unit tests
(and property-based tests over random interleavings, crashes and rebalances) drive it directly. The faust
app in :mod:`consumers.processor` is a thin shell: it feeds events in, sends the dead letters the machine
asks for, acknowledges what it says, and runs the flushes in a worker thread.

    machine = EpisodeMachine(config, meta=faust_table, chunks=faust_table, committed=watermark_of)
    machine.on_step(Inbound(kind=Kind.STEP, partition=p, offset=o, key=k, value=raw, handle=event), now_s=t)
    out = machine.drain()               # Outbox: handles to ack, dead letters to send (ack after delivery)
    batch = machine.take_batch()        # what the next Delta flush writes ...
    rows = build_rows(batch, ...)       # ... computed off the event loop (value model inference)
    machine.committed(batch, poisoned=rows.poisoned)   # after the Delta commits: acks, dead letters, finish

Every input event ends in exactly one of: a Delta row, a dead letter (with a :class:`~consumers.deadletter.Reason`),
or a counter in :attr:`EpisodeMachine.counts` (``steps_duplicate``: an identical copy of a held step;
``*_replayed``: an event already stored, read again; ``*_beyond_stop``: past a replay's end).

Store writes (``meta``, ``chunks``, both changelog-backed in faust) happen only while an event of the same
partition is being handled, because faust writes the changelog to the partition of the current event; work
that belongs to a partition but is decided elsewhere (finishing episodes after a flush) waits for that
partition's next event or tick.

Why an episode closes when it does:
- *complete*: its end arrived and every step index ``0 … num_steps-1`` is held;
- *forced*: its end arrived, steps are missing, nothing new came for ``end_grace_s`` **and** the steps
  partition is caught up (its high watermark is at or below what this worker has read). Wall-clock silence
  alone is not enough: after a crash the steps of a backlog are read again long after their (small) end
  event, and closing then stored episodes short and dropped the late steps;
- *aborted*: no end after ``abort_timeout_s`` of silence, with both the steps and the episodes partitions
  caught up (the robot died). The decision is persisted in the meta before rows are written, so a crash
  cannot abort the same episode twice under two origins.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from consumers import assembly
from consumers.assembly import CLOSED
from consumers.deadletter import Reason, Rejected, reason_of
from schemas import codec
from schemas.identity import identity_headers

log = logging.getLogger("sop.processor.machine")


class Kind(StrEnum):
    """The input topics, named by the record each carries."""

    STEP = "Step"
    EPISODE = "EpisodeEvent"
    INTERVENTION = "InterventionEvent"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One input event. ``handle`` is opaque to the machine: it comes back in acks (the faust event)."""

    kind: Kind
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    timestamp_ms: int | None = None
    handle: Any = None
    headers: Any = None  # the Kafka headers (pairs or a mapping): the producer's signature when security is on


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event for the dead-letter topic; ``handle`` (if any) is acknowledged once the broker has it."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    reason: Reason
    error: str
    handle: Any = None
    identity: tuple[tuple[str, bytes], ...] = ()  # the producer's signature headers, kept for a replay


@dataclass
class Outbox:
    acks: list[Any] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.letters)


# A validator beyond the codec's own rules: (record name, record, Kafka key, now in µs) -> None, or raise Rejected.
Validator = Callable[[str, dict, "bytes | None", int], None]
# Who produced the event (Kafka security on): (record name, record, topic, the event) -> None, or raise Rejected
# (consumers.validation.check_identity behind the processor's keyring).
Authenticator = Callable[[str, dict, str, Inbound], None]
class Committed(Protocol):
    """What this consumer group already stored in Delta (the writers' committed state)."""

    def watermark(self, kind: Kind, partition: int) -> int | None:
        """Every message of ``kind`` at or below this offset of ``partition`` is handled; None: nothing yet."""

    def is_stored(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the row originating at (topic, partition, offset) is in its table."""


class NothingCommitted:
    def watermark(self, kind: Kind, partition: int) -> int | None:
        return None

    def is_stored(self, topic: str, partition: int, offset: int) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    topics: dict[str, str]  # Step / EpisodeEvent / InterventionEvent -> topic name (rows' origin, dead letters)
    control_topic: str
    chunk_steps: int = 256
    chunk_age_s: float = 5.0
    end_grace_s: float = 15.0
    abort_timeout_s: float = 120.0
    tombstone_ttl_s: float = 3600.0
    # an episode some of whose steps were dead-lettered as unknown-schema (a fleet upgraded before its processor)
    # is neither forced nor aborted for this long: `sop replay deadletter` after the upgrade completes it
    unknown_schema_hold_s: float = 7 * 86400.0
    # ticks travel through the broker: two ticks of a partition further apart than this mean the broker path was
    # away (an outage, a stalled processor), and that time is not counted as any episode's silence
    tick_gap_s: float = 10.0
    stop_offsets: dict[str, dict[int, int]] | None = None  # replay: topic -> partition -> first offset not to take


@dataclass(slots=True)
class Episode:
    """An open episode in this worker's memory. ``records``: index -> (offset, record, raw bytes)."""

    eid: str
    partition: int
    meta: dict
    records: dict[int, tuple[int, dict, bytes]] = field(default_factory=dict)
    unchunked: list[tuple[int, int, bytes, Any]] = field(default_factory=list)  # (index, offset, raw, handle)
    chunks: int = 0
    waiting_since_s: float = 0.0
    last_seen_s: float = 0.0
    end_handle: Any = None
    end_raw: bytes | None = None
    end_key: bytes | None = None
    closing: bool = False
    poisoned: bool = False  # dead-lettered, not finished yet: its offsets still hold the watermarks back
    duplicates: int = 0
    identity: dict[int, tuple[tuple[str, bytes], ...]] = field(default_factory=dict)  # index -> signature headers
    end_identity: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Closing:
    """An episode whose rows the next flush computes (off the event loop)."""

    eid: str
    partition: int
    meta: dict  # a copy, as decided
    steps: list[tuple[dict, int]]  # (record, offset) of the stored indices, in index order
    reason: str  # complete | forced | aborted
    first_step_offset: int | None
    end_offset: int | None  # on the episodes topic; None when aborted (the origin is a control tick)
    late: list[tuple[int, int, bytes]]  # (index, offset, raw) held but not stored: dead-lettered after the commit
    duplicates: int = 0


@dataclass
class Batch:
    """What one flush writes, and what the watermarks may say (a snapshot taken with it)."""

    closings: list[Closing] = field(default_factory=list)
    interventions: list[dict] = field(default_factory=list)
    intervention_handles: list[Any] = field(default_factory=list)
    # partition -> (next offset read, first offsets of episodes still open and not in this batch)
    step_marks: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    end_marks: dict[int, tuple[int, list[int]]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.closings or self.interventions)

    @property
    def needs_durable_state(self) -> bool:
        """Whether the stores must be flushed (the changelog acknowledged) before this batch goes to Delta: an
        episode in Delta whose meta (its end, a forced or aborted decision) a crash could still lose would be
        opened again, and a later copy of one of its steps stored twice."""
        return bool(self.closings)

    def watermarks(self, poisoned: Iterable[str] = ()) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
        """(steps, episodes, interventions) watermarks per partition: one below the oldest message not
        handled once this batch is in Delta. Poisoned episodes (their rows failed) count as still open."""
        bad = set(poisoned)
        held_steps: dict[int, list[int]] = defaultdict(list)
        held_ends: dict[int, list[int]] = defaultdict(list)
        for c in self.closings:
            if c.eid in bad:
                if c.first_step_offset is not None:
                    held_steps[c.partition].append(c.first_step_offset)
                if c.end_offset is not None:
                    held_ends[c.partition].append(c.end_offset)
        steps = {p: min([nxt, *firsts, *held_steps[p]]) - 1 for p, (nxt, firsts) in self.step_marks.items()}
        ends = {p: min([nxt, *firsts, *held_ends[p]]) - 1 for p, (nxt, firsts) in self.end_marks.items()}
        inter: dict[int, int] = {}
        for row in self.interventions:
            p = row["kafka_partition"]
            inter[p] = max(inter.get(p, -1), row["kafka_offset"])
        return ({p: w for p, w in steps.items() if w >= 0}, {p: w for p, w in ends.items() if w >= 0},
                {p: w for p, w in inter.items() if w >= 0})


def _ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as [start, stop) runs (how a closed episode's stored steps are kept in its meta)."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _in_ranges(index: int, ranges: list[list[int]]) -> bool:
    return any(a <= index < b for a, b in ranges)


class EpisodeMachine:
    """Episode assembly for the partitions this worker owns. Not thread-safe: call from one thread."""

    def __init__(self, config: MachineConfig, *, meta: MutableMapping[bytes, dict],
                 chunks: MutableMapping[bytes, bytes], committed: Committed | None = None,
                 validator: Validator | None = None, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.meta = meta
        self.chunks = chunks
        self.stored = committed or NothingCommitted()
        self.validator = validator
        self.authenticator = authenticator
        self.counts: Counter[str] = Counter()
        self.deadletters: Counter[str] = Counter()  # by reason
        self.outbox = Outbox()
        self.open: dict[str, Episode] = {}
        self.by_partition: dict[int, set[str]] = defaultdict(set)  # open episode ids per partition
        self.tombstones: dict[int, dict[str, float]] = defaultdict(dict)  # closed eid -> closed at
        self.ready: set[int] = set()  # partitions rescanned since their assignment
        self.next_offset: dict[Kind, dict[int, int]] = {k: {} for k in Kind}
        self.last_event_s: dict[Kind, dict[int, float]] = {k: {} for k in Kind}
        self.watermark: dict[Kind, dict[int, int | None]] = {k: {} for k in Kind}
        self.unknown_schema_keys: dict[str, tuple[int, float]] = {}  # episodes not seen yet: (steps, since)
        self.broker_away_since_s: float | None = None
        self.last_tick_s: dict[int, float] = {}
        self.pending_closings: list[Closing] = []
        self.pending_interventions: list[tuple[dict, Any]] = []
        self.finish_queue: dict[int, list[str]] = defaultdict(list)

    # -- the outside world -------------------------------------------------------------------------
    def drain(self) -> Outbox:
        """What the shell must do now: acknowledge ``acks``; send ``letters`` and ack each one's handle once
        the broker confirms it."""
        out, self.outbox = self.outbox, Outbox()
        return out

    def assign(self, partitions: Iterable[int]) -> None:
        """Partitions (re)assigned: their state is rebuilt from the stores at their first event."""
        for p in partitions:
            self._forget(p)

    def revoke(self, partitions: Iterable[int]) -> None:
        """Partitions taken away: drop everything held for them, acknowledging nothing (the next owner reads
        the unacknowledged events again from the committed offsets)."""
        for p in partitions:
            self._forget(p)

    def _forget(self, p: int) -> None:
        for eid in self.by_partition.pop(p, set()):
            self.open.pop(eid, None)
        self.tombstones.pop(p, None)
        self.last_tick_s.pop(p, None)
        self.ready.discard(p)
        for per_kind in (self.next_offset, self.last_event_s, self.watermark):
            for d in per_kind.values():
                d.pop(p, None)
        self.pending_closings = [c for c in self.pending_closings if c.partition != p]
        self.pending_interventions = [(r, h) for r, h in self.pending_interventions if r["kafka_partition"] != p]
        self.finish_queue.pop(p, None)

    @property
    def open_count(self) -> int:
        return len(self.open)

    # -- admission ---------------------------------------------------------------------------------
    def _enter(self, msg: Inbound, now_s: float) -> None:
        p = msg.partition
        if p not in self.ready:
            self._rescan(p, now_s)
        self._finish(p, now_s)
        nxt = self.next_offset[msg.kind]
        if msg.offset + 1 > nxt.get(p, 0):
            nxt[p] = msg.offset + 1
        self.last_event_s[msg.kind][p] = now_s

    def _beyond_stop(self, msg: Inbound) -> bool:
        stops = self.config.stop_offsets
        if not stops:
            return False
        stop = stops.get(self.config.topics[msg.kind], {}).get(msg.partition)
        return stop is not None and msg.offset >= stop

    def _decode(self, msg: Inbound, now_s: float) -> dict | None:
        """The record, or None after dead-lettering / counting the event (the caller then returns)."""
        if self._beyond_stop(msg):
            self.counts[f"{msg.kind}_beyond_stop"] += 1
            self.outbox.acks.append(msg.handle)
            return None
        try:
            name, record = codec.decode(msg.value)
            if name != msg.kind:
                raise Rejected(Reason.WRONG_TOPIC, f"a {name} record on the {msg.kind} topic")
            if self.validator is not None:
                self.validator(name, record, msg.key, int(now_s * 1e6))
            if self.authenticator is not None:
                self.authenticator(name, record, self.config.topics[msg.kind], msg)
        except (codec.DecodeError, Rejected) as exc:
            self._dead_letter(msg, reason_of(exc), str(exc))
            if isinstance(exc, codec.UnknownSchemaError) and msg.kind == Kind.STEP and msg.key:
                self._hold_for_unknown_schema(msg.key.decode(errors="replace"), msg, now_s)
            return None
        return record

    def _hold_for_unknown_schema(self, eid: str, msg: Inbound, now_s: float) -> None:
        ep = self.open.get(eid)
        if ep is None:
            if self.meta.get(eid.encode()) is None:  # not seen yet: remembered (in memory, bounded) for when it is
                count, since = self.unknown_schema_keys.pop(eid, (0, now_s))
                self.unknown_schema_keys[eid] = (count + 1, since)
                while len(self.unknown_schema_keys) > 10_000:
                    del self.unknown_schema_keys[next(iter(self.unknown_schema_keys))]
            return  # an episode already stored: the replayed step will be a late step
        ep.meta["unknown_schema"] = ep.meta.get("unknown_schema", 0) + 1
        ep.meta.setdefault("unknown_schema_since_s", now_s)
        self._save(ep)

    # -- the broker's reachability (told by the shell) ----------------------------------------------
    def broker_unreachable(self, *, now_s: float) -> None:
        """The shell could not reach the broker: robots cannot publish either, so silence means nothing now."""
        if self.broker_away_since_s is None:
            self.broker_away_since_s = now_s

    def broker_reachable(self, *, now_s: float) -> None:
        """The broker answers again: every open episode's silence starts over, giving robots' spools (which
        drain once the broker is back) a whole grace / abort timeout before anything is forced or aborted."""
        if self.broker_away_since_s is None:
            return
        log.info("broker reachable again after %.0fs: silence clocks of %d open episodes restart",
                 now_s - self.broker_away_since_s, len(self.open))
        self.broker_away_since_s = None
        for ep in self.open.values():
            ep.last_seen_s = max(ep.last_seen_s, now_s)

    def _dead_letter(self, msg: Inbound, reason: Reason, error: str) -> None:
        self._letter(msg.kind, msg.partition, msg.offset, msg.value, msg.key, reason, error, msg.handle,
                     timestamp_ms=msg.timestamp_ms, identity=identity_headers(msg.headers))

    def _letter(self, kind: Kind, p: int, offset: int, raw: bytes, key: bytes | None, reason: Reason,
                error: str, handle: Any, *, timestamp_ms: int | None = None,
                identity: tuple[tuple[str, bytes], ...] = ()) -> None:
        self.deadletters[reason] += 1
        self.outbox.letters.append(DeadLetter(value=raw, key=key, topic=self.config.topics[kind], partition=p,
                                              offset=offset, timestamp_ms=timestamp_ms, reason=reason, error=error,
                                              handle=handle, identity=identity))

    def failed(self, msg: Inbound, error: BaseException) -> None:
        """An unexpected error while handling ``msg`` (the shell caught it): dead-letter that event only."""
        self._dead_letter(msg, Reason.PROCESSING_ERROR, f"{type(error).__name__}: {error}")

    # -- episodes in memory ------------------------------------------------------------------------
    def _rescan(self, p: int, now_s: float) -> None:
        """After an assignment: the open episodes of ``p`` from the recovered meta table, their steps from the
        recovered chunks; the committed watermarks from Delta."""
        self.ready.add(p)
        for kind in Kind:
            self.watermark[kind][p] = self.stored.watermark(kind, p)
        for _key, m in list(self.meta.items()):
            if m.get("partition") != p:
                continue
            eid = m["episode_id"]
            if m["status"] == CLOSED:
                self.tombstones[p][eid] = m.get("closed_at_s") or now_s
                continue
            ep = self._track(eid, p, copy.deepcopy(m), now_s)
            end = m.get("ended")
            if end is not None and self.stored.is_stored(end["topic"], end["partition"], end["offset"]):
                # written before a crash or rebalance, not yet marked closed: finish it, hold nothing for it
                decided = m.get("closing")
                ep.meta["stored"] = decided["stored"] if decided else [[0, end["num_steps"]]] if end["num_steps"] else []
                ep.meta["closed_how"] = decided["reason"] if decided else "complete"
                ep.closing = True
                self.finish_queue[p].append(eid)
                continue
            self._load_chunks(ep)
        self._finish(p, now_s)

    def _track(self, eid: str, p: int, m: dict, now_s: float) -> Episode:
        ep = Episode(eid=eid, partition=p, meta=m, last_seen_s=now_s)
        self.open[eid] = ep
        self.by_partition[p].add(eid)
        return ep

    def _load_chunks(self, ep: Episode) -> None:
        """Chunks of ``ep`` in the store that memory does not hold (after a restart or a rebalance)."""
        n = ep.chunks
        while (blob := self.chunks.get(assembly.chunk_key(ep.eid, n))) is not None:  # numbered densely
            for index, offset, raw in assembly.unpack_steps(blob):
                if index not in ep.records:
                    _, record = codec.decode(raw, validate_record=False)
                    ep.records[index] = (offset, record, raw)
            n += 1
        ep.chunks = n

    def _episode_for(self, eid: str, msg: Inbound, now_s: float) -> Episode | dict | None:
        """The open episode of ``eid``; or its CLOSED meta; or None when the event is a replay of stored data
        (no meta, offset at or below the committed watermark: counted and acknowledged)."""
        ep = self.open.get(eid)
        if ep is not None:
            return ep
        m = self.meta.get(eid.encode())
        if m is not None and m["status"] == CLOSED:
            return m
        if m is None:
            wm = self.watermark[msg.kind].get(msg.partition)
            if wm is not None and msg.offset <= wm:
                self.counts[f"{msg.kind}_replayed"] += 1
                self.outbox.acks.append(msg.handle)
                return None
            m = assembly.new_meta(eid, msg.partition, now_s)
            held = self.unknown_schema_keys.pop(eid, None)
            if held is not None:
                m["unknown_schema"], m["unknown_schema_since_s"] = held
            self.meta[eid.encode()] = m
        ep = self._track(eid, msg.partition, m, now_s)
        self._load_chunks(ep)
        return ep

    def _save(self, ep: Episode) -> None:
        self.meta[ep.eid.encode()] = ep.meta

    # -- steps -------------------------------------------------------------------------------------
    def _admit(self, msg: Inbound, now_s: float) -> tuple[dict, Episode | dict] | None:
        """The shared start of every event: bookkeeping, decode and validate (or dead-letter), find the episode
        (or count a replay). None: the event is dealt with already."""
        self._enter(msg, now_s)
        record = self._decode(msg, now_s)
        if record is None:
            return None
        found = self._episode_for(record["episode_id"], msg, now_s)
        return None if found is None else (record, found)

    def on_step(self, msg: Inbound, *, now_s: float) -> None:
        admitted = self._admit(msg, now_s)
        if admitted is None:
            return
        step, found = admitted
        index = step["step_index"]
        if isinstance(found, dict):  # the episode is already written
            self._after_close(msg, found, index)
            return
        ep = found
        ep.last_seen_s = now_s
        held = ep.records.get(index)
        if held is not None:
            if held[2] == msg.value:
                ep.duplicates += held[0] != msg.offset
                self.counts["steps_duplicate" if held[0] != msg.offset else "steps_reread"] += 1
                self.outbox.acks.append(msg.handle)  # the held copy is safe or will be read again itself
            else:
                self._dead_letter(msg, Reason.DUPLICATE_CONFLICT,
                                  f"step {index} of {ep.eid} arrived again with other content (first at offset {held[0]})")
            return
        end = ep.meta["ended"]
        if ep.closing or (end is not None and index >= end["num_steps"]):
            what = "after its episode closed" if ep.closing else f"beyond the announced end ({end['num_steps']} steps)"
            self.counts["steps_late"] += 1
            self._dead_letter(msg, Reason.LATE_STEP, f"step {index} of {ep.eid} arrived {what}")
            return
        self.counts["steps_in"] += 1
        if ep.meta.get("unknown_schema"):  # one of the dead-lettered steps, re-published, most likely
            ep.meta["unknown_schema"] -= 1
            self._save(ep)
        ep.records[index] = (msg.offset, step, msg.value)
        if msg.headers:
            ep.identity[index] = identity_headers(msg.headers)
        if not ep.unchunked:
            ep.waiting_since_s = now_s
        ep.unchunked.append((index, msg.offset, msg.value, msg.handle))
        if len(ep.unchunked) >= self.config.chunk_steps:
            self._write_chunk(ep)
        if assembly.on_step(ep.meta, step, offset=msg.offset):
            self._save(ep)
        if end is not None and self._complete(ep):
            self._close(ep, reason="complete")

    def _after_close(self, msg: Inbound, m: dict, index: int) -> None:
        stored = m.get("stored") or []
        if _in_ranges(index, stored):
            self.counts["steps_replayed"] += 1
            self.outbox.acks.append(msg.handle)
        elif m.get("closed_how") == "poisoned":
            self._dead_letter(msg, Reason.POISON_EPISODE, f"step {index} of {m['episode_id']}, an episode that "
                                                          f"could not be stored")
        else:
            self.counts["steps_late"] += 1
            self._dead_letter(msg, Reason.LATE_STEP, f"step {index} of {m['episode_id']} arrived after its "
                                                     f"episode was stored ({m.get('closed_how', 'closed')})")

    def _write_chunk(self, ep: Episode) -> None:
        """The episode's steps not in the step store yet, as one changelog entry; then their events are safe
        to acknowledge (faust flushes the changelog before it commits offsets)."""
        if not ep.unchunked:
            return
        self.chunks[assembly.chunk_key(ep.eid, ep.chunks)] = assembly.pack_steps((i, o, r) for i, o, r, _ in ep.unchunked)
        ep.chunks += 1
        self.outbox.acks.extend(h for *_, h in ep.unchunked)
        ep.unchunked = []

    @staticmethod
    def _wanted(ep: Episode) -> Iterable[int] | None:
        """The step indices the episode's rows must hold: a decision already persisted (forced, aborted), else
        ``0 … num_steps-1`` once the end is known; None before that."""
        decided = ep.meta.get("closing")
        if decided is not None:
            return [i for a, b in decided["stored"] for i in range(a, b)]
        end = ep.meta["ended"]
        return None if end is None else range(end["num_steps"])

    def _complete(self, ep: Episode) -> bool:
        wanted = self._wanted(ep)
        return wanted is not None and all(i in ep.records for i in wanted)

    # -- episode events ----------------------------------------------------------------------------
    def on_episode_event(self, msg: Inbound, *, now_s: float) -> None:
        admitted = self._admit(msg, now_s)
        if admitted is None:
            return
        ev, found = admitted
        if isinstance(found, dict):
            self._event_after_close(msg, found, ev)
            return
        ep = found
        ep.last_seen_s = now_s
        if ev["kind"] == "STARTED":
            if ep.meta["started"] is None:
                assembly.on_episode_event(ep.meta, ev, topic=self.config.topics[Kind.EPISODE], partition=msg.partition,
                                          offset=msg.offset)
                self._save(ep)
            else:
                self.counts["episode_events_duplicate"] += 1
            self.outbox.acks.append(msg.handle)  # its state is in the meta (changelog)
            return
        end = ep.meta["ended"]
        if end is not None:
            if end.get("offset") == msg.offset and end.get("topic") == self.config.topics[Kind.EPISODE]:
                if ep.end_handle is not None or ep.closing:
                    # a second copy in this generation: the first still holds the offset (or the episode is
                    # in Delta already), so this one is acknowledged at once
                    self.counts["episode_events_reread"] += 1
                    self.outbox.acks.append(msg.handle)
                    return
                # the same end, read again
                ep.end_handle, ep.end_raw, ep.end_key = msg.handle, msg.value, msg.key
                ep.end_identity = identity_headers(msg.headers)
            elif (end["outcome"], end["num_steps"]) == (ev["outcome"], ev["num_steps"]):
                self.counts["episode_events_duplicate"] += 1
                self.outbox.acks.append(msg.handle)
                return
            else:
                self._dead_letter(msg, Reason.DUPLICATE_CONFLICT,
                                  f"a second end of {ep.eid} ({ev['outcome']}, {ev['num_steps']} steps) differs from "
                                  f"the first ({end['outcome']}, {end['num_steps']} steps)")
                return
        else:
            assembly.on_episode_event(ep.meta, ev, topic=self.config.topics[Kind.EPISODE], partition=msg.partition,
                                      offset=msg.offset)
            ep.end_handle, ep.end_raw, ep.end_key = msg.handle, msg.value, msg.key
            ep.end_identity = identity_headers(msg.headers)
            self._save(ep)
        if not ep.closing and self._complete(ep):
            self._close(ep, reason="complete")

    def _event_after_close(self, msg: Inbound, m: dict, ev: dict) -> None:
        end = m.get("ended") or {}
        if m.get("closed_how") == "poisoned" and ev["kind"] == "ENDED":
            self._dead_letter(msg, Reason.POISON_EPISODE, f"the end of {m['episode_id']}, an episode that could "
                                                          f"not be stored")
        elif ev["kind"] == "STARTED" or (end.get("outcome"), end.get("num_steps")) == (ev["outcome"], ev["num_steps"]) \
                or end.get("offset") == msg.offset:
            self.counts["episode_events_replayed"] += 1
            self.outbox.acks.append(msg.handle)
        else:
            self._dead_letter(msg, Reason.DUPLICATE_CONFLICT,
                              f"an end of {m['episode_id']} ({ev['outcome']}, {ev['num_steps']} steps) after it was "
                              f"stored as {end.get('outcome')} with {m.get('assembled', '?')} steps")

    # -- interventions -----------------------------------------------------------------------------
    def on_intervention(self, msg: Inbound, *, now_s: float) -> None:
        admitted = self._admit(msg, now_s)
        if admitted is None:
            return
        ev, found = admitted
        p, offset = msg.partition, msg.offset
        stored = self.watermark[Kind.INTERVENTION].get(p)
        if stored is not None and offset <= stored:
            # interventions are written in offset order: one at or below the watermark is in Delta already
            self.counts["interventions_replayed"] += 1
            self.outbox.acks.append(msg.handle)
            return
        if any(r["kafka_partition"] == p and r["kafka_offset"] == offset for r, _ in self.pending_interventions):
            # the same message delivered twice (fetched before a rebalance and read again after it): the first
            # copy is queued and still holds its offset, so this one is acknowledged at once
            self.counts["interventions_reread"] += 1
            self.outbox.acks.append(msg.handle)
            return
        m = found if isinstance(found, dict) else found.meta
        entry = [ev["kind"], ev["step_index"]]
        earlier = next((e for e in m["interventions"] if e[:2] == entry), None)
        if earlier is not None and (len(earlier) < 3 or earlier[2] != msg.offset):
            self.counts["interventions_duplicate"] += 1
            self.outbox.acks.append(msg.handle)
            return
        if isinstance(found, Episode):
            found.last_seen_s = now_s
            if earlier is None:
                m["interventions"].append([*entry, msg.offset])
                self._save(found)
        else:
            self.counts["interventions_after_close"] += 1  # stored as a row; the episode row does not count it
        self.counts["interventions_in"] += 1
        row = {**ev, "kafka_topic": self.config.topics[Kind.INTERVENTION], "kafka_partition": msg.partition,
               "kafka_offset": msg.offset}
        self.pending_interventions.append((row, msg.handle))

    # -- ticks: time-driven decisions for one partition ---------------------------------------------
    def wants_highwaters(self, p: int, *, now_s: float) -> bool:
        """Whether a tick of ``p`` has an episode to force-close or abort if the partition is caught up: then
        the shell asks the broker for the partition's high watermarks and passes them to :meth:`tick`."""
        cfg = self.config
        for eid in self.by_partition.get(p, ()):
            ep = self.open[eid]
            if ep.closing:
                continue
            silent = now_s - ep.last_seen_s
            if (ep.meta["ended"] is not None and silent >= cfg.end_grace_s) or silent >= cfg.abort_timeout_s:
                return True
        return False

    def caught_up(self, kind: Kind, p: int, highwaters: dict[Kind, int | None] | None,
                  positions: dict[Kind, int | None] | None = None) -> bool:
        """Every message of ``kind``'s partition ``p`` on the broker has been handled here."""
        hw = (highwaters or {}).get(kind)
        if hw is None:
            return False
        read = self.next_offset[kind].get(p)
        start = (positions or {}).get(kind)
        at = max(x for x in (read, start, 0) if x is not None)
        return hw <= at

    def tick(self, p: int, *, now_s: float, control_offset: int,
             highwaters: dict[Kind, int | None] | None = None,
             positions: dict[Kind, int | None] | None = None) -> None:
        """Chunk aged steps, close complete episodes, force-close or abort stalled ones (when caught up),
        forget old tombstones. One episode's failure dead-letters that episode only."""
        if p not in self.ready:
            self._rescan(p, now_s)
        self._finish(p, now_s)
        cfg = self.config
        previous = self.last_tick_s.get(p)
        self.last_tick_s[p] = now_s
        if previous is not None and now_s - previous > cfg.tick_gap_s:
            gap = now_s - previous
            log.info("partition %d: no tick for %.0fs (the broker or this worker was away); that time is not "
                     "silence", p, gap)
            for eid in self.by_partition.get(p, ()):
                ep = self.open[eid]
                ep.last_seen_s = min(now_s, ep.last_seen_s + gap)
            return  # decide nothing on the first tick after a gap: robots' spools are only starting to drain
        steps_caught_up = self.caught_up(Kind.STEP, p, highwaters, positions)
        ends_caught_up = self.caught_up(Kind.EPISODE, p, highwaters, positions)
        aborted = False  # one abort per tick: the tick's offset is the aborted row's origin, unique per row
        for eid in list(self.by_partition.get(p, ())):
            ep = self.open.get(eid)
            if ep is None or ep.closing:
                continue
            try:
                if ep.unchunked and now_s - ep.waiting_since_s >= cfg.chunk_age_s:
                    self._write_chunk(ep)
                silent = now_s - ep.last_seen_s
                if ep.meta.get("unknown_schema") and now_s - ep.meta["unknown_schema_since_s"] < cfg.unknown_schema_hold_s:
                    if ep.meta["ended"] is not None and self._complete(ep):
                        self._close(ep, reason="complete")
                    continue  # waiting for its dead-lettered steps to be re-published by a processor that reads them
                if ep.meta["ended"] is not None:
                    if self._complete(ep):
                        self._close(ep, reason="complete")
                    elif silent >= cfg.end_grace_s and steps_caught_up:
                        self._load_chunks(ep)  # a rebalance may have recovered chunks meanwhile
                        if self._complete(ep):
                            self._close(ep, reason="complete")
                        else:
                            n = ep.meta["ended"]["num_steps"]
                            log.warning("episode %s: %d of %d steps, nothing new for %.0fs and the partition is "
                                        "caught up; storing what arrived", eid,
                                        sum(1 for i in ep.records if i < n), n, silent)
                            self._close(ep, reason="forced")
                elif silent >= cfg.abort_timeout_s and steps_caught_up and ends_caught_up and not aborted:
                    aborted = True
                    self._load_chunks(ep)
                    assembly.abort(ep.meta, assembly.Presence(indices=set(ep.records)), topic=cfg.control_topic,
                                   partition=p, offset=control_offset, now_us=int(now_s * 1e6))
                    log.warning("episode %s: no end after %.0fs of silence; stored as ABORTED", eid, silent)
                    self._close(ep, reason="aborted")
            except Exception as exc:  # noqa: BLE001 - isolate the episode, keep the partition moving
                log.exception("episode %s failed at a tick; dead-lettering it", eid)
                self._poison(ep, exc)
        ttl = cfg.tombstone_ttl_s
        stones = self.tombstones.get(p, {})
        for eid, closed_at in list(stones.items()):
            if now_s - closed_at > ttl:
                del stones[eid]
                self.meta.pop(eid.encode(), None)

    # -- closing -----------------------------------------------------------------------------------
    def _close(self, ep: Episode, *, reason: str) -> None:
        """Queue the episode's rows for the next flush (it stays OPEN in the meta until they are written)."""
        if ep.closing:
            return
        m = ep.meta
        end = m["ended"]
        decided = m.get("closing")
        if decided is not None:  # decided before a restart: the same rows again
            reason = decided["reason"]
            wanted = set(self._wanted(ep) or ())
            keep = [i for i in sorted(ep.records) if i in wanted]
        elif reason == "aborted":
            keep = sorted(ep.records)
        else:
            keep = [i for i in sorted(ep.records) if i < end["num_steps"]]
        kept = set(keep)
        late = [(i, o, r) for i, (o, _, r) in sorted(ep.records.items()) if i not in kept]
        if reason != "complete" and decided is None:
            m["closing"] = {"reason": reason, "stored": _ranges(keep)}
            self._save(ep)
        ep.closing = True
        offsets = [ep.records[i][0] for i in keep]
        first = min([o for o, _, _ in ep.records.values()], default=m.get("first_step_offset"))
        self.pending_closings.append(Closing(
            eid=ep.eid, partition=ep.partition, meta=copy.deepcopy(m),
            steps=[(ep.records[i][1], ep.records[i][0]) for i in keep], reason=reason,
            first_step_offset=first if first is not None else (min(offsets) if offsets else None),
            end_offset=end["offset"] if end.get("topic") == self.config.topics[Kind.EPISODE] else None,
            late=late, duplicates=ep.duplicates))
        self.counts[f"episodes_{reason}"] += 1

    def _poison(self, ep: Episode, error: BaseException) -> None:
        """Dead-letter every event of ``ep`` held here and mark it closed, so nothing else waits on it."""
        self.counts["episodes_poisoned"] += 1
        self._load_chunks(ep)
        unchunked = {i: h for i, _, _, h in ep.unchunked}
        for index, (offset, _, raw) in sorted(ep.records.items()):
            self._letter(Kind.STEP, ep.partition, offset, raw, ep.eid.encode(), Reason.POISON_EPISODE,
                         f"episode {ep.eid} could not be stored: {type(error).__name__}: {error}", unchunked.get(index),
                         identity=ep.identity.get(index, ()))
        end = ep.meta.get("ended") or {}
        if ep.end_raw is not None:
            self._letter(Kind.EPISODE, ep.partition, end.get("offset", -1), ep.end_raw, ep.end_key,
                         Reason.POISON_EPISODE, f"episode {ep.eid} could not be stored: {error}", ep.end_handle,
                         identity=ep.end_identity)
        ep.unchunked = []
        ep.end_handle = None
        ep.closing = ep.poisoned = True
        self.finish_queue[ep.partition].append(ep.eid)
        ep.meta["closed_how"] = "poisoned"
        ep.meta["stored"] = []

    def take_batch(self) -> Batch:
        """Everything queued for Delta, with the watermark snapshot it may commit."""
        batch = Batch(closings=self.pending_closings, interventions=[r for r, _ in self.pending_interventions],
                      intervention_handles=[h for _, h in self.pending_interventions])
        self.pending_closings, self.pending_interventions = [], []
        for p in self.ready:
            nxt = self.next_offset[Kind.STEP].get(p)
            if nxt is not None:
                batch.step_marks[p] = (nxt, [f for eid in self.by_partition.get(p, ())
                                             if (not (ep := self.open[eid]).closing or ep.poisoned)
                                             and (f := self._first_offset(ep)) is not None])
            nxt = self.next_offset[Kind.EPISODE].get(p)
            if nxt is not None:
                batch.end_marks[p] = (nxt, [end["offset"] for eid in self.by_partition.get(p, ())
                                            if (not (ep := self.open[eid]).closing or ep.poisoned)
                                            and (end := ep.meta["ended"]) is not None
                                            and end.get("topic") == self.config.topics[Kind.EPISODE]])
        return batch

    @staticmethod
    def _first_offset(ep: Episode) -> int | None:
        first = ep.meta.get("first_step_offset")
        if ep.records:
            low = min(o for o, _, _ in ep.records.values())
            first = low if first is None else min(first, low)
        return first

    def requeue(self, batch: Batch) -> None:
        """A flush failed: its work goes back in front of what came since (the writers drop what did land)."""
        owned = self.ready
        self.pending_closings = [c for c in batch.closings if c.partition in owned] + self.pending_closings
        self.pending_interventions = [(r, h) for r, h in zip(batch.interventions, batch.intervention_handles,
                                                             strict=True) if r["kafka_partition"] in owned] \
            + self.pending_interventions

    def committed(self, batch: Batch, *, poisoned: dict[str, BaseException] | None = None) -> None:
        """The batch is in Delta: acknowledge its events, dead-letter what it could not store, and queue its
        episodes to be finished (marked closed, chunks deleted) at their partition's next event."""
        poisoned = poisoned or {}
        self.outbox.acks.extend(batch.intervention_handles)
        stored = self.watermark[Kind.INTERVENTION]
        for p, w in batch.watermarks()[2].items():
            if p in self.ready and (stored.get(p) is None or w > stored[p]):
                stored[p] = w
        for c in batch.closings:
            ep = self.open.get(c.eid)
            if ep is None or ep.partition not in self.ready:
                continue  # revoked meanwhile: the new owner closes it again (the writers drop the copy)
            if c.eid in poisoned:
                self._poison(ep, poisoned[c.eid])
                continue
            unchunked = {i: h for i, _, _, h in ep.unchunked}
            kept = {r["step_index"] for r, _ in c.steps}
            self.outbox.acks.extend(h for i, h in unchunked.items() if i in kept)
            for index, offset, raw in c.late:  # acknowledged once their dead letters are delivered
                self.counts["steps_late"] += 1
                self._letter(Kind.STEP, c.partition, offset, raw, c.eid.encode(), Reason.LATE_STEP,
                             f"step {index} of {c.eid} was not stored with its episode ({c.reason}: "
                             f"{c.meta['ended']['num_steps']} steps announced)", unchunked.get(index),
                             identity=ep.identity.get(index, ()))
            ep.unchunked = []
            if ep.end_handle is not None:
                self.outbox.acks.append(ep.end_handle)
                ep.end_handle = None
            ep.meta["stored"] = _ranges(i for r, _ in c.steps for i in (r["step_index"],))
            ep.meta["closed_how"] = c.reason
            ep.meta["assembled"] = len(c.steps)
            self.finish_queue[c.partition].append(c.eid)

    def _finish(self, p: int, now_s: float) -> None:
        """Mark episodes written (or poisoned) as closed and delete their chunks (in partition ``p``'s context)."""
        queue = self.finish_queue.pop(p, None)
        if not queue:
            return
        for eid in queue:
            ep = self.open.pop(eid, None)
            self.by_partition[p].discard(eid)
            if ep is None:
                continue
            n = ep.chunks
            while assembly.chunk_key(eid, n) in self.chunks:  # chunks memory does not know of
                n += 1
            for i in range(n):
                self.chunks.pop(assembly.chunk_key(eid, i), None)
            m = ep.meta
            m["status"] = CLOSED
            m["closed_at_s"] = now_s
            self.meta[eid.encode()] = m
            self.tombstones[p][eid] = now_s


@dataclass
class Rows:
    """A batch's rows for each table, and the episodes whose rows could not be computed."""

    steps: list[dict] = field(default_factory=list)
    episodes: list[dict] = field(default_factory=list)
    aborted: list[dict] = field(default_factory=list)  # episodes rows whose origin is a control tick
    interventions: list[dict] = field(default_factory=list)
    poisoned: dict[str, BaseException] = field(default_factory=dict)
    value_errors: int = 0


def build_rows(batch: Batch, *, topics: dict[str, str], reward: assembly.RewardConfig,
               baseline: assembly.RunningBaseline, value_fn: assembly.ValueFn | None = None,
               value_source: str | None = None) -> Rows:
    """Compute the RECAP columns of every closing episode (runs in the flush thread: value-model inference
    stays off the event loop). A value model that fails falls back to the running baseline for that episode;
    an episode that still fails is returned in ``poisoned`` — the others are unaffected."""
    out = Rows(interventions=list(batch.interventions))
    step_topic = topics[Kind.STEP]
    for c in batch.closings:
        steps = [(record, step_topic, c.partition, offset) for record, offset in c.steps]
        kwargs = {"config": reward, "baseline": baseline, "reason": c.reason, "late_steps": len(c.late),
                  "duplicate_steps": c.duplicates}
        try:
            try:
                closed = assembly.close_episode(c.meta, steps, value_fn=value_fn, value_source=value_source, **kwargs)
            except Exception as exc:
                if value_fn is None:
                    raise
                out.value_errors += 1
                log.warning("value model failed on episode %s (%s); using the running baseline", c.eid, exc)
                closed = assembly.close_episode(c.meta, steps, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one bad episode must not stop the others
            log.exception("episode %s could not be turned into rows; dead-lettering it", c.eid)
            out.poisoned[c.eid] = exc
            continue
        out.steps.extend(closed.steps)
        (out.aborted if c.reason == "aborted" else out.episodes).append(closed.episode)
    return out
