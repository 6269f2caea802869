"""`sop replay`: re-process Kafka history into fresh tables, publish stored episodes back onto the topics, or
re-publish dead letters onto the topics they came from.

    sop replay kafka --from 2026-11-24T10:00 --into /tmp/rebuilt --c-fail 200
    sop replay kafka --into /tmp/rebuilt --value-version 3     # advantages from a better value model
    sop replay publish --from-table demonstrations --where "task = 'drawer-open-v3'"
    sop replay deadletter --reason unknown-schema          # after the processor learnt the new schema
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import click
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lakehouse.tables import same_root
from sop.settings import Settings, load_settings, site_environment

SOURCES = ("Step", "EpisodeEvent", "InterventionEvent")


def _partitions(admin: AdminClient, topic: str) -> list[int]:
    md = admin.list_topics(topic, timeout=15).topics[topic]
    if md.error is not None:
        raise click.ClickException(f"topic {topic}: {md.error}")
    return sorted(md.partitions)


def resolve_offsets(consumer: Consumer, topic: str, partitions: list[int], where: str) -> dict[int, int]:
    """'beginning' | 'end' | an offset (per partition) | an ISO-8601 time → partition -> offset."""
    out = {}
    if where in ("beginning", "end"):
        for p in partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            out[p] = lo if where == "beginning" else hi
        return out
    if where.lstrip("-").isdigit():
        for p in partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            out[p] = min(max(int(where), lo), hi)
        return out
    try:
        ts = datetime.fromisoformat(where)
    except ValueError:
        raise click.BadParameter(f"{where!r}: give 'beginning', 'end', an offset or an ISO time (2026-11-24T10:00)") from None
    ms = int(ts.timestamp() * 1000)
    found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in partitions], timeout=15)
    for tp in found:
        out[tp.partition] = tp.offset if tp.offset >= 0 else consumer.get_watermark_offsets(tp, timeout=15)[1]
    return out


@click.group("replay")
def command() -> None:
    """Re-read history (new reward settings, rebuilt tables) or publish stored episodes for offline training."""


@command.command("kafka")
@click.option("--from", "from_", default="beginning", show_default=True, help="beginning | offset | ISO time")
@click.option("--to", "to", default="end", show_default=True, help="end | offset | ISO time (exclusive)")
@click.option("--into", "into", required=True, help="Root of the new Delta tables (must not be the live lake).")
@click.option("--c-fail", type=float, default=None, help="RECAP failure penalty for the rebuilt tables.")
@click.option("--advantage-horizon", type=int, default=None, help="N of the N-step advantage.")
@click.option("--value-version", type=click.IntRange(min=1), default=None,
              help="Compute values and advantages with this registered sop-value version (e.g. a better one trained "
                   "with `sop train-value --no-promote`); default: the champion, else the newest, as `sop process`.")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, help="Give up after this many seconds.")
def replay_kafka(from_: str, to: str, into: str, c_fail: float | None, advantage_horizon: int | None,
                 value_version: int | None, timeout_s: float) -> None:
    """Re-process the topics' history into a fresh set of tables, without touching the live ones."""
    settings = load_settings()
    if same_root(into, settings.lake_root):
        raise click.BadParameter(f"--into {into} is the live lake ({settings.lake_root}); give a new table root")
    console = Console()
    report = replay_into(settings, into=into, from_=from_, to=to, c_fail=c_fail, advantage_horizon=advantage_horizon,
                         value_version=value_version, timeout_s=timeout_s, console=console)
    values = f"; values from {report['value_model']}" if report.get("value_model") else ""
    console.print(f"replayed {report['messages']:,} messages into {into} in {report['elapsed_s']:.1f}s{values}")


def _check_value_version(settings: Settings, version: int) -> str:
    """The ``advantage_source`` every rebuilt row must carry; refuses a version the registry does not have."""
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client

    try:
        registry_client(settings.tracking_uri).get_model_version(settings.value_model_name, str(version))
    except MlflowException:
        raise click.BadParameter(f"{settings.value_model_name} has no version {version} in {settings.tracking_uri}",
                                 param_hint="--value-version") from None
    return f"value_model:{settings.value_model_name}/{version}"


