"""The `sop` side of the Prometheus endpoints (:mod:`infra.metrics`): starting one as a command's settings say, the
ports `sop run` and `sop fleet` give their children, and the key figures `sop status` shows per process.

    endpoint = serve_metrics(registry, settings=settings, role="actor", name="actor-00",
                             port=actor_settings.actor_metrics_port, setting="SOP_ACTOR_METRICS_PORT")
    child_ports(9200, 2)        # [9200, 9201]: fixed ports never collide between children
    rows = status_rows(announcement, scrape(announcement.url))
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click

from infra.metrics import OFF, Announcement, MetricsEndpoint, MetricsPortError, Scrape, serve
from sop.settings import Settings


def announce_dir(settings: Settings) -> Path:
    """Where the processes of this run directory announce their endpoints (what `sop status` reads)."""
    return settings.run_path / "metrics"


def serve_metrics(registry: Any, *, settings: Settings, role: str, name: str, port: int | str,
                  setting: str) -> MetricsEndpoint | None:
    """Serve ``registry`` on ``port`` (``"off"``: None), announced in the run directory; a port that cannot be
    had stops the command, naming ``setting``."""
    try:
        return serve(registry, role=role, name=name, host=settings.metrics_host, port=port,
                     announce_dir=announce_dir(settings), setting=setting)
    except MetricsPortError as exc:
        raise click.ClickException(str(exc)) from None


def child_ports(port: int | str, n: int) -> list[int | str]:
    """The ports of ``n`` children of one kind: a fixed port N gives N, N+1, …; 0 (any free port) and off stay."""
    if port == OFF or port == 0:
        return [port] * n
    base = int(port)
    if base + n - 1 >= 65536:
        raise click.ClickException(f"metrics ports {base}..{base + n - 1} do not fit below 65536")
    return [base + i for i in range(n)]


def plan_ports(kinds: dict[str, tuple[int | str, int]]) -> dict[str, list[int | str]]:
    """kind -> (port setting, how many children) to kind -> each child's port (:func:`child_ports`); a fixed port
    given to two children (``SOP_PROCESSOR_METRICS_PORT=9100`` with ``SOP_ACTOR_METRICS_PORT=9101`` and two
    processors, say) stops the command."""
    plan = {kind: child_ports(port, n) for kind, (port, n) in kinds.items()}
    owner: dict[int, str] = {}
    for kind, ports in plan.items():
        for i, port in enumerate(ports):
            if isinstance(port, int) and port > 0:
                if port in owner:
                    raise click.ClickException(f"metrics port {port} would serve both {owner[port]} and {kind} {i}: "
                                               f"give each kind of process its own range")
                owner[port] = f"{kind} {i}"
    return plan


# -- sop status ------------------------------------------------------------------------------------------------
def _n(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def _s(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 1e3:.0f}ms" if value < 1 else f"{value:.2f}s"


def _version(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"v{value:.0f}"


def _joined(values: dict[str, float], fmt: Any = _n) -> str:
    return " · ".join(f"{k} {fmt(v)}" for k, v in sorted(values.items()) if v)


def _mean(m: Scrape, histogram: str) -> float | None:
    count = m.value(f"{histogram}_count")
    return None if not count else (m.value(f"{histogram}_sum") or 0.0) / count


def _uptime(m: Scrape) -> float | None:
    started = m.value("process_start_time_seconds")
    return None if started is None else max(1e-9, time.time() - started)


def status_rows(a: Announcement, m: Scrape) -> list[tuple[str, str, str]]:
    """(part, state, what) rows of `sop status` for one endpoint's scrape."""
    head = f"{a.role} {a.name}"
    if a.role == "processor":
        return _processor_rows(head, a, m)
    if a.role == "learner":
        return _learner_rows(head, a, m)
    if a.role == "actor":
        return _actor_rows(head, a, m)
    return [(head, "running", a.url)]


