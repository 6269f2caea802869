"""Never commit a Kafka offset past a message that is not acknowledged yet (a fix for faust-streaming 0.15.3).

faust commits, per partition, the end of the first run of consecutive acknowledged offsets. Its guard against
a hole at the head of that run only fires when the hole is wider than one offset
(``min(acked) - committed > 1`` in ``Consumer._new_offset``), so when the message *at* the committed offset is
still held (our processor holds steps in memory until their chunk or their episode is safe, and ends until their
episode is in Delta) and the next one is acknowledged, faust commits straight over it and a crash then loses it
(faust-streaming issue #606, open upstream). That is what lost the last step of an episode in the SIGKILL test
(``46 of 47 steps ... closing with what arrived``): the step at the head of the partition was skipped on restart.

:func:`committable_end` is the rule as a pure function; :func:`install` replaces ``Consumer._new_offset`` with it,
using faust's own set of fetched-but-unacknowledged messages. Holes that faust recorded as real gaps in the log
(compaction, transaction markers) are still skipped, as faust does; a hole at the head that faust did not record
is not (it is an unacknowledged message: our input topics have no holes).

:func:`install_rewind` fixes the other half of a restart: where the input partitions are read from after an
assignment. faust seeks only the partitions that have a committed offset; one without (a young group, or a
worker killed before its first commit) keeps the position its fetcher had. After a rebalance that hands such a
partition back to the same worker, the events it had read and dropped (the machine forgets a revoked partition)
were never read again — a SIGKILL test lost 24 interventions that way, and the next write's watermark passed them.

:func:`install_drain` fixes what a commit waits for. faust flushes its producer before it commits offsets, but
``ProducerBuffer.flush`` gives up after 0.1 s without a message handed to aiokafka (``flush_atmost`` returns on its
timeout), which happens whenever the producer is slow (the "producer buffer full" warning); the changelog writes of
chunks and metas still in that buffer were then not durable while the offsets of the steps they hold were
committed, and a SIGKILL lost those steps (``29 of 30 steps ... storing what arrived``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, MutableSequence
from typing import Any


def forget_acknowledgements(consumer: Any, tps: Any) -> None:
    """Drop faust's record of acknowledged offsets of ``tps`` (on assignment): acknowledgements from before a
    rebalance must not fill the run that is committed after it, while the same offsets are read and held again."""
    for tp in tps:
        consumer._acked.pop(tp, None)
        consumer._acked_index.pop(tp, None)


def committable_end(acked: MutableSequence[int], *, committed: int | None, unacked: Iterable[int]) -> int | None:
    """The offset to commit (the next one to read), or None to commit nothing; removes what it covers from
    ``acked`` (sorted in place). ``unacked``: offsets fetched and not acknowledged; nothing at or above the
    smallest of them is committed."""
    if not acked:
        return None
    acked.sort()
    if committed is not None and acked[0] > committed:
        return None  # the message at the committed offset is not acknowledged (faust tolerated a hole of one)
    end = acked[0] + 1
    for offset in acked[1:]:
        if offset != end:
            break
        end += 1
    lowest = min(unacked, default=None)
    if lowest is not None and lowest < end:
        end = lowest
    if committed is not None and end <= committed:
        return None
    n = 0
    while n < len(acked) and acked[n] < end:
        n += 1
    del acked[:n]
    return end


_rewound_topics: frozenset[str] = frozenset()


def install_rewind(topics: Iterable[str]) -> None:
    """Patch faust's consumer (idempotent): after faust's own seek to the committed offsets (it runs once the
    tables are recovered, just before the streams resume), every assigned partition of ``topics`` that has no
    committed offset is read again from its beginning."""
    global _rewound_topics
    from faust.transport.consumer import Consumer

    _rewound_topics = frozenset(topics)
    if getattr(Consumer.perform_seek, "_sop_rewinds", False):
        return
    original = Consumer.perform_seek

    async def perform_seek(self: Any) -> None:
        await original(self)
        fresh = [tp for tp in self.assignment()
                 if tp.topic in _rewound_topics and self._committed_offset.get(tp) is None]
        if fresh:
            earliest = await self.earliest_offsets(*fresh)
            for tp in fresh:
                await self.seek(tp, earliest.get(tp) or 0)

    perform_seek._sop_rewinds = True  # type: ignore[attr-defined]
    Consumer.perform_seek = perform_seek  # type: ignore[method-assign]


_held: Any = None  # tp -> offsets delivered to the agents and not acknowledged (strong references: see below)


def install(held: Any) -> None:
    """Patch faust's consumer (idempotent). ``held(tp)`` gives the offsets of ``tp`` that were delivered and are
    not acknowledged. faust's own ``_unacked_messages`` is a WeakSet: a message whose event the processor dropped
    (a revocation) vanishes from it while faust may still commit that partition, so it cannot be the cap."""
    global _held
    from faust.transport.consumer import Consumer

    _held = held
    if getattr(Consumer._new_offset, "_sop_guarded", False):
        return

    def _new_offset(self: Any, tp: Any) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        gaps = self._gap[tp]
        if gaps:  # known holes in the log count as acknowledged (as in faust)
            top = max(acked)
            for entry in sorted(gaps.overlap(0, top), key=lambda e: e.begin):
                acked.extend(range(entry.begin, entry.end))
            gaps.chop(0, top + 1)
        before = set(acked)
        unacked = list(_held(tp)) if _held is not None else []
        unacked += [m.offset for m in list(self._unacked_messages) if m.tp == tp and not m.acked]
        end = committable_end(acked, committed=self._committed_offset[tp], unacked=unacked)
        if end is not None:
            self._acked_index[tp].difference_update(o for o in before if o < end)
        return end

    _new_offset._sop_guarded = True  # type: ignore[attr-defined]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]


async def delivered(futures: Iterable[asyncio.Future], *, still_running: Any, poll_s: float = 0.5) -> None:
    """Wait until every one of ``futures`` is done (a message the broker acknowledged); raise the first delivery
    error. ``still_running()`` false: stop waiting and raise (what is not sent then would never be)."""
    waiting = {f for f in futures if not f.done()}
    while waiting:
        if not still_running():
            raise RuntimeError(f"the producer stopped with {len(waiting)} changelog messages not delivered")
        _, waiting = await asyncio.wait(waiting, timeout=poll_s)
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]


def install_drain() -> None:
    """Patch faust's producer buffer (idempotent): ``flush()`` returns only when every message put into the buffer
    before the call has been delivered, so the offsets committed after it never pass a changelog write."""
    from faust.transport.producer import ProducerBuffer

    if getattr(ProducerBuffer.flush, "_sop_drains", False):
        return
    original_put, original_flush = ProducerBuffer.put, ProducerBuffer.flush

    def put(self: Any, fut: Any) -> None:
        unsent = self.__dict__.setdefault("_sop_unsent", set())
        unsent.add(fut)
        fut.add_done_callback(unsent.discard)
        original_put(self, fut)

    async def flush(self: Any) -> None:
        if self.state != "running":
            await original_flush(self)  # stopping: faust's own rule (refuses while messages are left)
            return
        await delivered(list(self.__dict__.get("_sop_unsent", ())),
                        still_running=lambda: self.state == "running" and not self.should_stop)

    flush._sop_drains = True  # type: ignore[attr-defined]
    flush.faust_flush = original_flush  # type: ignore[attr-defined]
    ProducerBuffer.put = put  # type: ignore[method-assign]
    ProducerBuffer.flush = flush  # type: ignore[method-assign]
