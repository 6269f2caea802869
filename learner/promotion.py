"""Moving the alias the fleet follows: promotion with a history, roll-back, and the live-success gate.

Every move of ``champion`` made through :func:`promote` pushes the version it replaced onto a history kept as
a tag of the registered model (``sop.champion_history``, newest last), so :func:`rollback` can return to the
previous champion, and tags the promoted version with when, why and what it replaced (``sop.promoted``).
A roll-back *pins* the champion (``sop.champion_pinned``): a learner in auto mode then keeps registering
versions but stops moving the alias until someone promotes a version by hand.

The gate (gated mode): the learner moves ``candidate`` to a new version only when no candidate is being
judged; actors that follow ``candidate`` (a canary share of the fleet) produce live episodes with it, and
once it has ``min_episodes`` closed episodes in the Delta ``episodes`` table it is promoted if its success
rate is not worse than the champion's (over the champion's most recent episodes, averaged over the tasks
both ran), else rejected. Either way the version is tagged ``sop.gate`` and the next version becomes the
candidate. The rule itself is the pure function :func:`gate_decision`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.registry import registry_client
from lakehouse import EPISODES, IncrementalReader, Lakehouse
from learner.config import ConfigError

log = logging.getLogger("sop.learner.promotion")

HISTORY_TAG = "sop.champion_history"
PINNED_TAG = "sop.champion_pinned"
PROMOTED_TAG = "sop.promoted"
GATE_TAG = "sop.gate"
MAX_HISTORY = 100  # a registered-model tag holds at most a few thousand characters

Decision = Literal["wait", "promote", "reject"]


class PromotionError(RuntimeError):
    """An alias cannot be moved as asked (unknown version, nothing to roll back to); the message says why."""


def _client(tracking_uri: str | None) -> MlflowClient:
    return registry_client(tracking_uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_history(*, name: str, tracking_uri: str | None, alias: str = "champion") -> list[str]:
    """Earlier champions, oldest first (what :func:`rollback` returns to, from the end)."""
    return _history(_client(tracking_uri), name, alias)


def _history_tag(alias: str) -> str:
    return HISTORY_TAG if alias == "champion" else f"{HISTORY_TAG}.{alias}"


def _history(client: MlflowClient, name: str, alias: str) -> list[str]:
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    try:
        return [str(v) for v in json.loads(tags.get(_history_tag(alias), "[]"))]
    except json.JSONDecodeError:
        return []


def pinned(*, name: str, tracking_uri: str | None) -> str | None:
    """The version the champion is pinned to by a roll-back, or None."""
    try:
        return _client(tracking_uri).get_registered_model(name).tags.get(PINNED_TAG) or None
    except MlflowException:
        return None


def promote(version: str, *, name: str, tracking_uri: str | None, alias: str = "champion", reason: str = "manual",
            pin: bool | None = None) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed at before (None if none).

    The previous version goes onto the history. ``pin=True`` pins the champion, ``False`` unpins it, ``None``
    leaves the pin as it is.
    """
    client = _client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise PromotionError(f"{name} has no version {version!r}; list versions in the MLflow UI or with "
                             f"`mlflow models` / MlflowClient.search_model_versions") from None
    previous = alias_version(client, name, alias)
    if previous != str(version):
        client.set_registered_model_alias(name, alias, str(version))
        if previous is not None:
            history = [*_history(client, name, alias), previous][-MAX_HISTORY:]
            client.set_registered_model_tag(name, _history_tag(alias), json.dumps(history))
        client.set_model_version_tag(name, str(version), PROMOTED_TAG if alias == "champion" else
                                     f"{PROMOTED_TAG}.{alias}",
                                     json.dumps({"at": time.time(), "reason": reason, "replaced": previous}))
    if pin is True:
        client.set_registered_model_tag(name, PINNED_TAG, str(version))
    elif pin is False:
        client.set_registered_model_tag(name, PINNED_TAG, "")
    return previous


