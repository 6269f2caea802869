"""Moving the alias the fleet follows: promotion with a history, roll-back, and the canary gate.

**History.** Every move of an alias made here, every roll-back and every gate decision is one entry of an
append-only log kept as tags of the registered model, one tag per entry (``sop.history.<ns>.<random>`` →
JSON ``{"event", "alias", "from", "to", "reason", "at", …}``). A writer only ever adds a tag of its own, so
two writers at once (the learner promoting, an operator rolling back) cannot lose each other's entries, as
the read-modify-write of one JSON list could. The roll-back stack (:func:`champion_history`) is a replay of
that log (:func:`replay_history`, a pure function): a move pushes the version it replaced, a roll-back pops
down to the version it returned to. The promoted version is also tagged with when, why and what it replaced
(``sop.promoted``). Registries written before the log keep their list in ``sop.champion_history``: it is the
bottom of the stack, and where the learner prunes the log's oldest entries it folds them into that list.

**Pin.** A roll-back *pins* the champion (``sop.champion_pinned``) before it moves the alias. The learner
(auto mode, and the gate) never moves a pinned champion, and checks the pin again after moving it: if a
roll-back pinned it in between, the learner puts the alias back on the pinned version. Whatever the order of
the two processes' requests, the champion ends on the version the roll-back chose (``sop promote`` unpins).

**The gate** (gated mode): the learner moves ``candidate`` to a new version only when no candidate is being
judged; actors that follow ``candidate`` (a canary share of the fleet, ``sop run --canary-share``) play live
episodes with it, while the rest of the fleet plays the champion. A candidate can also be put up by hand
(``sop promote --alias candidate --version V``); the gate judges it next. Once the candidate has
``min_episodes`` closed, non-aborted episodes in the Delta ``episodes`` table, :func:`gate_decision` compares
it with the champion (the champion's most recent ``champion_window`` episodes per task) on two metrics:

- *autonomous success*: the share of episodes that succeeded with no human step (``num_interventions = 0``
  and ``human_steps = 0``); the operator's rescues do not count;
- *takeover rate*: the share of episodes in which the operator took over (lower is better).

The rule, per metric: a one-sided test that the candidate is worse than the champion by more than the margin
δ (``tolerance``), on the difference of the per-task rates averaged over the tasks both ran (so a different
task mix does not flatter either), each rate with the Agresti–Caffo adjustment (one success and one failure
added per task and policy, so 0/n and n/n have a variance):

    d = mean_t (p̃_cand,t − p̃_champ,t)      (for the takeover rate: champion minus candidate)
    SE = sqrt(Σ_t (p̃_cand,t(1−p̃_cand,t)/(n_cand,t+2) + p̃_champ,t(1−p̃_champ,t)/(n_champ,t+2))) / T
    z = (d + δ) / SE

The candidate is **rejected** when z < −z₁₋α on either metric (significantly worse at level α, default 0.05),
and **promoted** otherwise; it is promoted too when the champion has fewer than ``min_episodes`` episodes
(no evidence against it). It is a non-regression gate: a candidate no worse than the champion passes at
once, a clear regression is caught after ``min_episodes``, and a small regression may pass when the episodes
are too few to show it. Either way the version is tagged ``sop.gate`` (the decision and its statistics), the
decision is an entry of the history log, and the next version becomes the candidate.

**Registry garbage collection** (:class:`RegistryGC`, the rule :func:`versions_to_delete`): see ``GC_DOC`` below.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.registry import registry_client
from lakehouse import EPISODES, IncrementalReader, Lakehouse
from learner.config import ConfigError

log = logging.getLogger("sop.learner.promotion")

HISTORY_TAG = "sop.champion_history"  # the list of registries before the log; the bottom of the stack
LOG_PREFIX = "sop.history."
PINNED_TAG = "sop.champion_pinned"
PROMOTED_TAG = "sop.promoted"
GATE_TAG = "sop.gate"
MAX_HISTORY = 100  # roll-back depth
MAX_LOG = 400  # log entries kept when the learner prunes (a registered model's tags come back on every read)

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


def _model_tags(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        return dict(client.get_registered_model(name).tags)
    except MlflowException:
        return {}


# ---- the history log (pure parts first) --------------------------------------------------------------------
def _legacy_tag(alias: str) -> str:
    return HISTORY_TAG if alias == "champion" else f"{HISTORY_TAG}.{alias}"


def log_entries(tags: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """The history log in the registered model's tags, oldest first: (tag key, entry)."""
    out = []
    for key in sorted(k for k in tags if k.startswith(LOG_PREFIX)):
        try:
            entry = json.loads(tags[key])
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append((key, entry))
    return out