def _rows_not_from(into: str, settings: Settings, source: str) -> int:
    from lakehouse import Lakehouse, query

    lake = Lakehouse(into, storage_options=settings.lake_storage_options or None)
    if not lake.exists("steps"):
        return 0
    escaped = source.replace("'", "''")
    return int(query(lake, "SELECT count(*) FROM steps WHERE advantage_source IS NULL "
                           f"OR advantage_source <> '{escaped}'").column(0)[0].as_py())


def replay_into(settings: Settings, *, into: str, from_: str = "beginning", to: str = "end",
                c_fail: float | None = None, advantage_horizon: int | None = None, value_version: int | None = None,
                timeout_s: float = 1800.0, console: Console | None = None) -> dict:
    """Re-process ``[from_, to)`` of the input topics into the tables under ``into`` with a processor of its own
    (consumer group ``sop-replay-…``). ``c_fail`` / ``advantage_horizon`` change the RECAP rewards and advantages;
    ``value_version`` pins the ``sop-value`` version values come from (every rebuilt step row is checked to carry
    it: a version the processor refused stops the replay with an error)."""
    expected_source = None if value_version is None else _check_value_version(settings, value_version)
    bootstrap = settings.bootstrap()
    admin = AdminClient({"bootstrap.servers": bootstrap, **settings.kafka_client_config})
    group = f"sop-replay-{uuid.uuid4().hex[:8]}"
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                      **settings.kafka_client_config})
    starts, ends = {}, {}
    for name in SOURCES:
        topic = settings.topics[name]
        parts = _partitions(admin, topic)
        starts[topic] = resolve_offsets(probe, topic, parts, from_)
        ends[topic] = resolve_offsets(probe, topic, parts, to)
    # The new group starts exactly at --from: its offsets are committed before the processor joins.
    probe.commit(offsets=[TopicPartition(t, p, o) for t, parts in starts.items() for p, o in parts.items()],
                 asynchronous=False)
    total = sum(max(0, ends[t][p] - starts[t][p]) for t in starts for p in starts[t])
    stop_file = Path(tempfile.mkstemp(prefix="sop-replay-stop-", suffix=".json")[1])
    stop_file.write_text(json.dumps(ends))
    # the child gets every endpoint setting explicitly (under the cluster profile they came from its endpoints
    # file, not from this environment): the same Kafka client config, registry, storage options
    env = {**os.environ, **site_environment(settings), "SOP_PROCESSOR_GROUP": group, "SOP_LAKE_URI": str(into),
           "SOP_PROCESSOR_ABORT_TIMEOUT_S": str(max(timeout_s, 3600)), "SOP_KAFKA_BOOTSTRAP": bootstrap,
           "SOP_PROCESSOR_CLOCK_SKEW_PAST_S": "0"}  # history is old by definition: no past bound on event times
    if c_fail is not None:
        env["SOP_RECAP_C_FAIL"] = str(c_fail)
    if advantage_horizon is not None:
        env["SOP_RECAP_ADVANTAGE_HORIZON"] = str(advantage_horizon)
    if value_version is not None:
        env["SOP_VALUE_MODEL_VERSION"] = str(value_version)
    child = subprocess.Popen([sys.executable, "-m", "sop", "process", "--stop-offsets", str(stop_file)], env=env)
    t0 = time.monotonic()
    tps = [TopicPartition(t, p) for t in ends for p in ends[t]]
    done = 0
    try:
        with Progress(TextColumn("[bold]replay"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} messages"),
                      TimeElapsedColumn(), console=console or Console(), transient=True) as progress:
            bar = progress.add_task("replay", total=max(total, 1))
            while True:
                if child.poll() is not None:
                    raise click.ClickException(f"the replay processor exited with code {child.returncode}")
                committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=15)}
                done = sum(max(0, min(committed[(t, p)], ends[t][p]) - starts[t][p]) for t in ends for p in ends[t])
                progress.update(bar, completed=done)
                if all(committed[(t, p)] >= ends[t][p] for t in ends for p in ends[t]):
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise click.ClickException(f"replay did not finish within {timeout_s:.0f}s ({done}/{total})")
                time.sleep(0.5)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        probe.close()
        stop_file.unlink(missing_ok=True)
        internal = [t for t in admin.list_topics(timeout=15).topics if t.startswith(f"{group}-")]
        if internal:
            admin.delete_topics(internal, operation_timeout=30)
    if expected_source is not None:
        other = _rows_not_from(into, settings, expected_source)
        if other:
            raise click.ClickException(f"{other:,} rebuilt step rows did not get their values from {expected_source} "
                                       f"(the processor refused it? see its log); the tables under {into} are "
                                       "incomplete as a rebuild with that value model")
    return {"messages": done, "elapsed_s": time.monotonic() - t0, "group": group, "value_model": expected_source}


