"""Registry garbage collection: delete the ``sop-policy`` versions nobody needs any more.

A learner registers a version every few dozen steps (hundreds an hour); in gated mode most of them are never
a candidate, let alone a champion. :func:`versions_to_delete` (pure) keeps

- the newest ``keep_last`` versions (what a restarted learner resumes from, and versions being registered);
- every version that was ever champion (its ``sop.promoted`` tag: promoted by the gate, by hand, by auto mode,
  or returned to by a roll-back), so every roll-back target and every version the fleet ran as champion stays;
- every version an alias points at now (``champion``, ``candidate``, any other), and every one an alias was
  moved to within ``active_s`` (an actor may have loaded it and not closed an episode with it yet);
- every version an actor still runs: the version of each actor's newest episode, and every version that
  played an episode that ended within ``active_s``.

Where "an actor still runs" comes from: the Delta ``episodes`` table (``actor_id``, ``policy_version``,
``end_time``), read incrementally by the gate's :class:`~learner.promotion.LiveSuccess`. The actors also say
what they run in their Prometheus gauge ``sop_actor_policy_version`` and in every Kafka ``Step``; the table is
chosen because the learner reads it anyway, it is durable (an actor that is down, or whose metrics endpoint is
off or unreachable from the learner's machine, still has its newest episode there) and it is what the gate's
own statistics are computed from. An episode reaches the table only once it closed, which the ``active_s``
grace on alias moves covers: an actor switches only to a version an alias points at.

In auto mode every version becomes champion, so nothing is collected there; the collection matters in gated
mode (``SOP_REGISTRY_GC_KEEP_LAST``; the learner's publishing thread runs it after gate checks, at most every
``every_s``) and by hand (``sop registry gc``). A deleted version's files go with it (its logged model's
artifacts, where the artifact store allows deleting).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.registry import registry_client
from learner.config import ConfigError
from learner.promotion import PROMOTED_TAG, LiveSuccess, log_entries

log = logging.getLogger("sop.learner.gc")


@dataclass(frozen=True, kw_only=True)
class GCConfig:
    keep_last: int = 20
    active_s: float = 900.0
    every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"GCConfig.keep_last must be >= 1; got {self.keep_last}")
        if not self.active_s >= 0 or not self.every_s > 0:
            raise ConfigError(f"GCConfig.active_s must be >= 0 and every_s > 0; got {self.active_s}, {self.every_s}")


def running_versions(actor_version: Mapping[str, tuple[str, float]], last_played: Mapping[str, float], *,
                     now: float, active_s: float) -> set[str]:
    """The versions actors still run: each actor's newest episode's, and every one played within ``active_s``."""
    return {v for v, _ in actor_version.values()} | {v for v, t in last_played.items() if now - t <= active_s}


def versions_to_delete(versions: Iterable[int], *, keep_last: int, promoted: Iterable[str] = (),
                       aliased: Iterable[str] = (), running: Iterable[str] = ()) -> list[int]:
    """The versions to delete, oldest first (see the module doc for what is kept)."""
    ordered = sorted(set(versions))
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    protected = {str(v) for group in (promoted, aliased, running) for v in group}
    return [v for v in ordered if v not in keep and str(v) not in protected]


@dataclass
class GCResult:
    deleted: list[int] = field(default_factory=list)
    kept: int = 0
    failed: dict[int, str] = field(default_factory=dict)


class RegistryGC:
    """The shell: reads the registry and the live episodes, deletes what :func:`versions_to_delete` says."""

    def __init__(self, config: GCConfig, *, name: str, tracking_uri: str | None, live: LiveSuccess) -> None:
        self.config, self.name, self.tracking_uri, self.live = config, name, tracking_uri, live
        self._last = 0.0
        self.deleted: list[int] = []
        self.last_error: str | None = None

    def __call__(self, _gate: object = None) -> GCResult | None:
        """Collect if ``every_s`` passed since the last collection (the gate calls this after every check)."""
        if time.monotonic() - self._last < self.config.every_s:
            return None
        self._last = time.monotonic()
        try:
            return self.collect()
        except MlflowException as exc:
            self.last_error = str(exc)
            log.warning("registry garbage collection failed (tried again later): %s", exc)
            return None

    def plan(self, *, now: float | None = None) -> tuple[list[int], int]:
        """(versions to delete, versions there are), without deleting anything."""
        now = time.time() if now is None else now
        client = registry_client(self.tracking_uri)
        self.live.refresh()
        found = client.search_model_versions(f"name='{self.name}'")
        promoted = {str(v.version) for v in found if PROMOTED_TAG in (v.tags or {})}
        aliased = {str(v.version) for v in found if getattr(v, "aliases", None)} | self._aliased(client, now)
        running = running_versions(self.live.actor_version, self.live.last_played, now=now,
                                   active_s=self.config.active_s)
        doomed = versions_to_delete([int(v.version) for v in found], keep_last=self.config.keep_last,
                                    promoted=promoted, aliased=aliased, running=running)
        return doomed, len(found)

    def _aliased(self, client: MlflowClient, now: float) -> set[str]:
        """Versions an alias points at now, or was moved to within ``active_s``."""
        try:
            model = client.get_registered_model(self.name)
        except MlflowException:
            return set()
        now_aliased = {str(v) for v in (getattr(model, "aliases", None) or {}).values()}
        recent = {str(e["to"]) for _, e in log_entries(dict(model.tags)) if e.get("to") is not None
                  and e.get("event") in ("move", "rollback", "restore")
                  and now - float(e.get("at") or 0) <= self.config.active_s}
        return now_aliased | recent

    def collect(self, *, now: float | None = None) -> GCResult:
        doomed, total = self.plan(now=now)
        client = registry_client(self.tracking_uri)
        result = GCResult(kept=total - len(doomed))
        for version in doomed:
            try:
                source = client.get_model_version(self.name, str(version))
                client.delete_model_version(self.name, str(version))
            except MlflowException as exc:
                result.failed[version] = str(exc)
                continue
            result.deleted.append(version)
            _delete_files(client, source)
        if result.deleted:
            log.info("registry gc: deleted %d version(s) of %s (%s), kept %d", len(result.deleted), self.name,
                     _span(result.deleted), result.kept)
        self.deleted.extend(result.deleted)
        return result


def _delete_files(client: MlflowClient, version: object) -> None:
    """The deleted version's logged model and its files (best effort: an artifact store may refuse)."""
    model_id = getattr(version, "model_id", None)
    source = getattr(version, "source", None)
    try:
        if source:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(source).delete_artifacts()
        if model_id:
            client.delete_logged_model(model_id)
    except Exception as exc:  # noqa: BLE001 - the version is gone; leftover files are only disk
        log.info("files of a deleted version stay (%s): %s", source, exc)


def _span(versions: list[int]) -> str:
    return json.dumps(versions) if len(versions) <= 6 else f"v{versions[0]}…v{versions[-1]}"