def replay_history(base: Sequence[str], entries: Iterable[Mapping[str, Any]], *, alias: str = "champion"
                   ) -> list[str]:
    """The roll-back stack of ``alias`` (earlier versions, oldest first) after the log ``entries``.

    A ``move`` pushes the version it replaced; a ``rollback`` to V pops everything from the newest V up (a second
    roll-back to the same V, made concurrently from the same state, finds no V and changes nothing)."""
    stack = [str(v) for v in base]
    for e in entries:
        if e.get("alias") != alias:
            continue
        before, to = e.get("from"), e.get("to")
        if e.get("event") == "move" and before is not None and str(before) != str(to):
            stack.append(str(before))
        elif e.get("event") == "rollback" and to is not None and str(to) in stack:
            del stack[len(stack) - 1 - stack[::-1].index(str(to)):]
    return stack[-MAX_HISTORY:]


def _legacy_list(tags: Mapping[str, str], alias: str) -> list[str]:
    try:
        return [str(v) for v in json.loads(tags.get(_legacy_tag(alias), "[]"))]
    except json.JSONDecodeError:
        return []


def _history(client: MlflowClient, name: str, alias: str) -> list[str]:
    tags = _model_tags(client, name)
    return replay_history(_legacy_list(tags, alias), (e for _, e in log_entries(tags)), alias=alias)


def champion_history(*, name: str, tracking_uri: str | None, alias: str = "champion") -> list[str]:
    """Earlier champions, oldest first (what :func:`rollback` returns to, from the end)."""
    return _history(_client(tracking_uri), name, alias)


def history_log(*, name: str, tracking_uri: str | None) -> list[dict[str, Any]]:
    """Every entry of the history log (moves, roll-backs, gate decisions), oldest first."""
    return [e for _, e in log_entries(_model_tags(_client(tracking_uri), name))]


def append_log(client: MlflowClient, name: str, entry: Mapping[str, Any]) -> str:
    """Add one entry to the log under a tag of its own (never overwritten); returns its key."""
    now_ns = time.time_ns()
    key = f"{LOG_PREFIX}{now_ns:020d}.{uuid.uuid4().hex[:8]}"
    client.set_registered_model_tag(name, key, json.dumps({"at": now_ns / 1e9, **entry}, default=str))
    return key


def prune_log(client: MlflowClient, name: str, *, keep: int = MAX_LOG) -> int:
    """Fold the oldest entries beyond ``keep`` into the bottom-of-stack lists and delete them; returns how many.

    Only the learner calls this (one writer prunes), so the fold's read-modify-write has no concurrent twin."""
    tags = _model_tags(client, name)
    entries = log_entries(tags)
    if len(entries) <= keep:
        return 0
    old = entries[: len(entries) - keep]
    for alias in sorted({str(e.get("alias")) for _, e in old if e.get("alias")}):
        folded = replay_history(_legacy_list(tags, alias), (e for _, e in old), alias=alias)
        client.set_registered_model_tag(name, _legacy_tag(alias), json.dumps(folded))
    for key, _ in old:
        with contextlib.suppress(MlflowException):  # deleted already
            client.delete_registered_model_tag(name, key)
    return len(old)


# ---- moving aliases -----------------------------------------------------------------------------------------
def pinned(*, name: str, tracking_uri: str | None) -> str | None:
    """The version the champion is pinned to by a roll-back, or None."""
    return _model_tags(_client(tracking_uri), name).get(PINNED_TAG) or None


