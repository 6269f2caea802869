"""The on-disk spool: order kept, nothing lost across random append / read / ack / rewind / crash-reopen
sequences, torn and corrupt records detected, the bound and the one-process lock enforced."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from producer_fakes import ConstantPolicy, LineRobot

from producers.actor import ListSink, run_episode
from producers.publisher import EventPublisher, PublisherConfig, ambiguous_failure, spoolable
from producers.spool import Spool, SpoolConfig, SpoolError, SpoolFullError, encode_record, scan


def _config(directory: Path, **kw: object) -> SpoolConfig:
    return SpoolConfig(directory=directory, segment_bytes=4096, max_bytes=1 << 24, fsync="never", **kw)  # type: ignore[arg-type]


def _value(seq_hint: int, size: int) -> bytes:
    return (f"v{seq_hint}:".encode() + bytes(range(256)) * (size // 256 + 1))[:max(size, 8)]


class SpoolMachine(RuleBasedStateMachine):
    """A model of what the spool must hold: every appended record not yet acknowledged-and-committed,
    in append order. Acks not committed before a crash come back (at-least-once), nothing else does."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-test-"))
        self.spool = Spool(_config(self.dir))
        self.records: dict[int, tuple[str, bytes, bytes | None, list | None, int]] = {}  # seq -> what was appended
        self.order: list[int] = []
        self.acked: set[int] = set()
        self.committed = 0  # the contiguous acked prefix as the spool computes it
        self.persisted = 0  # what the last commit() wrote
        self.read_from = 1  # the model's read cursor (a seq)
        self.outstanding: list[int] = []  # read, not acked, since the last rewind

    def teardown(self) -> None:
        self.spool.close(clean=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _unacked_from(self, seq: int) -> list[int]:
        return [s for s in self.order if s >= seq and s not in self.acked]

    @rule(n=st.integers(1, 12), size=st.integers(0, 900), with_headers=st.booleans(), with_key=st.booleans())
    def append(self, n: int, size: int, with_headers: bool, with_key: bool) -> None:
        for i in range(n):
            headers = [("sop.h", b"x" * (i % 3)), ("none", None)] if with_headers else None
            key = f"ep-{i % 4}".encode() if with_key else None
            value = _value(len(self.order), size + i)
            ts = 1_700_000_000_000 + len(self.order)
            seq = self.spool.append("sop.steps", value, key=key, headers=headers, timestamp_ms=ts)
            assert seq not in self.records and (not self.order or seq > self.order[-1])
            self.records[seq] = ("sop.steps", value, key, headers, ts)
            self.order.append(seq)

    @rule(k=st.integers(1, 40))
    def read(self, k: int) -> None:
        got = self.spool.read(max_records=k)
        expected = self._unacked_from(self.read_from)[:k]
        assert [r.seq for r in got] == expected
        for r in got:
            assert (r.topic, r.value, r.key, r.headers, r.timestamp_ms) == self.records[r.seq]
        if got:
            self.read_from = got[-1].seq + 1
        self.outstanding += [r.seq for r in got]

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(self.outstanding), unique=True, min_size=1))
        for seq in chosen:  # out of order on purpose: partitions ack independently
            self.spool.ack(seq)
            self.acked.add(seq)
            self.outstanding.remove(seq)
        while self.committed + 1 in self.acked:
            self.committed += 1

    @rule()
    def rewind(self) -> None:
        self.spool.rewind()
        self.read_from = self.committed + 1
        self.outstanding = []

    @rule()
    def commit(self) -> None:
        self.spool.commit()
        self.persisted = self.committed

    @rule(tear=st.integers(0, 30))
    def crash_and_reopen(self, tear: int) -> None:
        """A killed process: no commit, maybe half a record at the end of the last segment."""
        self.spool.close(clean=False)
        if tear:
            segments = sorted(self.dir.glob("*.seg"))
            torn = encode_record(10**9, "sop.steps", b"z" * 50, key=b"k", headers=None, timestamp_ms=1)[:tear]
            target = segments[-1] if segments else self.dir / f"{self.spool.next_seq:020d}.seg"
            with open(target, "ab") as f:
                f.write(torn)
        self.spool = Spool(_config(self.dir))
        assert self.spool.truncated_bytes == tear
        self._forget_uncommitted()

    @rule()
    def close_and_reopen(self) -> None:
        self.spool.close()
        self.persisted = self.committed
        self.spool = Spool(_config(self.dir))
        self._forget_uncommitted()

    def _forget_uncommitted(self) -> None:
        self.acked = {s for s in self.acked if s <= self.persisted}
        self.committed = self.persisted
        self.read_from = self.persisted + 1
        self.outstanding = []

    @invariant()
    def counts_agree(self) -> None:
        assert self.spool.pending == len([s for s in self.order if s not in self.acked])
        assert self.spool.unread >= 0

    @invariant()
    def bytes_on_disk_are_what_it_counts(self) -> None:
        on_disk = sum(p.stat().st_size for p in self.dir.glob("*.seg"))
        assert self.spool.bytes == on_disk

    @rule()
    def drain_everything(self) -> None:
        """Rewind and read to the end: exactly the unacknowledged records, in append order."""
        self.rewind()
        got = []
        while batch := self.spool.read(max_records=7):
            got += batch
        assert [r.seq for r in got] == self._unacked_from(1)
        self.read_from = got[-1].seq + 1 if got else self.read_from
        self.outstanding = [r.seq for r in got]


SpoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_spool_keeps_order_and_loses_nothing = SpoolMachine.TestCase


def test_a_torn_last_record_is_cut_off_and_appends_continue(tmp_path: Path) -> None:
    spool = Spool(_config(tmp_path))
    for i in range(5):
        spool.append("t", f"m{i}".encode(), key=b"k", headers=None, timestamp_ms=i)
    spool.close(clean=False)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    full = seg.read_bytes()
    with open(seg, "r+b") as f:  # the process died in the middle of writing record 4
        f.truncate(len(full) - 3)
    spool = Spool(_config(tmp_path))
    assert spool.truncated_bytes > 0
    assert spool.pending == 4
    assert spool.append("t", b"again", key=None, headers=None, timestamp_ms=9) == 5  # the torn seq is reused
    assert [r.value for r in spool.read(10)] == [b"m0", b"m1", b"m2", b"m3", b"again"]


def test_a_corrupt_record_in_an_old_segment_is_quarantined_and_counted(tmp_path: Path) -> None:
    spool = Spool(_config(tmp_path))
    for i in range(40):  # several 4 KiB segments
        spool.append("t", _value(i, 300), key=None, headers=None, timestamp_ms=i)
    spool.close(clean=False)
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the middle of the first segment
    first.write_bytes(bytes(data))
    spool = Spool(_config(tmp_path))
    assert spool.corrupt_bytes > 0
    assert (tmp_path / (first.name + ".corrupt")).exists()
    got = []
    while batch := spool.read(100):
        got += batch
    seqs = [r.seq for r in got]
    assert seqs == sorted(seqs) and seqs[-1] == 40  # the rest drains in order
    for r in got:
        spool.ack(r.seq)
    spool.commit()
    assert spool.pending == 0  # the lost records do not hold the spool open forever


def test_full_when_the_bound_is_reached_and_room_again_after_commit(tmp_path: Path) -> None:
    spool = Spool(SpoolConfig(directory=tmp_path, segment_bytes=4096, max_bytes=8192, fsync="always"))
    while not spool.full:
        spool.append("t", b"x" * 1000, key=None, headers=None, timestamp_ms=0)
    assert not spool.has_room(1000)
    for r in spool.read(100):
        spool.ack(r.seq)
    spool.commit()
    assert spool.bytes == 0 and spool.pending == 0 and spool.has_room(1000)
    assert list(tmp_path.glob("*.seg")) == []
    assert (tmp_path / "cursor").read_text().strip() == str(spool.next_seq - 1)


def test_one_process_per_spool(tmp_path: Path) -> None:
    spool = Spool(_config(tmp_path))
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(_config(tmp_path))
    spool.close()
    Spool(_config(tmp_path)).close()


def test_a_restarted_process_continues_the_sequence_after_everything_was_drained(tmp_path: Path) -> None:
    spool = Spool(_config(tmp_path))
    for i in range(3):
        spool.append("t", b"m", key=None, headers=None, timestamp_ms=i)
    for r in spool.read(10):
        spool.ack(r.seq)
    spool.close()
    spool = Spool(_config(tmp_path))
    assert spool.pending == 0 and spool.read(10) == []
    assert spool.append("t", b"n", key=None, headers=None, timestamp_ms=0) == 4


def test_scan_stops_at_the_first_bad_record() -> None:
    a = encode_record(1, "t", b"a", key=None, headers=None, timestamp_ms=0)
    b = encode_record(2, "t", b"b", key=b"k", headers=[("h", None)], timestamp_ms=0)
    records, end = scan(a + b + b"\x00" * 5)
    assert [r.seq for r in records] == [1, 2] and end == len(a) + len(b)
    assert records[1].headers == [("h", None)] and records[1].key == b"k"