@command.command("publish")
@click.option("--from-table", "table", type=click.Choice(["steps", "demonstrations"]), default="demonstrations",
              show_default=True)
@click.option("--where", "where", default=None, help="SQL condition on the table's rows, e.g. \"task = 'drawer-open-v3'\".")
@click.option("--keep-ids", is_flag=True, help="Reuse the stored episode ids (default: a new id per copy).")
@click.option("--copies", default=1, show_default=True, help="Publish every episode this many times (load tests).")
def replay_publish(table: str, where: str | None, keep_ids: bool, copies: int) -> None:
    """Publish stored episodes back onto the topics (offline data through the same pipeline, load tests)."""
    from lakehouse import Lakehouse, query
    from producers.publisher import EventPublisher
    from sop.commands.loadgen import make_publisher

    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "") + " ORDER BY episode_id, step_index"
    rows = query(lake, sql).to_pylist()
    console = Console()
    publisher: EventPublisher = make_publisher(settings)
    stats = publish_episodes(rows, publisher, keep_ids=keep_ids, copies=copies)
    undelivered = publisher.flush(120)
    console.print(f"published {stats['episodes']} episodes ({stats['steps']:,} steps) from {table}; "
                  f"failed {publisher.stats.failed}, undelivered {undelivered}")


STEP_FIELDS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
               "images", "proprio", "action", "policy_action", "controller", "env_reward", "success")


def _wire_version(row: dict) -> str:
    """The policy version as the events carry it (text): the stored text, or the number of a row without it."""
    text = row.get("policy_version_text")
    return str(text if text is not None else row["policy_version"])


def publish_episodes(rows: list[dict], sink, *, keep_ids: bool = False, copies: int = 1) -> dict:  # noqa: ANN001
    """Stored step rows (ordered by episode, step) → STARTED, Steps, ENDED records on ``sink``."""
    episodes: dict[str, list[dict]] = {}
    for row in rows:
        episodes.setdefault(row["episode_id"], []).append(row)
    n_steps = 0
    for copy in range(copies):
        for eid, steps in episodes.items():
            new_id = eid if keep_ids and copies == 1 else f"{eid}~r{uuid.uuid4().hex[:6]}{copy}"
            first, last = steps[0], steps[-1]
            now = time.time_ns() // 1000
            head = {"episode_id": new_id, "actor_id": first["actor_id"], "task": first["task"],
                    "instruction": first["instruction"], "policy_version": _wire_version(first)}
            sink.publish("EpisodeEvent", {**head, "kind": "STARTED", "event_time_us": now, "seed": None,
                                          "outcome": None, "num_steps": None}, key=new_id)
            for row in steps:
                rec = {k: row[k] for k in STEP_FIELDS}
                rec["episode_id"], rec["policy_version"] = new_id, _wire_version(row)
                sink.publish("Step", rec, key=new_id)
                n_steps += 1
            sink.publish("EpisodeEvent", {**head, "kind": "ENDED", "event_time_us": time.time_ns() // 1000,
                                          "seed": None, "outcome": last["outcome"], "num_steps": len(steps)},
                         key=new_id)
    return {"episodes": len(episodes) * copies, "steps": n_steps}