def promote(version: str, *, name: str, tracking_uri: str | None, alias: str = "champion", reason: str = "manual",
            pin: bool | None = None, extra: Mapping[str, Any] | None = None) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed at before (None if none).

    The move is logged before the alias moves (a roll-back logged after it always sees it). ``pin=True`` pins
    the champion, ``False`` unpins it, ``None`` leaves the pin as it is.
    """
    client = _client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise PromotionError(f"{name} has no version {version!r}; list versions in the MLflow UI or with "
                             f"`mlflow models` / MlflowClient.search_model_versions") from None
    previous = alias_version(client, name, alias)
    if previous != str(version):
        append_log(client, name, {"event": "move", "alias": alias, "from": previous, "to": str(version),
                                  "reason": reason, **(extra or {})})
        client.set_registered_model_alias(name, alias, str(version))
        client.set_model_version_tag(name, str(version), PROMOTED_TAG if alias == "champion" else
                                     f"{PROMOTED_TAG}.{alias}",
                                     json.dumps({"at": time.time(), "reason": reason, "replaced": previous}))
    if pin is True:
        client.set_registered_model_tag(name, PINNED_TAG, str(version))
    elif pin is False:
        client.set_registered_model_tag(name, PINNED_TAG, "")
    return previous


def promote_unless_pinned(version: str, *, name: str, tracking_uri: str | None, alias: str = "champion",
                          reason: str, extra: Mapping[str, Any] | None = None) -> bool:
    """The learner's promotion (auto mode and the gate): not while the champion is pinned, and undone when a
    roll-back pinned it while this moved it (module doc). True when ``version`` is the champion afterwards."""
    client = _client(tracking_uri)
    if _model_tags(client, name).get(PINNED_TAG):
        return False
    promote(version, name=name, tracking_uri=tracking_uri, alias=alias, reason=reason, extra=extra)
    pin = _model_tags(client, name).get(PINNED_TAG)
    if pin and pin != str(version):
        log.warning("a roll-back pinned %s@%s to %s while version %s was being promoted: back to %s", name, alias,
                    pin, version, pin)
        client.set_registered_model_alias(name, alias, pin)
        append_log(client, name, {"event": "restore", "alias": alias, "from": str(version), "to": pin,
                                  "reason": "pinned by a roll-back during the promotion"})
        return False
    try:
        prune_log(client, name)
    except MlflowException as exc:
        log.warning("pruning the history log failed (tried again at the next promotion): %s", exc)
    return True


def rollback(*, name: str, tracking_uri: str | None, alias: str = "champion", pin: bool = True) -> tuple[str, str]:
    """Move ``alias`` back to the previous champion; returns (from, to).

    Pins the champion first (unless ``pin=False``), so a learner promoting at the same time leaves it alone or
    puts it back; then moves the alias, then logs the roll-back."""
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
        if pin:
            client.set_registered_model_tag(name, PINNED_TAG, target)
        client.set_registered_model_alias(name, alias, target)
        append_log(client, name, {"event": "rollback", "alias": alias, "from": current, "to": target,
                                  "reason": "rollback"})
        client.set_model_version_tag(name, target, f"{PROMOTED_TAG}" if alias == "champion" else
                                     f"{PROMOTED_TAG}.{alias}",
                                     json.dumps({"at": time.time(), "reason": "rollback", "replaced": current}))
        return str(current), target
    raise PromotionError(f"{name}@{alias} has no earlier version to roll back to (history is empty); "
                         f"use `sop promote --version V` to choose one")


# ---- the gate rule (pure) -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GateConfig:
    min_episodes: int = 20  # closed episodes of the candidate before it is judged
    tolerance: float = 0.0  # the margin δ: the candidate may be this much worse than the champion and pass
    alpha: float = 0.05  # level of the one-sided test per metric
    champion_window: int = 200  # the champion's most recent episodes per task that count
    check_interval_s: float = 5.0
    # registry garbage collection after gate checks (RegistryGC below): keep the newest N (0 = off)
    gc_keep_last: int = 0
    gc_active_s: float = 900.0
    gc_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.min_episodes < 1:
            raise ConfigError(f"GateConfig.min_episodes must be >= 1; got {self.min_episodes}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"GateConfig.tolerance must be in [0, 1); got {self.tolerance}")
        if not 0.0 < self.alpha < 0.5:
            raise ConfigError(f"GateConfig.alpha must be in (0, 0.5); got {self.alpha}")
        if self.champion_window < 1:
            raise ConfigError(f"GateConfig.champion_window must be >= 1; got {self.champion_window}")
        if not self.check_interval_s > 0:
            raise ConfigError(f"GateConfig.check_interval_s must be > 0; got {self.check_interval_s}")
        if self.gc_keep_last < 0:
            raise ConfigError(f"GateConfig.gc_keep_last must be >= 0 (0 = no collection); got {self.gc_keep_last}")


@dataclass(frozen=True)
class Tally:
    """One policy version's closed episodes of one task."""

    episodes: int
    autonomous: int  # succeeded with no human step
    takeovers: int  # the operator took over at least once
    successes: int = 0  # raw success, the operator's rescues counted (shown, not judged)

    def rate(self, metric: str) -> float:
        return getattr(self, metric) / self.episodes if self.episodes else 0.0