def _processor_rows(head: str, a: Announcement, m: Scrape) -> list[tuple[str, str, str]]:
    events_in = m.by("sop_processor_events_in_total", "topic")
    rows_written = m.by("sop_processor_rows_written_total", "table")
    closed = m.by("sop_processor_episodes_closed_total", "reason")
    uptime = _uptime(m)
    steps = sum(v for t, v in events_in.items() if t.endswith("steps"))
    rate = f"{steps / uptime:,.0f} steps/s since start · " if uptime else ""
    p50 = m.quantile(0.5, "sop_processor_commit_latency_seconds")
    p99 = m.quantile(0.99, "sop_processor_commit_latency_seconds")
    latency = f"commit p50 {_s(p50)} p99 {_s(p99)}" if p50 is not None else "no commits yet"
    out = [(head, "running", a.url),
           ("  in", _n(sum(events_in.values())), _joined(events_in)),
           ("  stored", f"{_n(sum(rows_written.values()))} rows",
            f"{rate}{_n(sum(closed.values()))} episodes closed ({_joined(closed) or 'none'}) · "
            f"{_n(m.value('sop_processor_open_episodes'))} open · {latency}")]
    dead = m.by("sop_processor_dead_letters_total", "reason")
    if any(dead.values()):
        out.append(("  dead letters", _n(sum(dead.values())), _joined(dead)))
    counted = m.by("sop_processor_events_counted_total", "kind")
    if any(counted.values()):
        out.append(("  counted, not stored", _n(sum(counted.values())), _joined(counted)))
    lag: dict[str, list[str]] = {}
    total: dict[str, float] = {}
    for s in m.samples:
        if s.name == "sop_processor_consumer_lag_messages":
            lag.setdefault(s.labels["topic"], []).append(f"p{s.labels['partition']}:{s.value:.0f}")
            total[s.labels["topic"]] = total.get(s.labels["topic"], 0.0) + s.value
    for topic in sorted(lag):
        out.append((f"  lag {topic}", _n(total[topic]), " ".join(lag[topic])))
    return out


def _learner_rows(head: str, a: Announcement, m: Scrape) -> list[tuple[str, str, str]]:
    step_mean = _mean(m, "sop_learner_step_seconds")
    wait_mean = _mean(m, "sop_learner_data_wait_seconds")
    wait = f" (data wait {_s(wait_mean)})" if wait_mean is not None else ""
    omega = m.by("sop_learner_omega_on", "task")
    quarantined = m.by("sop_learner_quarantined_rows_total", "reason")
    out = [(head, "running", a.url),
           ("  steps", _n(m.value("sop_learner_step")),
            f"{_n(m.value('sop_learner_steps_total'))} here · step {_s(step_mean)}{wait} · last registered "
            f"{_version(m.value('sop_learner_policy_version_registered'))} "
            f"({_n(m.value('sop_learner_versions_registered_total'))} here, "
            f"{_n(m.value('sop_learner_publish_failures_total'))} failed)"),
           ("  ω_on", "", " ".join(f"{t.removesuffix('-v3')}={w:.2f}" for t, w in sorted(omega.items())) or "-")]
    if any(quarantined.values()):
        out.append(("  quarantined rows", _n(sum(quarantined.values())), _joined(quarantined)))
    return out


def _actor_rows(head: str, a: Announcement, m: Scrape) -> list[tuple[str, str, str]]:
    paused = m.value("sop_actor_paused") == 1
    target = m.value("sop_actor_control_rate_target_hz")
    achieved = m.value("sop_actor_control_rate_hz")
    rate = f"{achieved or 0:.1f} Hz" + (f" of {target:.0f}" if target else " (free)")
    refused = m.value("sop_actor_refused_versions_total") or 0
    pending = m.value("sop_actor_spool_pending_messages") or 0
    errors = m.value("sop_actor_publish_errors_total") or 0
    extra = [f"{refused:.0f} versions refused" if refused else "",
             f"spool {pending:,.0f} waiting" if pending else "", f"{errors:.0f} publish errors" if errors else ""]
    return [(head, "paused (spool full)" if paused else "running", a.url),
            ("  acting", _version(m.value("sop_actor_policy_version")),
             " · ".join(x for x in [rate, f"{_n(m.value('sop_actor_episodes_total'))} episodes",
                                    f"{_n(m.value('sop_actor_steps_total'))} steps",
                                    f"{_n(m.value('sop_actor_events_delivered_total'))} acked", *extra] if x))]
