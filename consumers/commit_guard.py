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
(compaction, transaction markers) are still skipped, as faust does.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableSequence
from typing import Any


def committable_end(acked: MutableSequence[int], *, committed: int | None, unacked: Iterable[int]) -> int | None:
    """The offset to commit (the next one to read), or None to commit nothing; removes what it covers from
    ``acked`` (sorted in place). ``unacked``: offsets fetched and not acknowledged; nothing at or above the
    smallest of them is committed."""
    if not acked:
        return None
    acked.sort()
    if committed is not None and committed > 0 and acked[0] - committed > 1:
        return None  # a hole at the head that faust did not record as a gap: not acknowledged yet
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


def install() -> None:
    """Patch faust's consumer (idempotent)."""
    from faust.transport.consumer import Consumer

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
        unacked = [m.offset for m in list(self._unacked_messages) if m.tp == tp and not m.acked]
        end = committable_end(acked, committed=self._committed_offset[tp], unacked=unacked)
        if end is not None:
            self._acked_index[tp].difference_update(o for o in before if o < end)
        return end

    _new_offset._sop_guarded = True  # type: ignore[attr-defined]
    Consumer._new_offset = _new_offset  # type: ignore[method-assign]