# -- replay deadletter ----------------------------------------------------------------------------------------

HEADER_REPLAYED_FROM = "sop.replayed-from"  # "<dead-letter topic>/<partition>/<offset>" of the letter re-published
HEADER_REPLAYED_ORIGIN = "sop.replayed-origin"  # "<origin topic>/<partition>/<offset>" it was dead-lettered from
_METADATA_MAX = 4000  # brokers keep at most offset.metadata.max.bytes (4096 by default) per committed offset


def coordinate(topic: str, partition: int | str, offset: int | str) -> str:
    return f"{topic}/{partition}/{offset}"


def decide_letter(headers: dict[str, str], letter: str, *, reasons: frozenset[str] | None, data_topics: set[str],
                  replayed: set[str]) -> tuple[str | None, str]:
    """``(origin topic, "replay")`` for a dead letter to re-publish, else ``(None, why it is skipped)``.

    ``letter`` is the dead letter's own coordinate; ``replayed`` holds the dead-letter and origin coordinates
    already re-published (by this job before a crash, or earlier in this run: the processor can dead-letter
    one event twice if it dies between the dead letter and its commit).
    """
    from consumers.deadletter import HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC

    if reasons is not None and headers.get(HEADER_REASON) not in reasons:
        return None, "other-reason"
    topic = headers.get(HEADER_TOPIC, "")
    if not topic:
        return None, "no-origin"
    if topic not in data_topics:
        return None, "not-a-data-topic"
    origin = coordinate(topic, headers.get(HEADER_PARTITION, "?"), headers.get(HEADER_OFFSET, "?"))
    if letter in replayed or (HEADER_OFFSET in headers and origin in replayed):
        return None, "already-replayed"
    return topic, "replay"


def republished_headers(headers: dict[str, str], *, letter: str, origin: str) -> list[tuple[str, bytes]]:
    """The headers of a re-published dead letter: where it came from, and the producer's identity headers as the
    letter kept them (a signed robot event stays signed, so a processor with security on takes it again)."""
    from schemas.identity import HEADER_PRINCIPAL, HEADER_SIGNATURE

    out = [(HEADER_REPLAYED_FROM, letter.encode()), (HEADER_REPLAYED_ORIGIN, origin.encode())]
    out.extend((name, headers[name].encode()) for name in (HEADER_PRINCIPAL, HEADER_SIGNATURE) if name in headers)
    return out