@pytest.mark.parametrize("bad", [{"fsync": "sometimes"}, {"when_full": "drop-oldest"}, {"max_bytes": 100}])
def test_bad_config_names_the_problem(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SpoolConfig(directory=tmp_path, **bad)


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot use the spool directory"):
        Spool(_config(blocker / "spool"))
    assert os.path.isfile(blocker)


# -- the publisher's decisions around the spool (no broker: Kafka is unreachable on purpose) -------------

def test_which_failures_go_to_the_spool_and_which_are_ambiguous() -> None:
    assert spoolable(KafkaError._MSG_TIMED_OUT, retriable=False, fatal=False)
    assert spoolable(KafkaError._PURGE_QUEUE, retriable=False, fatal=False)
    assert not spoolable(KafkaError.MSG_SIZE_TOO_LARGE, retriable=False, fatal=False)  # a retry cannot fix it
    assert not spoolable(KafkaError._MSG_TIMED_OUT, retriable=True, fatal=True)
    # produced before librdkafka said all brokers are down (or while one was up): it may have been written
    assert ambiguous_failure(KafkaError._MSG_TIMED_OUT, produce_no=5, down_since_produce_no=None)
    assert ambiguous_failure(KafkaError._PURGE_QUEUE, produce_no=5, down_since_produce_no=7)
    # produced while no broker was reachable: never sent
    assert not ambiguous_failure(KafkaError._PURGE_QUEUE, produce_no=8, down_since_produce_no=7)
    assert ambiguous_failure(KafkaError._PURGE_INFLIGHT, produce_no=8, down_since_produce_no=7)
    assert not ambiguous_failure(KafkaError.NOT_ENOUGH_REPLICAS, produce_no=1, down_since_produce_no=None)


def _unreachable_publisher(tmp_path: Path, when_full: str) -> EventPublisher:
    topics = {"Step": "s", "EpisodeEvent": "e", "InterventionEvent": "i"}
    return EventPublisher(PublisherConfig(bootstrap="127.0.0.1:1", topics=topics, delivery_timeout_ms=2_000),
                          spool=SpoolConfig(directory=tmp_path / "spool", segment_bytes=16 * 1024,
                                            max_bytes=64 * 1024, fsync="never", when_full=when_full),
                          spill_after_s=0.2, raise_on_failure=False)


def _fill(pub: EventPublisher, topic: str = "s") -> int:
    n = 0
    while not pub.stats.spool_bytes >= pub.stats.spool_max_bytes:
        pub.publish_raw(topic, b"x" * 2000, key=f"ep-{n % 3}")
        n += 1
        if pub.stats.spool_state == "direct":
            time.sleep(0.01)  # until the publisher notices Kafka does not answer
    return n


def test_a_full_spool_pauses_the_actor_until_stopped_and_nothing_is_dropped(tmp_path: Path) -> None:
    pub = _unreachable_publisher(tmp_path, "pause")
    n = _fill(pub)
    stop = threading.Event()
    waiter = threading.Thread(target=pub.wait_for_room, args=(stop,))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and pub.stats.paused  # the robot waits: no step, no record
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive() and not pub.stats.paused
    pub.publish_raw("s", b"the ENDED of the episode in progress", key="ep-0")  # still fits: the headroom
    assert pub.close(5) == 0
    assert pub.stats.spooled == pub.stats.spool_pending == n + 1 and pub.stats.spool_full_waits == 1


def test_a_full_spool_under_the_fail_policy_raises_a_clear_error(tmp_path: Path) -> None:
    pub = _unreachable_publisher(tmp_path, "fail")
    _fill(pub)
    with pytest.raises(SpoolFullError, match="is full .* SOP_ACTOR_SPOOL_WHEN_FULL"):
        pub.wait_for_room(None)
    sink = ListSink()
    with pytest.raises(SpoolFullError):
        run_episode(LineRobot(), ConstantPolicy(), None, sink, actor_id="a", episode_id="e", seed=1,
                    hold=pub.wait_for_room)
    assert [(name, r["kind"]) for name, r, _ in sink.records] == [("EpisodeEvent", "STARTED"), ("EpisodeEvent", "ENDED")]
    assert sink.of("EpisodeEvent")[-1]["outcome"] == "ABORTED"
    pub.close(5)
