"""The commit rule that replaces faust's: never past a fetched, unacknowledged message (faust-streaming #606)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers import commit_guard
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


def _slow_buffer(send_s: float) -> tuple[object, list[asyncio.Future]]:
    """faust's real ProducerBuffer whose hand-over to Kafka takes ``send_s`` per message (a slow producer)."""
    from faust.transport.producer import ProducerBuffer

    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))

    async def send(fut: asyncio.Future) -> None:
        await asyncio.sleep(send_s)
        fut.set_result("delivered")

    buffer._send_pending = send
    return buffer, [asyncio.get_running_loop().create_future() for _ in range(3)]


def test_faust_flush_returns_before_a_slow_producer_has_sent_what_the_commit_needs() -> None:
    # the faust behaviour install_drain exists for; if faust ever drains for real, this fails and the patch can go
    from faust.transport.producer import ProducerBuffer

    faust_flush = getattr(ProducerBuffer.flush, "faust_flush", ProducerBuffer.flush)  # unpatched, either way

    async def run() -> int:
        buffer, futures = _slow_buffer(0.3)
        await buffer.start()
        for f in futures:
            buffer.put(f)
        await faust_flush(buffer)
        left = sum(not f.done() for f in futures)
        await asyncio.wait(futures)  # let it finish sending before it stops
        await buffer.stop()
        return left

    assert asyncio.run(run()) > 0


def test_patched_flush_waits_until_every_buffered_message_is_delivered() -> None:
    commit_guard.install_drain()

    async def run() -> list[bool]:
        buffer, futures = _slow_buffer(0.3)
        await buffer.start()
        for f in futures:
            buffer.put(f)
        await buffer.flush()
        done = [f.done() for f in futures]
        await buffer.stop()
        return done

    assert asyncio.run(run()) == [True, True, True]


def test_a_delivery_error_fails_the_flush_and_so_the_commit() -> None:
    async def run() -> None:
        ok, bad = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        ok.set_result(1)
        bad.set_exception(OSError("broker refused the changelog write"))
        await commit_guard.delivered([ok, bad], still_running=lambda: True)

    with pytest.raises(OSError, match="refused"):
        asyncio.run(run())


def test_a_stopped_producer_fails_the_flush_instead_of_waiting_forever() -> None:
    async def run() -> None:
        never = asyncio.get_running_loop().create_future()
        await commit_guard.delivered([never], still_running=lambda: False)

    with pytest.raises(RuntimeError, match="1 changelog messages not delivered"):
        asyncio.run(run())
