"""Why one processor worker compacts: delta-rs lets two concurrent compactions of one table both commit."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from consumers.processor import compacts_here


def test_two_concurrent_compactions_duplicate_every_row(tmp_path: Path) -> None:
    # what the processor's single-compactor rule is for; when delta-rs refuses the second commit this test fails
    # and the rule may go (deltalake 1.6.6: both commit, with or without an application transaction)
    for i in range(30):
        write_deltalake(tmp_path, pa.table({"x": list(range(i * 10, i * 10 + 10))}), mode="append")
    handles = [DeltaTable(tmp_path), DeltaTable(tmp_path)]
    barrier = threading.Barrier(2)

    def compact(t: DeltaTable) -> None:
        barrier.wait()
        t.optimize.compact()

    threads = [threading.Thread(target=compact, args=(t,)) for t in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = DeltaTable(tmp_path).to_pyarrow_table().column("x").to_pylist()
    assert len(set(rows)) == 300
    assert len(rows) == 600  # every row twice


def test_only_the_owner_of_partition_zero_compacts() -> None:
    assert compacts_here({0, 2})
    assert not compacts_here({1, 3})
    assert not compacts_here(set())