def origin_timestamp_ms(headers: dict[str, str]) -> int | None:
    from consumers.deadletter import HEADER_TIMESTAMP

    raw = headers.get(HEADER_TIMESTAMP, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def encode_progress(*, clean: bool, origin_ends: dict[str, dict[int, int]]) -> str:
    """The metadata committed with the job's dead-letter offsets: did the run end cleanly, and where did the
    origin topics end at that commit (no message re-published after the commit lies below those offsets)."""
    text = json.dumps({"clean": clean, "ends": {t: {str(p): o for p, o in ps.items()} for t, ps in origin_ends.items()}},
                      separators=(",", ":"))
    if len(text) > _METADATA_MAX:
        raise click.ClickException(f"{sum(map(len, origin_ends.values()))} origin partitions do not fit the "
                                   f"{_METADATA_MAX}-byte offset metadata of a replay job")
    return text


def decode_progress(metadata: str | None) -> tuple[bool, dict[str, dict[int, int]]]:
    """``(clean, origin ends)`` from committed metadata; no metadata = a job never run (clean, nothing to scan)."""
    if not metadata:
        return True, {}
    data = json.loads(metadata)
    return bool(data["clean"]), {t: {int(p): int(o) for p, o in ps.items()} for t, ps in data["ends"].items()}


def _retrying(call, *, timeout_s: float = 60.0):  # noqa: ANN001, ANN202
    """``call()`` again while the group coordinator is not ready (a fresh cluster, a coordinator moving)."""
    from confluent_kafka import KafkaError, KafkaException

    transient = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                 KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT, KafkaError._TRANSPORT}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0]
            if not (err.retriable() or err.code() in transient) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _read_ranges(consumer: Consumer, ranges: dict[tuple[str, int], tuple[int, int]], handle, *,  # noqa: ANN001
                 timeout_s: float, batch: int = 500, after_batch=None) -> None:  # noqa: ANN001
    """Read ``[start, end)`` of each (topic, partition) and call ``handle(msg)`` in offset order per partition;
    ``after_batch(positions)`` after each batch with the next offset to read per partition."""
    todo = {tp: se for tp, se in ranges.items() if se[0] < se[1]}
    positions = {tp: se[0] for tp, se in todo.items()}
    if not todo:
        return
    consumer.assign([TopicPartition(t, p, s) for (t, p), (s, _) in todo.items()])
    deadline = time.monotonic() + timeout_s
    try:
        while todo:
            if time.monotonic() > deadline:
                raise click.ClickException(f"reading {sorted(todo)} did not finish within {timeout_s:.0f}s")
            msgs = consumer.consume(num_messages=batch, timeout=1.0)
            for msg in msgs:
                if msg.error() is not None:
                    raise click.ClickException(f"reading {msg.topic()}[{msg.partition()}]: {msg.error()}")
                tp = (msg.topic(), msg.partition())
                if tp not in todo or msg.offset() >= todo[tp][1]:
                    continue
                handle(msg)
                positions[tp] = msg.offset() + 1
            if not msgs:  # gaps (transaction markers, compaction): the consumer's position tells
                for tpos in consumer.position([TopicPartition(t, p) for t, p in todo]):
                    if tpos.offset >= 0:
                        positions[(tpos.topic, tpos.partition)] = max(positions[(tpos.topic, tpos.partition)],
                                                                      tpos.offset)
            if after_batch is not None and msgs:
                after_batch(dict(positions))
            for tp in [tp for tp in todo if positions[tp] >= todo[tp][1]]:
                del todo[tp]
                consumer.incremental_unassign([TopicPartition(*tp)])
    finally:
        consumer.unassign()


@command.command("deadletter")
@click.option("--reason", "reasons", multiple=True,
              help="Only dead letters with this sop.reason (repeatable), e.g. unknown-schema. Default: all.")
@click.option("--from", "from_", default="beginning", show_default=True,
              help="Where in the dead-letter topic to start: beginning | offset | ISO time.")
@click.option("--to", "to", default="end", show_default=True, help="end | offset | ISO time (exclusive).")
@click.option("--job", default=None, help="Name of the replay job (its progress); default: the reasons, or 'all'.")
@click.option("--dry-run", is_flag=True, help="Count what would be re-published; publish and commit nothing.")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, help="Give up after this many seconds.")
def replay_deadletter(reasons: tuple[str, ...], from_: str, to: str, job: str | None, dry_run: bool,
                      timeout_s: float) -> None:
    """Re-publish dead letters onto the topics they came from (e.g. `--reason unknown-schema` once the
    processor knows the new schema), exactly once per job even when run twice or killed midway."""
    from consumers.deadletter import Reason

    known = {str(r) for r in Reason}
    bad = [r for r in reasons if r not in known]
    if bad:
        raise click.BadParameter(f"unknown reason(s) {bad}; one of {', '.join(sorted(known))}", param_hint="--reason")
    report = replay_deadletters(load_settings(), reasons=reasons or None, from_=from_, to=to, job=job,
                                dry_run=dry_run, timeout_s=timeout_s)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(report["skipped"].items())) or "none"
    Console().print(f"{'would re-publish' if dry_run else 're-published'} {report['republished']:,} of "
                    f"{report['letters']:,} dead letters (job {report['job']}); skipped: {skipped}")


