"""The frozen value model the processor uses for V(o_t), when one is registered in MLflow as ``sop-value``.

A version is data (``infra.model_versions``): it is downloaded, every file's SHA-256 checked against the
version's tags, and built by the processor's own code for its declared architecture (``architectures``, given
by `sop process`: ``sop-value``). A tampered, pickled (first-format) or unknown version is refused and the
processor keeps the one it has (or the running baseline). This package asks the registry for the newest version
(or an alias) now and then and calls ``values_for_rows(step records)``; a *pinned* version (``sop replay kafka
--value-version``, or `sop run --algorithm recap` keeping its value model frozen) is the only one it ever loads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from infra.model_versions import Builder, build, fetch_version
from infra.registry import registry_client

log = logging.getLogger("sop.processor.values")


class RegistryValueSource:
    """Polls the registry for ``name`` (version ``pinned`` if given, else alias ``champion`` if set, else the newest
    version) every ``poll_s``."""

    def __init__(self, *, tracking_uri: str | None, name: str = "sop-value", alias: str | None = "champion",
                 pinned: str | None = None, poll_s: float = 60.0,
                 architectures: Mapping[str, Builder] | None = None) -> None:
        self.tracking_uri, self.name, self.alias, self.poll_s = tracking_uri, name, alias, poll_s
        self.pinned = pinned
        self.architectures = dict(architectures or {})
        self.version: str | None = None
        self.refused: dict[str, str] = {}  # version -> why (not loaded again)
        self._model = None
        self._checked_at = -1e9
        self._root = Path(tempfile.mkdtemp(prefix="sop-values-"))
        self._lookup: threading.Thread | None = None
        self._pending: tuple[object, str] | None = None  # found by a background lookup, taken by the next refresh

    def _latest(self) -> str | None:
        from mlflow.exceptions import MlflowException

        client = registry_client(self.tracking_uri)
        try:
            if self.pinned is not None:
                return str(client.get_model_version(self.name, self.pinned).version)
            if self.alias:
                try:
                    return str(client.get_model_version_by_alias(self.name, self.alias).version)
                except MlflowException:
                    pass
            versions = client.search_model_versions(f"name = '{self.name}'")
        except MlflowException:
            return None
        newest = max((v.version for v in versions), key=int, default=None)
        return None if newest is None else str(newest)

    def refresh(self) -> None:
        """Take a version a background lookup found; every ``poll_s`` look for a newer one — the first time on
        this thread, later in the background: a registry that does not answer (MLflow's client retries for
        minutes) must not hold up the processor's Delta commits that call this."""
        if self._pending is not None:
            (self._model, self.version), self._pending = self._pending, None
        if self.tracking_uri is None or time.monotonic() - self._checked_at < self.poll_s:
            return
        first = self._checked_at < 0
        self._checked_at = time.monotonic()
        if first:
            self._look_up()
            if self._pending is not None:
                (self._model, self.version), self._pending = self._pending, None
        elif self._lookup is None or not self._lookup.is_alive():
            self._lookup = threading.Thread(target=self._look_up_logged, name="sop-value-lookup", daemon=True)
            self._lookup.start()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait for a background lookup to end and take what it found (tests; a caller that must know now)."""
        if self._lookup is not None:
            self._lookup.join(timeout_s)
        if self._pending is not None:
            (self._model, self.version), self._pending = self._pending, None

    def _look_up_logged(self) -> None:
        try:
            self._look_up()
        except Exception as exc:  # noqa: BLE001 - the registry being away: the next poll tries again
            log.warning("value model lookup failed (%s); keeping %s", exc, self.version)

    def _look_up(self) -> None:
        if self.tracking_uri is None:
            return
        if self.tracking_uri.startswith("sqlite:///") and not Path(self.tracking_uri.removeprefix("sqlite:///")).exists():
            return  # no registry yet; opening it would create (and migrate) the database from here
        latest = self._latest()
        if latest is None or latest == self.version or latest in self.refused:
            return
        directory = self._root / f"v{latest}"
        shutil.rmtree(directory, ignore_errors=True)
        try:
            local = fetch_version(registry_client(self.tracking_uri), self.name, latest, dst=directory)
            model = build(local, self.architectures, kind="value")
            if not hasattr(model, "values_for_rows"):
                raise TypeError(f"{self.name} v{latest} has no values_for_rows()")
        except Exception as exc:  # a broken version must not stop the processor
            self.refused[latest] = f"{type(exc).__name__}: {exc}"
            log.warning("value model %s v%s refused: %s; keeping %s", self.name, latest, exc, self.version)
            shutil.rmtree(directory, ignore_errors=True)
            return
        self._pending = (model, latest)
        log.info("value model %s v%s loaded", self.name, latest)

    @property
    def source_label(self) -> str | None:
        return f"value_model:{self.name}/{self.version}" if self._model is not None else None

    def __call__(self, task: str, records: Sequence[dict]) -> np.ndarray | None:
        if self._model is None:
            return None
        return np.asarray(self._model.values_for_rows(records), dtype=np.float64)
