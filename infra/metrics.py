"""Prometheus endpoints of SOP's long-running processes (processor, learner, actors), and reading them back.

Each process part keeps its own :class:`prometheus_client.CollectorRegistry` (never the global default: tests run
several parts in one interpreter) and serves it with prometheus_client's own HTTP server::

    registry = CollectorRegistry()
    collector = SnapshotCollector(families)          # families(snapshot) -> metric families (pure)
    registry.register(collector)
    endpoint = MetricsEndpoint(registry, role="processor", name="sop-processor@host-123", host="127.0.0.1",
                               port=0, announce_dir=run_dir / "metrics").start()   # port 0: a free one
    collector.publish({"steps_in": 10, ...})         # from the owner's own thread, whenever it likes
    endpoint.url                                     # http://127.0.0.1:PORT/metrics
    endpoint.close()                                 # stops serving, removes the announcement

Counts a process already keeps (the processor machine's counters, an actor's status, the learner's status) are
served through a :class:`SnapshotCollector`: the owner publishes a plain snapshot from its own thread and a scrape
reads the latest one, so the HTTP thread never reads state while it changes. Timings are prometheus_client
histograms, observed where they are measured.

The announcement (``<run dir>/metrics/<role>-<name>-<pid>.json``: role, name, url, pid, host) is how `sop status`
finds the endpoints of the processes of this run directory; a site's Prometheus is given fixed ports instead
(docs/deploy.md). :func:`scrape` reads an endpoint into a :class:`Scrape`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

OFF = "off"  # a port setting that serves nothing
_NAME = re.compile(r"[^A-Za-z0-9_.@-]+")


class MetricsPortError(RuntimeError):
    """The endpoint could not listen where its setting says; the message names the setting."""


def new_registry() -> CollectorRegistry:
    """A registry of its own for one process part, with the process's CPU, memory and open files."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


class SnapshotCollector(Collector):
    """Serves ``families(snapshot)`` of the latest snapshot published (nothing before the first one)."""

    def __init__(self, families: Callable[[Mapping[str, Any]], Iterable[Metric]]) -> None:
        self._families = families
        self._snapshot: Mapping[str, Any] | None = None

    def publish(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the snapshot (one reference assignment: a scrape sees the old one or the new one)."""
        self._snapshot = snapshot

    @property
    def snapshot(self) -> Mapping[str, Any] | None:
        return self._snapshot

    def collect(self) -> Iterable[Metric]:
        snapshot = self._snapshot
        return [] if snapshot is None else list(self._families(snapshot))

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on the snapshot; nothing to check at registration


def version_number(version: object) -> float:
    """A registry version as a gauge value: ``"12"`` -> 12.0; None or anything not a number -> NaN."""
    try:
        return float(str(version)) if version is not None else math.nan
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class Announcement:
    role: str
    name: str
    url: str
    pid: int
    host: str
    started_at: float
    path: Path

    @property
    def alive(self) -> bool:
        """False when it was announced on this host by a process that is gone (SIGKILLed, say)."""
        if self.host != socket.gethostname():
            return True  # not ours to judge: try the URL
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def announcements(directory: Path) -> list[Announcement]:
    """The endpoints announced in ``directory``, by role and name (unreadable files are skipped)."""
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            d = json.loads(path.read_text())
            out.append(Announcement(role=str(d["role"]), name=str(d["name"]), url=str(d["url"]), pid=int(d["pid"]),
                                    host=str(d["host"]), started_at=float(d["started_at"]), path=path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda a: (a.role, a.name, a.started_at))


class MetricsEndpoint:
    """prometheus_client's HTTP server for one registry, announced in ``announce_dir`` (None: not announced)."""

    def __init__(self, registry: CollectorRegistry, *, role: str, name: str, host: str, port: int,
                 announce_dir: Path | None = None, setting: str = "the metrics port") -> None:
        if not 0 <= port < 65536:
            raise MetricsPortError(f"{setting}: {port} is not a port (0 = any free port)")
        self.registry, self.role, self.name = registry, role, name
        self.host, self.port = host, port
        self.announce_dir = announce_dir
        self.setting = setting
        self._server: Any = None
        self.announcement: Path | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsEndpoint:
        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(f"{self.setting}: cannot listen on {self.host}:{self.port} ({exc}); "
                                   f"choose another port, 0 for any free one, or 'off'") from None
        self.port = int(self._server.server_port)
        if self.announce_dir is not None:
            self.announce_dir.mkdir(parents=True, exist_ok=True)
            self.announcement = self.announce_dir / f"{self.role}-{_NAME.sub('_', self.name)}-{os.getpid()}.json"
            tmp = self.announcement.with_name(f".{self.announcement.name}.tmp")
            tmp.write_text(json.dumps({"role": self.role, "name": self.name, "url": self.url, "pid": os.getpid(),
                                       "host": socket.gethostname(), "started_at": time.time()}))
            os.replace(tmp, self.announcement)
        return self

    def close(self) -> None:
        if self.announcement is not None:
            with contextlib.suppress(OSError):
                self.announcement.unlink()
            self.announcement = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetricsEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(registry: CollectorRegistry, *, role: str, name: str, host: str, port: int | str,
          announce_dir: Path | None, setting: str) -> MetricsEndpoint | None:
    """Start an endpoint as a port setting says: ``"off"`` -> None, 0 -> any free port, N -> port N."""
    if port == OFF:
        return None
    return MetricsEndpoint(registry, role=role, name=name, host=host, port=int(port), announce_dir=announce_dir,
                           setting=setting).start()


# -- reading an endpoint back ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


class Scrape:
    """The samples of one scrape, by sample name (counters end in ``_total``, histograms in ``_bucket`` ...)."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = list(samples)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(Sample(s.name, dict(s.labels), float(s.value))
                   for family in text_string_to_metric_families(text) for s in family.samples)

    def _matching(self, name: str, labels: Mapping[str, str]) -> list[Sample]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The sum of the samples of ``name`` whose labels include ``labels`` (``default`` when none)."""
        found = self._matching(name, labels)
        return sum(s.value for s in found) if found else default

    def by(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``label``'s value -> the sum of the samples of ``name`` with it."""
        out: dict[str, float] = {}
        for s in self._matching(name, labels):
            if label in s.labels:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
        return out

    def quantile(self, q: float, histogram: str, **labels: str) -> float | None:
        """An estimate of the ``q`` quantile of a histogram from its buckets (as PromQL's histogram_quantile:
        linear inside the bucket); None without observations."""
        buckets: dict[float, float] = {}
        for s in self._matching(f"{histogram}_bucket", labels):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
        return histogram_quantile(q, sorted(buckets.items()))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``buckets``: (upper bound, cumulative count) sorted by bound, the last one +Inf. The quantile estimate, the
    highest finite bound when it falls in the +Inf bucket, None when nothing was observed."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def scrape(url: str, *, timeout_s: float = 2.0) -> Scrape:
    """GET ``url`` and parse it (``OSError`` when it does not answer)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own endpoints
        return Scrape.parse(response.read().decode())
