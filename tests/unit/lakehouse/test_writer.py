"""Exactly-once writer: replays, retries, crashes between tables, interleaved episodes, concurrent writers."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from lakehouse import ExactlyOnceWriter, Lakehouse, SchemaMismatchError, app_id, safe_watermark
from lakehouse.maintenance import history

STEPS_PREFIX = "sop-processor.sop.steps"
EPISODES_PREFIX = "sop-processor.sop.episodes"


def offsets_in(lake: Lakehouse, name: str) -> list[tuple[int, int]]:
    table = lake.table(name).to_pyarrow_table(columns=["kafka_partition", "kafka_offset"])
    return sorted(zip(table.column("kafka_partition").to_pylist(), table.column("kafka_offset").to_pylist(), strict=True))


def test_writing_the_same_offsets_twice_adds_no_rows(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    rows = steps_of("e0", n=5)
    first = writer.write(rows, offsets={0: 4})
    again = writer.write(rows, offsets={0: 4})
    assert (first.rows_written, first.watermarks) == (5, {0: 4})
    assert (again.rows_written, again.rows_skipped, again.version) == (0, 5, None)
    assert offsets_in(lake, "steps") == [(0, o) for o in range(5)]
    assert writer.committed_offset(0) == 4
    assert lake.table("steps").transaction_version(app_id(STEPS_PREFIX, 0)) == 4
    # a fresh writer (a restarted process) drops them too
    fresh = ExactlyOnceWriter(lake.table("steps"), STEPS_PREFIX)
    assert fresh.write(rows, offsets={0: 4}).rows_written == 0
    assert len(offsets_in(lake, "steps")) == 5


def test_a_batch_holding_one_offset_twice_writes_it_once(lake: Lakehouse, steps_of: Any) -> None:
    # after a rebalance the processor can receive one message twice in a generation; the rows it queued for both
    # copies must land once
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    rows = steps_of("e0", n=4)
    doubled = [*rows, *rows[1:3]]
    result = writer.write(doubled, offsets={0: 3})
    assert (result.rows_written, result.rows_skipped) == (4, 2)
    assert offsets_in(lake, "steps") == [(0, o) for o in range(4)]


def test_rows_and_watermarks_are_one_commit(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    result = writer.write(steps_of("e0", n=3, partition=1, offsets=[10, 11, 12]), offsets={1: 12, 2: 40})
    commit = history(lake.table("steps"), limit=1)[0]
    assert commit.version == result.version
    assert commit.writer == STEPS_PREFIX
    assert commit.metrics["num_added_rows"] == 3
    assert writer.committed_offset(1) == 12 and writer.committed_offset(2) == 40
    assert result.files_added == 1  # one (task, date) partition


def test_watermark_never_moves_back(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    writer.write(steps_of("e0", n=3, offsets=[8, 9, 10]), offsets={0: 10})
    result = writer.write(steps_of("e1", n=2, offsets=[11, 12]), offsets={0: 5})
    assert result.rows_written == 2 and result.watermarks == {}
    assert writer.committed_offset(0) == 10


def test_an_empty_batch_still_advances_the_watermark(lake: Lakehouse) -> None:
    writer = lake.writer("interventions", app_id_prefix="g.sop.interventions")
    result = writer.write([], offsets={3: 99})  # e.g. every message of the batch went to the dead letters
    assert result.version is not None and result.rows_written == 0
    assert writer.committed_offset(3) == 99
    assert writer.resume_offset(3) == 100


def test_rows_without_origin_are_idempotent_through_app_transactions(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("demonstrations", app_id_prefix="sop-demos")
    for k in range(3):
        writer.write(steps_of(f"demo-{k}", n=4, partition=None), app_transactions={"sop-demos.seed-7": k})
    rerun = writer.write(steps_of("demo-1", n=4, partition=None), app_transactions={"sop-demos.seed-7": 1})
    assert rerun.rows_written == 0
    assert lake.table("demonstrations").to_pyarrow_table().num_rows == 12
    assert lake.table("demonstrations").transaction_version("sop-demos.seed-7") == 2


def test_resume_after_a_crash_between_two_tables_commits(
    lake: Lakehouse, steps_of: Any, episode_of: Any
) -> None:
    # Kafka, partition 0: steps topic holds e0 at 0..4, e1 at 5..7; episodes topic ENDED e0 at 1, e1 at 3.
    steps_topic = steps_of("e0", n=5) + steps_of("e1", n=3, offsets=[5, 6, 7])
    episodes_topic = [episode_of("e0", offset=1), episode_of("e1", num_steps=3, offset=3)]

    def process(steps_writer: ExactlyOnceWriter, episodes_writer: ExactlyOnceWriter, *, crash_after: str | None) -> None:
        for ep, (lo, hi), end in (("e0", (0, 5), 1), ("e1", (5, 8), 3)):
            steps = [r for r in steps_topic[lo:hi] if r["episode_id"] == ep]
            steps_writer.write(steps_writer.filter_uncommitted(steps), offsets={0: hi - 1})
            if crash_after == ep:
                return  # the process dies before the episodes commit
            episode = [e for e in episodes_topic if e["episode_id"] == ep]
            episodes_writer.write(episodes_writer.filter_uncommitted(episode), offsets={0: end})

    process(lake.writer("steps", app_id_prefix=STEPS_PREFIX), lake.writer("episodes", app_id_prefix=EPISODES_PREFIX),
            crash_after="e0")
    assert len(offsets_in(lake, "steps")) == 5 and offsets_in(lake, "episodes") == []

    restarted = Lakehouse(lake.root)
    steps_writer = restarted.writer("steps", app_id_prefix=STEPS_PREFIX)
    episodes_writer = restarted.writer("episodes", app_id_prefix=EPISODES_PREFIX)
    assert steps_writer.resume_offset(0) == 5 and episodes_writer.resume_offset(0) == 0
    # each table resumes on its own; the consumer replays from the lowest resume offset
    process(steps_writer, episodes_writer, crash_after=None)
    process(steps_writer, episodes_writer, crash_after=None)  # and a replay of everything changes nothing

    assert offsets_in(lake, "steps") == [(0, o) for o in range(8)]
    assert offsets_in(lake, "episodes") == [(0, 1), (0, 3)]


def test_interleaved_episodes_resume_without_loss_or_duplicates(lake: Lakehouse, steps_of: Any) -> None:
    # partition 0 interleaves e0 (offsets 0,2,4,6) and e1 (1,3,5,7,9); e0 closes first, then the process dies
    e0 = steps_of("e0", n=4, offsets=[0, 2, 4, 6])
    e1 = steps_of("e1", n=5, offsets=[1, 3, 5, 7, 9])
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    watermark = safe_watermark(next_offset=8, open_offsets=[1])  # e1's first step is still held in memory
    assert watermark == 0
    writer.write(e0, offsets={0: watermark})

    restarted = Lakehouse(lake.root).writer("steps", app_id_prefix=STEPS_PREFIX)
    start = restarted.resume_offset(0)
    assert start == 1
    replayed = sorted(e0[1:] + e1, key=lambda r: r["kafka_offset"])  # everything from offset 1 again
    assert [r["kafka_offset"] for r in replayed if restarted.is_committed(0, r["kafka_offset"])] == [2, 4, 6]
    fresh = restarted.filter_uncommitted(replayed)
    assert [r["episode_id"] for r in fresh] == ["e1"] * 5
    restarted.write(fresh, offsets={0: safe_watermark(next_offset=10)})

    assert offsets_in(lake, "steps") == [(0, o) for o in (0, 1, 2, 3, 4, 5, 6, 7, 9)]
    assert restarted.committed_state(0).written_above == set()
    assert restarted.resume_offset(0) == 10


def test_filter_uncommitted_takes_arrow_tables_and_a_partition(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    writer.write(steps_of("e0", n=3, partition=2), offsets={2: 2})
    replay = pa.Table.from_pylist(steps_of("e0", n=5, partition=2))
    assert writer.filter_uncommitted(replay).column("kafka_offset").to_pylist() == [3, 4]
    other = [{"kafka_offset": o} for o in range(5)]  # raw messages of partition 2, before they become rows
    assert writer.filter_uncommitted(other, partition=2) == [{"kafka_offset": 3}, {"kafka_offset": 4}]


def test_rows_from_another_topic_are_refused(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    with pytest.raises(SchemaMismatchError, match="one ExactlyOnceWriter"):
        writer.write(steps_of("e0", n=2, topic="replay.steps"), offsets={0: 1})


def test_two_writers_on_different_partitions_both_succeed(lake: Lakehouse, steps_of: Any) -> None:
    lake.table("steps")
    errors: list[BaseException] = []

    def run(partition: int) -> None:
        try:
            writer = Lakehouse(lake.root).writer("steps", app_id_prefix=STEPS_PREFIX)
            for k in range(12):
                rows = steps_of(f"p{partition}-e{k}", n=2, partition=partition, offsets=[2 * k, 2 * k + 1])
                writer.write(rows, offsets={partition: 2 * k + 1})
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert offsets_in(lake, "steps") == [(p, o) for p in (0, 1) for o in range(24)]
    checker = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    assert checker.committed_offset(0) == 23 and checker.committed_offset(1) == 23


@pytest.mark.parametrize("advancing", [True, False], ids=["watermark-advances", "episode-held-open"])
def test_two_owners_of_one_partition_never_duplicate(lake: Lakehouse, steps_of: Any, advancing: bool) -> None:
    # a zombie and the new owner after a rebalance write the same messages concurrently; with an episode held
    # open the watermark stays put while closed episodes above it are written
    lake.writer("steps", app_id_prefix=STEPS_PREFIX).write([], offsets={0: 0})
    batches = [steps_of(f"e{k}", n=3, offsets=[3 * k + 1, 3 * k + 2, 3 * k + 3]) for k in range(10)]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            writer = Lakehouse(lake.root).writer("steps", app_id_prefix=STEPS_PREFIX)
            for k, rows in enumerate(batches):
                writer.write(rows, offsets={0: 3 * k + 3 if advancing else 0})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    written = offsets_in(lake, "steps")
    assert Counter(written).most_common(1)[0][1] == 1
    assert written == [(0, o) for o in range(1, 31)]


def test_a_regained_partition_is_not_written_from_a_stale_state(lake: Lakehouse, steps_of: Any) -> None:
    first = lake.writer("steps", app_id_prefix=STEPS_PREFIX)
    first.write(steps_of("e0", n=2, offsets=[0, 1]), offsets={0: 1})
    other = Lakehouse(lake.root).writer("steps", app_id_prefix=STEPS_PREFIX)  # owned the partition meanwhile
    other.write(steps_of("e1", n=2, offsets=[2, 3]), offsets={0: 3})
    result = first.write(steps_of("e1", n=2, offsets=[2, 3]), offsets={0: 2})  # the old owner catches up
    assert result.rows_written == 0
    assert first.committed_offset(0) == 3
    assert offsets_in(lake, "steps") == [(0, o) for o in range(4)]


def test_a_writer_of_two_partitions_racing_a_zombie_never_duplicates(lake: Lakehouse, steps_of: Any) -> None:
    # the owner of partitions 0 and 1 commits while a zombie of 0 and another writer of 1 commit the same rows
    lake.writer("steps", app_id_prefix=STEPS_PREFIX).write([], offsets={0: 0, 1: 0})
    errors: list[BaseException] = []

    def run(partitions: tuple[int, ...]) -> None:
        try:
            writer = Lakehouse(lake.root).writer("steps", app_id_prefix=STEPS_PREFIX)
            for k in range(8):
                for p in partitions:
                    rows = steps_of(f"p{p}-e{k}", n=2, partition=p, offsets=[2 * k + 1, 2 * k + 2])
                    writer.write(rows, offsets={p: 0})  # an episode stays open: the watermark holds
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ps,)) for ps in ((0, 1), (0,), (1,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert offsets_in(lake, "steps") == [(p, o) for p in (0, 1) for o in range(1, 17)]