def replay_deadletters(settings: Settings, *, reasons: Iterable[str] | None = None, from_: str = "beginning",
                       to: str = "end", job: str | None = None, dry_run: bool = False, timeout_s: float = 1800.0,
                       batch: int = 500, on_batch: Callable[[dict], None] | None = None) -> dict:
    """Re-publish the dead letters of ``settings.topics["deadletter"]`` in ``[from_, to)`` whose ``sop.reason``
    is in ``reasons`` onto their origin topic (``sop.origin.topic``): the original value and key, the original
    timestamp (``sop.origin.timestamp_ms``) when the letter has one, and ``sop.replayed-from`` /
    ``sop.replayed-origin`` headers naming the letter and the event it came from.

    Exactly once per job. A job (``job``, by default the reasons joined by '+', or 'all') is a consumer group
    ``sop-replay-deadletter.<dead-letter topic>.<job>`` whose committed offsets say how far it got: a second run
    starts where the first ended and re-publishes nothing already done. Offsets are committed only after the
    batch before them is delivered (acks=all), with metadata that records where the origin topics ended at that
    commit and whether the run ended cleanly. A run killed between a delivery and its commit leaves the job
    unclean; the next run reads the origin topics from those recorded ends and skips every letter (and every
    origin event) whose ``sop.replayed-*`` header it finds there. A letter whose origin event was already
    re-published in this run (the processor dead-lettered it twice) is skipped too.

    Letters before the job's committed offset are never looked at again, including those ``--reason`` or
    ``--from`` left out: replay other reasons under another job. Two jobs that cover the same letters both
    re-publish them (the processor then keeps one copy per step index, but late copies of closed episodes are
    dead-lettered as such). ``on_batch(report)`` runs after each batch is delivered and before its offsets are
    committed (progress; an exception there is a kill at the worst moment, which tests use). Returns ``{"letters", "republished", "skipped": {why: n}, "job", "group", "recovered"}``.
    """
    from confluent_kafka import Producer

    from consumers.deadletter import parse_headers
    from producers.publisher import PublisherConfig

    reason_set = frozenset(reasons) if reasons else None
    job = job or ("+".join(sorted(reason_set)) if reason_set else "all")
    dlt = settings.topics["deadletter"]
    data_topics = {settings.topics[n] for n in SOURCES}
    bootstrap = settings.bootstrap()
    client = {"bootstrap.servers": bootstrap, **settings.kafka_client_config}
    group = f"sop-replay-deadletter.{dlt}.{job}"
    admin = AdminClient(client)
    letters = Consumer({**client, "group.id": group, "enable.auto.commit": False, "enable.partition.eof": False})
    scanner = Consumer({**client, "group.id": f"{group}.scan", "enable.auto.commit": False})
    report: dict = {"letters": 0, "republished": 0, "skipped": {}, "job": job, "group": group, "recovered": 0}
    t0 = time.monotonic()
    try:
        dl_parts = _partitions(admin, dlt)
        origin_parts = {t: _partitions(admin, t) for t in sorted(data_topics)}

        def origin_ends() -> dict[str, dict[int, int]]:
            return {t: resolve_offsets(scanner, t, ps, "end") for t, ps in origin_parts.items()}

        committed = _retrying(lambda: letters.committed([TopicPartition(dlt, p) for p in dl_parts], timeout=15))
        starts = resolve_offsets(letters, dlt, dl_parts, from_)
        ends = resolve_offsets(letters, dlt, dl_parts, to)
        clean, recorded = True, {}
        for tp in committed:
            if tp.offset >= 0:
                starts[tp.partition] = max(starts[tp.partition], tp.offset)
            c, e = decode_progress(tp.metadata)
            if not c:
                clean = False
                for t, ps in e.items():
                    for p, o in ps.items():
                        recorded.setdefault(t, {})[p] = min(o, recorded.get(t, {}).get(p, o))

        # What an earlier, killed run of this job re-published after its last commit.
        replayed: set[str] = set()
        if not clean:
            now_ends = origin_ends()

            def remember(msg) -> None:  # noqa: ANN001
                h = parse_headers(msg.headers())
                if h.get(HEADER_REPLAYED_FROM, "").startswith(f"{dlt}/"):
                    replayed.add(h[HEADER_REPLAYED_FROM])
                    if HEADER_REPLAYED_ORIGIN in h:
                        replayed.add(h[HEADER_REPLAYED_ORIGIN])

            scan = {(t, p): (o, now_ends[t][p]) for t, ps in recorded.items() for p, o in ps.items() if t in now_ends}
            _read_ranges(scanner, scan, remember, timeout_s=timeout_s)
            report["recovered"] = sum(1 for c in replayed if c.startswith(f"{dlt}/"))

        def commit(positions: dict[int, int], *, done: bool) -> None:
            meta = encode_progress(clean=done, origin_ends={} if done else origin_ends())
            offsets = [TopicPartition(dlt, p, o, metadata=meta) for p, o in positions.items()]
            _retrying(lambda: letters.commit(offsets=offsets, asynchronous=False))

        if dry_run:
            producer = None
        else:
            producer = Producer({**PublisherConfig(
                bootstrap=bootstrap, topics=settings.topics, client_config=settings.kafka_client_config,
                compression=settings.publish_compression, max_message_bytes=settings.max_message_bytes,
                client_id="sop-replay-deadletter").librdkafka()})
            # Before anything is published: the job is unclean from here, and the origin ends bound the scan.
            commit(starts, done=False)
        failures: list[str] = []

        def delivered(err, msg) -> None:  # noqa: ANN001
            if err is not None:
                failures.append(f"{msg.topic()}: {err}")

        def handle(msg) -> None:  # noqa: ANN001
            report["letters"] += 1
            h = parse_headers(msg.headers())
            letter = coordinate(dlt, msg.partition(), msg.offset())
            topic, why = decide_letter(h, letter, reasons=reason_set, data_topics=data_topics, replayed=replayed)
            if topic is None:
                report["skipped"][why] = report["skipped"].get(why, 0) + 1
                return
            origin = coordinate(topic, h.get("sop.origin.partition", "?"), h.get("sop.origin.offset", "?"))
            replayed.update((letter, origin))
            report["republished"] += 1
            if producer is None:
                return
            kwargs = {}
            ts = origin_timestamp_ms(h)
            if ts is not None:
                kwargs["timestamp"] = ts
            while True:
                try:
                    producer.produce(topic, msg.value(), msg.key(), on_delivery=delivered,
                                     headers=republished_headers(h, letter=letter, origin=origin), **kwargs)
                    break
                except BufferError:
                    producer.poll(0.1)

        def after_batch(positions: dict[tuple[str, int], int]) -> None:
            if producer is not None:
                remaining = producer.flush(120)
                if remaining or failures:
                    raise click.ClickException(f"{remaining} re-published message(s) undelivered, "
                                               f"{len(failures)} failed (first: {failures[:1]}); nothing committed "
                                               f"past them: run the replay again")
            if on_batch is not None:
                on_batch(dict(report))
            if producer is not None:
                commit({p: o for (_, p), o in positions.items()}, done=False)

        _read_ranges(letters, {(dlt, p): (starts[p], ends[p]) for p in dl_parts}, handle,
                     timeout_s=max(1.0, timeout_s - (time.monotonic() - t0)), batch=batch, after_batch=after_batch)
        if producer is not None:
            final = {p: max(starts[p], ends[p]) for p in dl_parts}
            for tp in _retrying(lambda: letters.committed([TopicPartition(dlt, p) for p in dl_parts], timeout=15)):
                final[tp.partition] = max(final[tp.partition], tp.offset)
            commit(final, done=True)
    finally:
        letters.close()
        scanner.close()
    report["elapsed_s"] = time.monotonic() - t0
    return report
