"""An actor's Prometheus metrics: what a site scrapes from each robot process (`sop actor`).

:func:`actor_families` maps the status the robot process already keeps (:class:`producers.fleet.ActorStatus`, the
publisher's :class:`producers.publisher.PublisherStats`, the refusals of the registry source) onto metric
families; it is pure. :class:`ActorMetrics` holds the registry; :func:`producers.actor_runner.run_robot_process`
publishes a snapshot with every status update.

| metric | type | labels |
|---|---|---|
| ``sop_actor_policy_version`` | gauge | the version that acted the latest step (NaN: none yet) |
| ``sop_actor_control_rate_hz`` / ``sop_actor_control_rate_target_hz`` | gauge | steps/s over the last seconds / the rate asked for (0: free) |
| ``sop_actor_steps_total``, ``…_human_steps_total`` | counter | steps taken, under the operator's control |
| ``sop_actor_episodes_total`` | counter | episodes ended; ``…_episodes_succeeded_total``, ``…_episodes_aborted_total`` |
| ``sop_actor_takeovers_total`` | counter | operator takeovers |
| ``sop_actor_version_switches_total`` | counter | versions switched to between episodes |
| ``sop_actor_refused_versions_total`` | counter | versions refused (did not load, wrong shape, …) |
| ``sop_actor_events_published_total``, ``…_events_delivered_total``, ``…_publish_errors_total`` | counter | records handed to the publisher / acknowledged by Kafka / failed |
| ``sop_actor_events_in_flight`` | gauge | records held in RAM only |
| ``sop_actor_spool_pending_messages``, ``sop_actor_spool_bytes`` | gauge | the on-disk spool |
| ``sop_actor_spool_spills_total`` | counter | times the publisher switched to the spool |
| ``sop_actor_paused`` | gauge | 1 while a full spool pauses the robot |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from infra.metrics import SnapshotCollector, new_registry, version_number
from producers.fleet import ActorStatus
from producers.publisher import PublisherStats


def actor_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Metric families of one snapshot ``{"status": ActorStatus fields, "publisher": PublisherStats fields,
    "refusals": n, "control_hz": target or None}``."""
    st, pub = snap.get("status") or {}, snap.get("publisher") or {}
    out: list[Metric] = [
        GaugeMetricFamily("sop_actor_policy_version", "The policy version that acted the latest step (NaN: none)",
                          value=version_number(st.get("version"))),
        GaugeMetricFamily("sop_actor_control_rate_hz", "Steps per second achieved over the last seconds",
                          value=st.get("steps_per_s") or 0.0),
        GaugeMetricFamily("sop_actor_control_rate_target_hz", "The control rate asked for (0: as fast as possible)",
                          value=snap.get("control_hz") or 0.0),
        GaugeMetricFamily("sop_actor_events_in_flight", "Records held only in RAM (not acknowledged, failed or "
                          "spooled)", value=max(0, pub.get("produced", 0) + pub.get("recovered", 0)
                                                - pub.get("delivered", 0) - pub.get("failed", 0)
                                                - pub.get("spool_pending", 0))),
        GaugeMetricFamily("sop_actor_spool_pending_messages", "Records in the on-disk spool not acknowledged yet",
                          value=pub.get("spool_pending", 0)),
        GaugeMetricFamily("sop_actor_spool_bytes", "Bytes of the on-disk spool", value=pub.get("spool_bytes", 0)),
        GaugeMetricFamily("sop_actor_paused", "1 while a full spool pauses the robot between steps",
                          value=1.0 if pub.get("paused") else 0.0),
        CounterMetricFamily("sop_actor_refused_versions", "Policy versions refused (did not load, wrong shape, ...)",
                            value=snap.get("refusals", 0)),
        CounterMetricFamily("sop_actor_version_switches", "Policy versions switched to between episodes",
                            value=len(st.get("switches") or ())),
    ]
    for source, key, name, doc in (
            (st, "steps", "sop_actor_steps", "Steps taken"),
            (st, "human_steps", "sop_actor_human_steps", "Steps under the operator's control"),
            (st, "episodes", "sop_actor_episodes", "Episodes ended"),
            (st, "successes", "sop_actor_episodes_succeeded", "Episodes ended in success"),
            (st, "aborted", "sop_actor_episodes_aborted", "Episodes cut short (a stop, an error)"),
            (st, "takeovers", "sop_actor_takeovers", "Operator takeovers"),
            (pub, "produced", "sop_actor_events_published", "Records handed to the publisher"),
            (pub, "delivered", "sop_actor_events_delivered", "Records Kafka acknowledged (drained ones included)"),
            (pub, "failed", "sop_actor_publish_errors", "Records whose delivery failed for good"),
            (pub, "spills", "sop_actor_spool_spills", "Times the publisher switched to the spool")):
        out.append(CounterMetricFamily(name, doc, value=source.get(key, 0)))
    return out


class ActorMetrics:
    """One robot process's registry; :meth:`publish` with every status."""

    def __init__(self, *, control_hz: float | None = None) -> None:
        self.control_hz = control_hz
        self.registry = new_registry()
        self.snapshot = SnapshotCollector(actor_families)
        self.registry.register(self.snapshot)

    def publish(self, status: ActorStatus, publisher: PublisherStats | None, *, refusals: int) -> None:
        self.snapshot.publish({"status": asdict(status), "publisher": asdict(publisher) if publisher else {},
                               "refusals": refusals, "control_hz": self.control_hz})
