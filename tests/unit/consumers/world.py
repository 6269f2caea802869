"""A small model of the world around :class:`consumers.machine.EpisodeMachine`, for property-based tests.

It plays the parts the faust shell and the servers play, with the semantics the machine relies on:
- topics: per (kind, partition) an append-only list of messages; a consumer reads each in order from its
  committed offset; a commit moves the committed offset to the end of the acknowledged prefix;
- the changelog-backed stores: a log of writes, durable up to the last commit (faust flushes its producer
  before it commits) — and possibly further: a crash keeps a random prefix at least that long;
- Delta: per table, rows by Kafka origin, with the watermark filter of ``lakehouse.ExactlyOnceWriter``
  (rows at or below a committed watermark, or already there, are dropped), committed atomically per table;
- the dead-letter topic: letters are delivered later (or lost in a crash), and only then is the input acked;
- crashes (memory, unflushed store writes and undelivered letters lost) and rebalances (memory lost, stores
  kept, acknowledgements decided before it ignored).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from consumers.assembly import RewardConfig, RunningBaseline
from consumers.machine import Batch, DeadLetter, EpisodeMachine, Inbound, Kind, MachineConfig, build_rows
from schemas import codec

TOPICS = {Kind.STEP: "steps", Kind.EPISODE: "episodes", Kind.INTERVENTION: "interventions"}
T0 = 1_800_000_000.0


def step_record(eid: str, index: int, *, variant: int = 0) -> dict:
    return {"episode_id": eid, "actor_id": "a1", "task": "reach-v3", "instruction": "reach", "step_index": index,
            "event_time_us": int(T0 * 1e6) + index, "policy_version": "1", "images": [],
            "proprio": [float(index), float(variant)], "action": [0.5], "policy_action": None,
            "controller": "HUMAN" if index % 3 == 1 else "POLICY", "env_reward": None, "success": False}


def end_record(eid: str, n: int, outcome: str = "SUCCESS") -> dict:
    return {"episode_id": eid, "kind": "ENDED", "actor_id": "a1", "task": "reach-v3", "instruction": "reach",
            "policy_version": "1", "event_time_us": int(T0 * 1e6) + 1000, "seed": None, "outcome": outcome,
            "num_steps": n}


def start_record(eid: str) -> dict:
    return {**end_record(eid, 0), "kind": "STARTED", "outcome": None, "num_steps": None}


def intervention_record(eid: str, kind: str, index: int) -> dict:
    return {"episode_id": eid, "kind": kind, "actor_id": "a1", "task": "reach-v3", "step_index": index,
            "event_time_us": int(T0 * 1e6) + index, "operator_id": "op", "reason": "test"}


@dataclass
class Message:
    kind: Kind
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: Any = None


class LoggedStore(dict):
    """A dict whose writes are logged, so a crash can roll it back to a durable prefix."""

    def __init__(self, log: list, name: str) -> None:
        super().__init__()
        self._log, self._name = log, name

    def __setitem__(self, key: Any, value: Any) -> None:
        import copy

        super().__setitem__(key, copy.deepcopy(value))
        self._log.append((self._name, key, copy.deepcopy(value)))

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._log.append((self._name, key, None))

    def pop(self, key: Any, default: Any = None) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        return default

    def get(self, key: Any, default: Any = None) -> Any:
        import copy

        value = super().get(key, default)
        return copy.deepcopy(value)  # like faust's table: callers must write back to change it


@dataclass
class Table:
    rows: dict[tuple[int, int], dict] = field(default_factory=dict)  # (partition, offset) -> row
    watermarks: dict[int, int] = field(default_factory=dict)

    def write(self, rows: list[dict], offsets: dict[int, int]) -> None:
        for row in rows:
            origin = (row["kafka_partition"], row["kafka_offset"])
            wm = self.watermarks.get(origin[0])
            if (wm is not None and origin[1] <= wm) or origin in self.rows:
                continue
            self.rows[origin] = row
        for p, w in offsets.items():
            self.watermarks[p] = max(w, self.watermarks.get(p, -1))


@dataclass
class World:
    partitions: int = 2
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    config: MachineConfig = field(default_factory=lambda: MachineConfig(
        topics=dict(TOPICS), control_topic="control", chunk_steps=2, chunk_age_s=1.0, end_grace_s=5.0,
        abort_timeout_s=20.0, tombstone_ttl_s=1e9, tick_gap_s=1e9))
    now: float = T0
    topics: dict[tuple[Kind, int], list[Message]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[tuple[Kind, int], int] = field(default_factory=lambda: defaultdict(int))
    position: dict[tuple[Kind, int], int] = field(default_factory=lambda: defaultdict(int))
    acked: dict[tuple[Kind, int], set[int]] = field(default_factory=lambda: defaultdict(set))
    # copies delivered in this generation and not acknowledged (the shell's count per offset)
    held: dict[tuple[Kind, int], Counter] = field(default_factory=lambda: defaultdict(Counter))
    control_offset: int = 0
    generation: int = 0
    letters_in_flight: list[tuple[DeadLetter, int]] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=lambda: defaultdict(Table))
    store_log: list = field(default_factory=list)
    durable: int = 0  # store writes surely kept by a crash
    written_batch: Batch | None = None  # a batch in Delta whose committed() has not run yet
    written_rows: Any = None
    crashes: int = 0
    rebalances: int = 0

    def __post_init__(self) -> None:
        self.baseline = RunningBaseline()
        self._new_machine(fresh=True)

    # -- the producer side -------------------------------------------------------------------------
    def publish(self, kind: Kind, record: dict | bytes, *, eid: str, headers: Any = None) -> None:
        p = sum(eid.encode()) % self.partitions
        value = record if isinstance(record, bytes) else codec.encode(str(kind), record)
        if callable(headers):  # headers of the encoded value (a signature)
            headers = headers(self.config.topics[kind], eid.encode(), value)
        log = self.topics[(kind, p)]
        log.append(Message(kind=kind, partition=p, offset=len(log), key=eid.encode(), value=value, headers=headers))

    # -- the consumer side -------------------------------------------------------------------------
    def _new_machine(self, *, fresh: bool = False) -> None:
        if fresh:
            self.meta = LoggedStore(self.store_log, "meta")
            self.chunks = LoggedStore(self.store_log, "chunks")
        self.machine = EpisodeMachine(self.config, meta=self.meta, chunks=self.chunks, committed=_Committed(self))
        self.machine.assign(range(self.partitions))

    def deliverable(self) -> list[tuple[Kind, int]]:
        return [tp for tp, log in self.topics.items() if self.position[tp] < len(log)]

    def redeliverable(self) -> list[tuple[Kind, int]]:
        return [tp for tp in self.topics if self.position[tp] > self.committed[tp]]

    def deliver(self, tp: tuple[Kind, int], *, again: int | None = None) -> None:
        """The next message of ``tp``; or, with ``again``, a second copy of one delivered since the last commit
        (after a rebalance faust can hand over a message fetched before it as well as the same one read again)."""
        if again is None:
            msg = self.topics[tp][self.position[tp]]
            self.position[tp] += 1
        else:
            msg = self.topics[tp][again]
        self.held[tp][msg.offset] += 1
        inbound = Inbound(kind=msg.kind, partition=msg.partition, offset=msg.offset, value=msg.value, key=msg.key,
                          handle=(tp, msg.offset, self.generation), headers=msg.headers)
        {Kind.STEP: self.machine.on_step, Kind.EPISODE: self.machine.on_episode_event,
         Kind.INTERVENTION: self.machine.on_intervention}[msg.kind](inbound, now_s=self.now)
        self._carry_out()

    def _ack(self, handle: Any) -> None:
        if handle is None:
            return
        tp, offset, gen = handle
        if gen == self.generation:
            self.acked[tp].add(offset)
            self.held[tp][offset] -= 1

    def _carry_out(self) -> None:
        out = self.machine.drain()
        for h in out.acks:
            self._ack(h)
        for letter in out.letters:
            self.letters_in_flight.append((letter, self.generation))

    def deliver_letters(self) -> None:
        for letter, _gen in self.letters_in_flight:
            self.deadletters.append(letter)
            self._ack(letter.handle)
        self.letters_in_flight = []

    def tick(self, advance_s: float) -> None:
        self.now += advance_s
        for p in range(self.partitions):
            self.control_offset += 1
            hws = None
            if self.machine.wants_highwaters(p, now_s=self.now):
                hws = {k: len(self.topics[(k, p)]) for k in (Kind.STEP, Kind.EPISODE)}
            starts = {k: self.committed[(k, p)] for k in (Kind.STEP, Kind.EPISODE)}
            self.machine.tick(p, now_s=self.now, control_offset=self.control_offset, highwaters=hws,
                              positions=starts)
            self._carry_out()

    def commit(self) -> None:
        """faust's commit: flush the producer (store writes durable), then commit each acknowledged prefix."""
        self.durable = len(self.store_log)
        for tp in list(self.topics):
            c = self.committed[tp]
            while c in self.acked[tp] and self.held[tp][c] <= 0:
                c += 1
            self.committed[tp] = c

    def flush_write(self) -> None:
        """The first half of a flush: rows computed and committed to Delta."""
        if self.written_batch is not None:
            return
        batch = self.machine.take_batch()
        if batch.needs_durable_state:
            self.durable = len(self.store_log)
        rows = build_rows(batch, topics={str(k): v for k, v in TOPICS.items()}, reward=RewardConfig(),
                          baseline=self.baseline)
        steps_wm, ends_wm, inter_wm = batch.watermarks(rows.poisoned)
        self.tables["steps"].write(rows.steps, steps_wm)
        self.tables["episodes"].write(rows.episodes, ends_wm)
        self.tables["aborted"].write(rows.aborted, {})
        self.tables["interventions"].write(rows.interventions, inter_wm)
        self.written_batch, self.written_rows = batch, rows

    def flush_done(self) -> None:
        """The second half: the machine learns the batch is in Delta."""
        if self.written_batch is None:
            return
        self.machine.committed(self.written_batch, poisoned=self.written_rows.poisoned)
        self.written_batch = self.written_rows = None
        self._carry_out()

    def crash(self) -> None:
        """SIGKILL: memory, undelivered letters and unflushed store writes are lost; a new worker starts."""
        self.crashes += 1
        keep = self.rng.randint(self.durable, len(self.store_log))
        del self.store_log[keep:]
        self.meta = LoggedStore(self.store_log, "meta")
        self.chunks = LoggedStore(self.store_log, "chunks")
        for name, key, value in self.store_log:
            store = self.meta if name == "meta" else self.chunks
            if value is None:
                dict.pop(store, key, None)
            else:
                dict.__setitem__(store, key, value)
        self.durable = len(self.store_log)
        self.letters_in_flight = []
        self.written_batch = self.written_rows = None
        self._restart_consumers()
        self._new_machine()

    def rebalance(self) -> None:
        """Partitions revoked and assigned again: memory dropped, stores kept, stale acks ignored."""
        self.rebalances += 1
        self.commit()
        self.machine.revoke(range(self.partitions))
        self._restart_consumers()
        self.machine.assign(range(self.partitions))
        # a flush in flight finishes after the rebalance: its committed() comes with stale handles
        self.flush_done()

    def _restart_consumers(self) -> None:
        self.generation += 1
        self.held.clear()
        for tp in list(self.topics):
            self.position[tp] = self.committed[tp]
            self.acked[tp] = {o for o in self.acked[tp] if o < self.committed[tp]}

    def settle(self, *, rounds: int = 40) -> None:
        """Run to quiescence: read everything, deliver letters, tick past every timeout, flush."""
        for _ in range(rounds):
            while self.deliverable():
                self.deliver(self.deliverable()[0])
            self.deliver_letters()
            self.tick(30.0)
            self.flush_write()
            self.flush_done()
            self.deliver_letters()
            self.commit()


class _Committed:
    def __init__(self, world: World) -> None:
        self.world = world

    def watermark(self, kind: Kind, partition: int) -> int | None:
        return self.world.tables[_table(kind)].watermarks.get(partition)

    def is_stored(self, topic: str, partition: int, offset: int) -> bool:
        table = self.world.tables["aborted" if topic == "control" else _table(Kind(next(
            k for k, v in TOPICS.items() if v == topic)))]
        wm = table.watermarks.get(partition)
        return (wm is not None and offset <= wm) or (partition, offset) in table.rows


def _table(kind: Kind) -> str:
    return {Kind.STEP: "steps", Kind.EPISODE: "episodes", Kind.INTERVENTION: "interventions"}[kind]