def rollback(*, name: str, tracking_uri: str | None, alias: str = "champion", pin: bool = True) -> tuple[str, str]:
    """Move ``alias`` back to the previous champion; returns (from, to). Pins the champion unless ``pin=False``."""
    client = _client(tracking_uri)
    current = alias_version(client, name, alias)
    history = _history(client, name, alias)
    while history:
        target = history.pop()
        if target == current:
            continue
        try:
            client.get_model_version(name, target)
        except MlflowException:
            log.warning("%s version %s in the history no longer exists; skipped", name, target)
            continue
        client.set_registered_model_alias(name, alias, target)
        client.set_registered_model_tag(name, _history_tag(alias), json.dumps(history))
        client.set_model_version_tag(name, target, f"{PROMOTED_TAG}" if alias == "champion" else
                                     f"{PROMOTED_TAG}.{alias}",
                                     json.dumps({"at": time.time(), "reason": "rollback", "replaced": current}))
        if pin:
            client.set_registered_model_tag(name, PINNED_TAG, target)
        return str(current), target
    raise PromotionError(f"{name}@{alias} has no earlier version to roll back to (history is empty); "
                         f"use `sop promote --version V` to choose one")


# ---- the live-success gate -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GateConfig:
    min_episodes: int = 20  # closed episodes of the candidate before it is judged
    tolerance: float = 0.0  # the candidate may be this much worse than the champion and still be promoted
    champion_window: int = 200  # the champion's most recent episodes per task that count
    check_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.min_episodes < 1:
            raise ConfigError(f"GateConfig.min_episodes must be >= 1; got {self.min_episodes}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"GateConfig.tolerance must be in [0, 1); got {self.tolerance}")
        if self.champion_window < 1:
            raise ConfigError(f"GateConfig.champion_window must be >= 1; got {self.champion_window}")
        if not self.check_interval_s > 0:
            raise ConfigError(f"GateConfig.check_interval_s must be > 0; got {self.check_interval_s}")


@dataclass(frozen=True)
class Tally:
    successes: int
    episodes: int

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def macro_rate(by_task: Mapping[str, Tally], tasks: Sequence[str]) -> float:
    """Mean of the per-task success rates over ``tasks`` (so a different task mix does not bias it)."""
    rates = [by_task[t].rate for t in tasks if t in by_task and by_task[t].episodes]
    return sum(rates) / len(rates) if rates else 0.0


def gate_decision(candidate: Mapping[str, Tally], champion: Mapping[str, Tally] | None, *, min_episodes: int,
                  tolerance: float = 0.0) -> tuple[Decision, float, float | None]:
    """Whether to promote the candidate: (decision, candidate rate, champion rate).

    Wait until the candidate has ``min_episodes`` episodes; then promote when the champion has fewer than
    ``min_episodes`` (no evidence that it is better) or when the candidate's success rate, averaged over the
    tasks both ran, is at least the champion's minus ``tolerance``; otherwise reject.
    """
    n = sum(t.episodes for t in candidate.values())
    if n < min_episodes:
        return "wait", macro_rate(candidate, list(candidate)), None
    if champion is None or sum(t.episodes for t in champion.values()) < min_episodes:
        return "promote", macro_rate(candidate, list(candidate)), None
    shared = [t for t in candidate if champion.get(t) is not None and champion[t].episodes]
    if not shared:
        return "promote", macro_rate(candidate, list(candidate)), None
    cand, champ = macro_rate(candidate, shared), macro_rate(champion, shared)
    return ("promote" if cand >= champ - tolerance else "reject"), cand, champ


class LiveSuccess:
    """Outcomes per policy version and task from the ``episodes`` table, read incrementally.

    ABORTED episodes (a robot stopped or died) say nothing about the policy and are not counted.
    """

    def __init__(self, lake: Lakehouse, *, window: int = 200) -> None:
        self.lake = lake
        self.window = window
        self._reader: IncrementalReader | None = None
        self._outcomes: dict[tuple[str, str], deque[bool]] = {}

    def refresh(self) -> None:
        if self._reader is None:
            if not self.lake.exists(EPISODES.name):
                return
            self._reader = IncrementalReader(self.lake.table(EPISODES.name, create=False),
                                             columns=["policy_version", "task", "outcome", "end_time"])
        rows = self._reader.poll()
        if rows.num_rows == 0:
            return
        rows = rows.sort_by([("end_time", "ascending")])
        for version, task, outcome in zip(rows.column("policy_version").to_pylist(), rows.column("task").to_pylist(),
                                          rows.column("outcome").to_pylist(), strict=True):
            if outcome == "ABORTED":
                continue
            key = (str(version), str(task))
            self._outcomes.setdefault(key, deque(maxlen=self.window)).append(outcome == "SUCCESS")

    def tally(self, version: str) -> dict[str, Tally]:
        """Per task: successes and episodes of ``version`` (the most recent ``window`` per task)."""
        return {task: Tally(sum(d), len(d)) for (v, task), d in self._outcomes.items() if v == str(version)}


class PromotionGate:
    """Gated promotion (see the module doc). Not thread-safe: call it from one thread (the publisher's)."""

    def __init__(self, lake: Lakehouse, *, name: str, tracking_uri: str | None, config: GateConfig | None = None,
                 champion_alias: str = "champion", candidate_alias: str = "candidate") -> None:
        self.config = config or GateConfig()
        self.name = name
        self.tracking_uri = tracking_uri
        self.champion_alias = champion_alias
        self.candidate_alias = candidate_alias
        self.live = LiveSuccess(lake, window=self.config.champion_window)
        self.pending: str | None = self._undecided_candidate()
        self.decisions: list[tuple[str, Decision]] = []
        self.last: dict[str, object] = {}

    def _undecided_candidate(self) -> str | None:
        client = _client(self.tracking_uri)
        version = alias_version(client, self.name, self.candidate_alias)
        if version is None or version == alias_version(client, self.name, self.champion_alias):
            return None
        return None if GATE_TAG in client.get_model_version(self.name, version).tags else version

    def offer(self, version: str) -> bool:
        """A newly registered version: it becomes the candidate unless one is being judged."""
        if self.pending is not None:
            return False
        promote(version, name=self.name, tracking_uri=self.tracking_uri, alias=self.candidate_alias,
                reason="candidate")
        self.pending = version
        return True

    def check(self) -> Decision | None:
        """Judge the pending candidate on the live episodes so far; None when there is none."""
        if self.pending is None:
            return None
        self.live.refresh()
        client = _client(self.tracking_uri)
        champion = alias_version(client, self.name, self.champion_alias)
        cand_tally = self.live.tally(self.pending)
        champ_tally = self.live.tally(champion) if champion is not None else None
        decision, cand_rate, champ_rate = gate_decision(cand_tally, champ_tally, min_episodes=self.config.min_episodes,
                                                        tolerance=self.config.tolerance)
        self.last = {"candidate": self.pending, "champion": champion, "decision": decision,
                     "candidate_episodes": sum(t.episodes for t in cand_tally.values()),
                     "candidate_success": cand_rate, "champion_success": champ_rate}
        if decision == "wait":
            return decision
        client.set_model_version_tag(self.name, self.pending, GATE_TAG, json.dumps({**self.last, "at": time.time()}))
        if decision == "promote":
            if pinned(name=self.name, tracking_uri=self.tracking_uri):
                log.warning("candidate %s passed the gate, but the champion is pinned; not promoted", self.pending)
            else:
                promote(self.pending, name=self.name, tracking_uri=self.tracking_uri, alias=self.champion_alias,
                        reason=f"gate: {cand_rate:.3f} vs {champ_rate}")
        log.info("gate: %s %s (candidate %.3f, champion %s)", decision, self.pending, cand_rate, champ_rate)
        self.decisions.append((self.pending, decision))
        self.pending = None
        return decision