METRICS = (("autonomous", +1), ("takeovers", -1))  # (Tally field, +1: higher is better, -1: lower is better)


@dataclass(frozen=True)
class MetricTest:
    metric: str
    candidate: float  # per-task rates averaged over the shared tasks (unadjusted)
    champion: float
    z: float  # (d + δ) / SE, d = the candidate's advantage; below -z_{1-α}: significantly worse
    worse: bool


@dataclass(frozen=True)
class GateVerdict:
    decision: Decision
    candidate_episodes: int
    champion_episodes: int
    tasks: tuple[str, ...] = ()  # the tasks compared
    tests: tuple[MetricTest, ...] = ()
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tests": [asdict(t) for t in self.tests], "tasks": list(self.tasks)}


def metric_test(candidate: Mapping[str, Tally], champion: Mapping[str, Tally], tasks: Sequence[str], metric: str,
                sign: int, *, margin: float, alpha: float) -> MetricTest:
    """The one-sided Agresti–Caffo test of one metric over ``tasks`` (module doc)."""
    diff = var = 0.0
    for t in tasks:
        c, h = candidate[t], champion[t]
        pc = (getattr(c, metric) + 1) / (c.episodes + 2)
        ph = (getattr(h, metric) + 1) / (h.episodes + 2)
        diff += sign * (pc - ph)
        var += pc * (1 - pc) / (c.episodes + 2) + ph * (1 - ph) / (h.episodes + 2)
    n = len(tasks)
    d, se = diff / n, math.sqrt(var) / n
    z = (d + margin) / se
    return MetricTest(metric, sum(candidate[t].rate(metric) for t in tasks) / n,
                      sum(champion[t].rate(metric) for t in tasks) / n, z, z < -NormalDist().inv_cdf(1 - alpha))


def gate_decision(candidate: Mapping[str, Tally], champion: Mapping[str, Tally] | None, *, min_episodes: int,
                  tolerance: float = 0.0, alpha: float = 0.05) -> GateVerdict:
    """Whether to promote the candidate, by the rule of the module doc."""
    n_cand = sum(t.episodes for t in candidate.values())
    n_champ = sum(t.episodes for t in (champion or {}).values())
    if n_cand < min_episodes:
        return GateVerdict("wait", n_cand, n_champ, why=f"{n_cand} of {min_episodes} episodes")
    if champion is None or n_champ < min_episodes:
        return GateVerdict("promote", n_cand, n_champ, why="the champion has too few episodes to judge against")
    shared = tuple(sorted(t for t, c in candidate.items() if c.episodes and t in champion and champion[t].episodes))
    if not shared:
        return GateVerdict("promote", n_cand, n_champ, why="no task played by both")
    tests = tuple(metric_test(candidate, champion, shared, m, sign, margin=tolerance, alpha=alpha)
                  for m, sign in METRICS)
    worse = [t.metric for t in tests if t.worse]
    if worse:
        return GateVerdict("reject", n_cand, n_champ, shared, tests, why=f"significantly worse on {', '.join(worse)}")
    return GateVerdict("promote", n_cand, n_champ, shared, tests, why="not significantly worse")


# ---- live episodes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Outcome:
    success: bool
    autonomous: bool
    takeover: bool


