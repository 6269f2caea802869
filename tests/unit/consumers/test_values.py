"""The processor's value-model source: a registry that does not answer never holds up the flush that asks it."""

from __future__ import annotations

import threading
import time

from consumers.values import RegistryValueSource


class SlowRegistry(RegistryValueSource):
    """The registry answers the first lookup at once and then hangs (MLflow's client retrying for minutes)."""

    def __init__(self) -> None:
        super().__init__(tracking_uri="http://127.0.0.1:1", poll_s=0.0)
        self.lookups = 0
        self.hang = threading.Event()

    def _latest(self) -> str | None:
        self.lookups += 1
        if self.lookups > 1:
            self.hang.wait(10)
        return None


def test_later_lookups_run_in_the_background() -> None:
    source = SlowRegistry()
    source.refresh()  # the first one on the caller's thread: the first flush already uses a registered model
    assert source.lookups == 1
    t0 = time.monotonic()
    for _ in range(5):
        source.refresh()
    assert time.monotonic() - t0 < 1.0  # did not wait on the hanging registry
    assert source.lookups == 2  # one lookup at a time
    source.hang.set()
    source._lookup.join(5)  # noqa: SLF001
    source.refresh()
    assert source.lookups == 3 and source.version is None and source.source_label is None
