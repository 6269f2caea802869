"""Exactly-once writer when the object store fails: retried with backoff, nothing written twice, bounded."""

from __future__ import annotations

from typing import Any

import pytest
from deltalake.exceptions import DeltaError

import lakehouse.writer as writer_module
from lakehouse import Lakehouse
from lakehouse.errors import StorageUnavailableError
from lakehouse.writer import is_transient_storage_error, storage_backoff

STEPS_PREFIX = "sop-processor.sop.steps"
S3_DOWN = "Failed to parse parquet: External: Generic S3 error: Error performing PUT http://127.0.0.1:1/x after 10 retries"


def offsets_in(lake: Lakehouse) -> list[int]:
    return sorted(lake.table("steps").to_pyarrow_table(columns=["kafka_offset"]).column("kafka_offset").to_pylist())


class Flaky:
    """``write_deltalake`` that fails like delta-rs on a stopped S3 server: ``fail`` times before the append
    (nothing lands) or, with ``land_first``, after it (the commit landed, the answer was lost)."""

    def __init__(self, fail: int, *, land_first: bool = False) -> None:
        self.fail, self.land_first, self.calls = fail, land_first, 0
        self.real = writer_module.write_deltalake

    def __call__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        self.calls += 1
        if self.calls <= self.fail:
            if self.land_first:
                self.real(*args, **kwargs)
            raise DeltaError(S3_DOWN)
        self.real(*args, **kwargs)


def test_storage_errors_are_told_from_refusals() -> None:
    from deltalake.exceptions import CommitFailedError, SchemaMismatchError

    assert is_transient_storage_error(DeltaError(S3_DOWN))
    assert is_transient_storage_error(OSError("connection refused"))
    assert not is_transient_storage_error(CommitFailedError("version 3 exists"))
    assert not is_transient_storage_error(SchemaMismatchError("no such column"))
    assert not is_transient_storage_error(FileNotFoundError("gone"))
    assert [storage_backoff(a) for a in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_a_write_is_retried_until_the_store_answers(lake: Lakehouse, steps_of: Any, monkeypatch) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    writer.write(steps_of("e0", n=2), offsets={0: 1})
    flaky = Flaky(2)
    monkeypatch.setattr(writer_module, "write_deltalake", flaky)
    result = writer.write(steps_of("e1", n=3, offsets=[2, 3, 4]), offsets={0: 4})
    assert (result.rows_written, result.storage_retries, flaky.calls) == (3, 2, 3)
    assert offsets_in(lake) == [0, 1, 2, 3, 4] and writer.committed_offset(0) == 4


def test_a_commit_that_landed_before_the_error_is_not_written_again(lake: Lakehouse, steps_of: Any,
                                                                     monkeypatch) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    writer.write(steps_of("e0", n=2), offsets={0: 1})
    monkeypatch.setattr(writer_module, "write_deltalake", Flaky(1, land_first=True))
    result = writer.write(steps_of("e1", n=3, offsets=[2, 3, 4]), offsets={0: 4})
    assert (result.rows_written, result.rows_skipped, result.storage_retries) == (0, 3, 1)
    assert offsets_in(lake) == [0, 1, 2, 3, 4]  # once each
    assert writer.committed_offset(0) == 4


def test_the_retry_is_bounded(lake: Lakehouse, steps_of: Any, monkeypatch) -> None:
    writer = lake.writer("steps", app_id_prefix=STEPS_PREFIX, topic="sop.steps")
    writer.write(steps_of("e0", n=1), offsets={0: 0})
    writer.storage_retry_s = 0.5
    monkeypatch.setattr(writer_module, "write_deltalake", Flaky(10**6))
    with pytest.raises(StorageUnavailableError, match="failed on the storage 2 times in 0 s.*Generic S3 error"):
        writer.write(steps_of("e1", n=1, offsets=[1]), offsets={0: 1})
    monkeypatch.undo()
    assert writer.write(steps_of("e1", n=1, offsets=[1]), offsets={0: 1}).rows_written == 1  # the caller's retry


def test_rows_without_an_origin_are_not_retried_blindly(lake: Lakehouse, steps_of: Any, monkeypatch) -> None:
    # without a Kafka origin or an app transaction a retry could not tell whether the failed commit landed
    writer = lake.writer("steps", app_id_prefix="sop-demos")
    writer.write(steps_of("d0", n=1, partition=None))
    flaky = Flaky(1)
    monkeypatch.setattr(writer_module, "write_deltalake", flaky)
    with pytest.raises(StorageUnavailableError, match="not retried"):
        writer.write(steps_of("d1", n=2, partition=None))
    assert flaky.calls == 1
    flaky.calls = 0  # with an app transaction the same rows are retried: the transaction says what landed
    result = writer.write(steps_of("d1", n=2, partition=None), app_transactions={"sop-demos.seed-1": 1})
    assert (result.rows_written, result.storage_retries) == (2, 1)
