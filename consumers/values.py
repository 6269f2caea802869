"""The frozen value model the processor uses for V(o_t), when one is registered in MLflow as ``sop-value``.

The model's own code is loaded by MLflow (``mlflow.pyfunc``); this package only asks the registry
for the newest version (or an alias) now and then and calls ``values_for_rows(step records)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infra.registry import registry_client

log = logging.getLogger("sop.processor.values")


class RegistryValueSource:
    """Polls the registry for ``name`` (alias ``champion`` if set, else the newest version) every ``poll_s``."""

    def __init__(self, *, tracking_uri: str | None, name: str = "sop-value", alias: str | None = "champion",
                 poll_s: float = 60.0) -> None:
        self.tracking_uri, self.name, self.alias, self.poll_s = tracking_uri, name, alias, poll_s
        self.version: str | None = None
        self._model = None
        self._checked_at = -1e9
        self._lookup: threading.Thread | None = None
        self._pending: tuple[object, str] | None = None  # found by a background lookup, taken by the next refresh

    def _latest(self) -> str | None:
        from mlflow.exceptions import MlflowException

        client = registry_client(self.tracking_uri)
        try:
            if self.alias:
                try:
                    return client.get_model_version_by_alias(self.name, self.alias).version
                except MlflowException:
                    pass
            versions = client.search_model_versions(f"name = '{self.name}'")
        except MlflowException:
            return None
        return max((v.version for v in versions), key=int, default=None)

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
        if latest is None or latest == self.version:
            return
        import mlflow.pyfunc

        try:
            client = registry_client(self.tracking_uri)
            source = client.get_model_version_download_uri(self.name, latest)
            model = mlflow.pyfunc.load_model(source).unwrap_python_model()
            if not hasattr(model, "values_for_rows"):
                raise TypeError(f"{self.name} v{latest} has no values_for_rows()")
        except Exception as exc:  # a broken version must not stop the processor
            log.warning("value model %s v%s refused: %s; keeping %s", self.name, latest, exc, self.version)
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