class LiveSuccess:
    """Outcomes per policy version and task from the ``episodes`` table, read incrementally; and, per actor,
    the versions it played and when (what registry garbage collection keeps, :class:`RegistryGC`).

    ABORTED episodes (a robot stopped or died) say nothing about the policy and are not counted.
    """

    COLUMNS = ["policy_version", "task", "outcome", "end_time", "num_interventions", "human_steps", "actor_id"]

    def __init__(self, lake: Lakehouse, *, window: int = 200) -> None:
        self.lake = lake
        self.window = window
        self._reader: IncrementalReader | None = None
        self._outcomes: dict[tuple[str, str], deque[_Outcome]] = {}
        self.last_played: dict[str, float] = {}  # version -> end time (s) of its newest episode
        self.actor_version: dict[str, tuple[str, float]] = {}  # actor -> (version of its newest episode, end time)

    def refresh(self) -> None:
        if self._reader is None:
            if not self.lake.exists(EPISODES.name):
                return
            self._reader = IncrementalReader(self.lake.table(EPISODES.name, create=False), columns=self.COLUMNS)
        rows = self._reader.poll()
        if rows.num_rows == 0:
            return
        rows = rows.sort_by([("end_time", "ascending")])
        for r in rows.to_pylist():
            version, end = str(r["policy_version"]), r["end_time"].timestamp()
            if r["policy_version"] is not None:
                self.last_played[version] = max(end, self.last_played.get(version, 0.0))
                if end >= self.actor_version.get(r["actor_id"], ("", 0.0))[1]:
                    self.actor_version[r["actor_id"]] = (version, end)
            if r["outcome"] == "ABORTED":
                continue
            helped = (r["num_interventions"] or 0) > 0 or (r["human_steps"] or 0) > 0
            success = r["outcome"] == "SUCCESS"
            self._outcomes.setdefault((version, str(r["task"])), deque(maxlen=self.window)).append(
                _Outcome(success, success and not helped, (r["num_interventions"] or 0) > 0 or helped))

    def tally(self, version: str) -> dict[str, Tally]:
        """Per task: the episodes of ``version`` (the most recent ``window`` per task)."""
        return {task: Tally(len(d), sum(o.autonomous for o in d), sum(o.takeover for o in d), sum(o.success for o in d))
                for (v, task), d in self._outcomes.items() if v == str(version)}


# ---- the gate (thin shell) --------------------------------------------------------------------------------------
@dataclass
class _Decided:
    version: str
    decision: Decision
    at: float
    why: str


