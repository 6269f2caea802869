"""The commit rule that replaces faust's: never past a fetched, unacknowledged message (faust-streaming #606)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consumers.commit_guard import committable_end


def test_faust_would_commit_over_a_held_head_message_we_do_not() -> None:
    # offset 90 (a held step) is unacknowledged; 91-93 are; faust commits 94 and a crash loses 90
    acked = [91, 92, 93]
    assert committable_end(acked, committed=90, unacked=[90]) is None
    assert acked == [91, 92, 93]  # nothing consumed from the bookkeeping
    # even when the held message is not known as unacknowledged (its event was dropped at a revocation)
    assert committable_end(acked, committed=90, unacked=[]) is None


def test_commits_the_acknowledged_run_up_to_the_first_unacknowledged_message() -> None:
    acked = [10, 11, 12, 14]
    assert committable_end(acked, committed=10, unacked=[13]) == 13
    assert acked == [14]
    assert committable_end(acked, committed=13, unacked=[13]) is None  # 13 still held


def test_a_held_message_inside_the_run_caps_it() -> None:
    acked = [5, 6, 7, 8, 9]
    assert committable_end(acked, committed=5, unacked=[7]) == 7
    assert acked == [7, 8, 9]


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 5))
def test_never_past_an_unacknowledged_offset(acks: list[bool], start: int) -> None:
    acked = [start + i for i, a in enumerate(acks) if a]
    unacked = [start + i for i, a in enumerate(acks) if not a]
    end = committable_end(list(acked), committed=start, unacked=unacked)
    if end is not None:
        assert all(o >= end for o in unacked)
        assert end > start