class PromotionGate:
    """Gated promotion (see the module doc). Not thread-safe: call it from one thread (the publisher's).

    ``collect``: called after every check (registry garbage collection, :class:`RegistryGC`)."""

    def __init__(self, lake: Lakehouse, *, name: str, tracking_uri: str | None, config: GateConfig | None = None,
                 champion_alias: str = "champion", candidate_alias: str = "candidate",
                 collect: Callable[[PromotionGate], object] | None = None) -> None:
        self.config = config or GateConfig()
        self.name = name
        self.tracking_uri = tracking_uri
        self.champion_alias = champion_alias
        self.candidate_alias = candidate_alias
        self.live = LiveSuccess(lake, window=self.config.champion_window)
        if collect is None and self.config.gc_keep_last > 0:
            collect = RegistryGC(GCConfig(keep_last=self.config.gc_keep_last, active_s=self.config.gc_active_s,
                                          every_s=self.config.gc_every_s),
                                 name=name, tracking_uri=tracking_uri, live=self.live)
        self.collect = collect
        self.pending: str | None = self._undecided_candidate()
        self.decisions: list[tuple[str, Decision]] = []
        self.recent: deque[_Decided] = deque(maxlen=8)
        self.last: dict[str, object] = {}

    def _undecided_candidate(self) -> str | None:
        """What ``candidate`` points at, when that version is not the champion and has not been judged."""
        client = _client(self.tracking_uri)
        version = alias_version(client, self.name, self.candidate_alias)
        if version is None or version == alias_version(client, self.name, self.champion_alias):
            return None
        return None if GATE_TAG in client.get_model_version(self.name, version).tags else version

    def _adopt_hand_set(self) -> None:
        """A candidate put up by hand (``sop promote --alias candidate``) replaces an undecided one of ours."""
        found = self._undecided_candidate()
        if found is not None and found != self.pending:
            log.info("candidate %s was put up by hand; judging it (instead of %s)", found, self.pending)
            self.pending = found

    def offer(self, version: str) -> bool:
        """A newly registered version: it becomes the candidate unless one is being judged."""
        self._adopt_hand_set()
        if self.pending is not None:
            return False
        promote(version, name=self.name, tracking_uri=self.tracking_uri, alias=self.candidate_alias,
                reason="candidate")
        self.pending = version
        return True

    def check(self) -> Decision | None:
        """Judge the pending candidate on the live episodes so far; None when there is none."""
        try:
            return self._check()
        finally:
            if self.collect is not None:
                self.collect(self)

    def _check(self) -> Decision | None:
        self._adopt_hand_set()
        if self.pending is None:
            return None
        self.live.refresh()
        client = _client(self.tracking_uri)
        champion = alias_version(client, self.name, self.champion_alias)
        cand_tally = self.live.tally(self.pending)
        champ_tally = self.live.tally(champion) if champion is not None else None
        verdict = gate_decision(cand_tally, champ_tally, min_episodes=self.config.min_episodes,
                                tolerance=self.config.tolerance, alpha=self.config.alpha)
        tests = {t.metric: t for t in verdict.tests}
        self.last = {"candidate": self.pending, "champion": champion, "decision": verdict.decision,
                     "candidate_episodes": verdict.candidate_episodes, "champion_episodes": verdict.champion_episodes,
                     "min_episodes": self.config.min_episodes, "why": verdict.why,
                     "candidate_autonomous": _rate(cand_tally, "autonomous"),
                     "champion_autonomous": _rate(champ_tally, "autonomous"),
                     "candidate_takeover": _rate(cand_tally, "takeovers"),
                     "champion_takeover": _rate(champ_tally, "takeovers"),
                     "z": {m: round(t.z, 3) for m, t in tests.items()},
                     "recent": [asdict(d) for d in self.recent]}
        if verdict.decision == "wait":
            return verdict.decision
        at = time.time()
        record = {**verdict.as_dict(), "candidate": self.pending, "champion": champion, "at": at,
                  "alpha": self.config.alpha, "tolerance": self.config.tolerance}
        decision: Decision = verdict.decision
        if decision == "promote":  # first, so whoever sees the verdict sees the champion moved
            reason = f"gate: {verdict.why} (candidate {self.pending} vs champion {champion})"
            if not promote_unless_pinned(self.pending, name=self.name, tracking_uri=self.tracking_uri,
                                         alias=self.champion_alias, reason=reason):
                record["pinned"] = True
                log.warning("candidate %s passed the gate, but the champion is pinned; not promoted", self.pending)
        client.set_model_version_tag(self.name, self.pending, GATE_TAG, json.dumps(record, default=str))
        append_log(client, self.name, {"event": "gate", "alias": self.champion_alias, "version": self.pending,
                                       "decision": verdict.decision, "champion": champion, "why": verdict.why,
                                       "z": self.last["z"], "at": at})
        log.info("gate: %s %s (%s)", decision, self.pending, verdict.why)
        self.decisions.append((self.pending, decision))
        self.recent.append(_Decided(self.pending, decision, at, verdict.why))
        self.last.update(decision=decision, recent=[asdict(d) for d in self.recent])
        self.pending = None
        return decision


def _rate(tally: Mapping[str, Tally] | None, metric: str) -> float | None:
    """Per-task rate averaged over the tasks (None: no episodes)."""
    rates = [t.rate(metric) for t in (tally or {}).values() if t.episodes]
    return sum(rates) / len(rates) if rates else None


# ---- registry garbage collection ---------------------------------------------------------------------------
GC_DOC = """Registry garbage collection: delete the ``sop-policy`` versions nobody needs any more.

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

gc_log = logging.getLogger("sop.learner.gc")


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
            gc_log.warning("registry garbage collection failed (tried again later): %s", exc)
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
            gc_log.info("registry gc: deleted %d version(s) of %s (%s), kept %d", len(result.deleted), self.name,
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
        gc_log.info("files of a deleted version stay (%s): %s", source, exc)


def _span(versions: list[int]) -> str:
    return json.dumps(versions) if len(versions) <= 6 else f"v{versions[0]}…v{versions[-1]}"


__all__ = ["GC_DOC", "GATE_TAG", "GCConfig", "GCResult", "RegistryGC", "running_versions", "versions_to_delete", "HISTORY_TAG", "LOG_PREFIX", "PINNED_TAG", "PROMOTED_TAG", "Decision", "GateConfig",
           "GateVerdict", "LiveSuccess", "MetricTest", "PromotionError", "PromotionGate", "Tally", "alias_version",
           "append_log", "champion_history", "gate_decision", "history_log", "log_entries", "metric_test", "pinned",
           "promote", "promote_unless_pinned", "prune_log", "replay_history", "rollback"]
