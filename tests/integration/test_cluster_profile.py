"""The cluster profile as `sop up --profile cluster` starts it: three KRaft brokers, a SeaweedFS S3 server, MLflow
on PostgreSQL with artifacts in the bucket — and the commands that must work against it (settings alone)."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from confluent_kafka.admin import AdminClient, ConfigResource
from deltalake import DeltaTable, write_deltalake

from infra.kafka import _pid_alive
from lakehouse import Lakehouse, query, snapshot
from sop.stack import local_cluster
from tests.conftest import ClusterUnderTest, sop_cli

pytestmark = pytest.mark.integration


def test_three_brokers_and_every_topic_replicated_three_times(cluster: ClusterUnderTest) -> None:
    settings = cluster.settings()
    admin = AdminClient({"bootstrap.servers": settings.bootstrap()})
    md = admin.list_topics(timeout=15)
    assert sorted(md.brokers) == [1, 2, 3]
    voters = (cluster.run_dir / "cluster" / "kafka" / "node-1" / "server.properties").read_text()
    assert voters.count("@127.0.0.1:") == 3 and "process.roles=broker,controller" in voters  # a quorum of three
    for name in settings.topics.values():
        parts = md.topics[name].partitions.values()
        assert {len(p.replicas) for p in parts} == {3} and {len(p.isrs) for p in parts} == {3}, name
    configs = admin.describe_configs([ConfigResource("topic", t) for t in settings.topics.values()])
    for resource, future in configs.items():
        assert future.result()["min.insync.replicas"].value == "2", resource.name

    status = sop_cli("status", env=cluster.env)
    assert status.returncode == 0, status.stderr
    for part in ("kafka node 1", "kafka node 2", "kafka node 3", "s3 (seaweedfs)", "postgres", "mlflow server"):
        line = next(line for line in status.stdout.splitlines() if part in line)
        assert "running" in line, status.stdout
    assert "4 partitions × 3 replicas (3 in sync)" in status.stdout


def test_registry_is_postgres_backed_and_keeps_artifacts_in_the_bucket(cluster: ClusterUnderTest) -> None:
    import psycopg

    from infra.model_versions import fetch_version, publish_files, write_config
    from infra.registry import ensure_registered_model, experiment_id, registry_client

    settings = cluster.settings()
    assert settings.tracking_uri.startswith("http://127.0.0.1:")  # clients speak HTTP only
    client = registry_client(settings.tracking_uri)
    name = f"probe-{uuid.uuid4().hex[:8]}"
    ensure_registered_model(client, name)
    def files(directory: Path) -> None:
        write_config(directory, kind="policy", architecture="probe")
        (directory / "weights.safetensors").write_bytes(b"\0" * 16)

    version = publish_files(client, name=name, experiment_id=experiment_id(client, "sop"), write=files,
                            alias="champion")
    assert client.get_model_version_by_alias(name, "champion").version == version

    pg = local_cluster(settings).postgres
    meta = json.loads(pg.meta_file.read_text())
    with psycopg.connect(host="127.0.0.1", port=meta["port"], user="sop", password=meta["password"],
                         dbname="mlflow") as conn:
        rows = conn.execute("SELECT version, source FROM model_versions WHERE name = %s", (name,)).fetchall()
    assert [str(v) for v, _ in rows] == [version]
    assert rows[0][1].startswith("mlflow-artifacts:/")  # proxied by the server, never a path on this machine

    s3 = local_cluster(settings).s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sop", Prefix="mlartifacts/").get("Contents", [])]
    assert any(k.endswith("/weights.safetensors") for k in keys), keys
    local = fetch_version(client, name, version, dst=cluster.run_dir / "probe-download")  # hashes checked
    assert sorted(local.files) == ["config.json", "weights.safetensors"] and local.architecture == "probe"


def test_conditional_writes_are_atomic_on_the_s3_server(cluster: ClusterUnderTest) -> None:
    """What delta-rs relies on: of racing `PUT If-None-Match: *` to one key exactly one wins (SeaweedFS before its
    PR 8801 let every racer win, which would let two writers both commit the same table version)."""
    s3 = local_cluster(cluster.settings()).s3.client()
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    for key in range(6):
        outcomes: list[str] = []
        barrier = threading.Barrier(8)

        def put(i: int, key: int = key, outcomes: list[str] = outcomes, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                s3.put_object(Bucket="sop", Key=f"{prefix}/{key}", Body=str(i).encode(), IfNoneMatch="*")
                outcomes.append("won")
            except ClientError as exc:
                outcomes.append(exc.response["Error"]["Code"])

        threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("won") == 1, outcomes
        assert set(outcomes) - {"won"} <= {"PreconditionFailed", "ConditionalRequestConflict"}, outcomes


def _append(uri: str, options: dict[str, str], writer: int, commits: int) -> None:
    for k in range(commits):
        write_deltalake(uri, pa.table({"writer": [writer], "k": [k]}), mode="append", storage_options=options)


def test_concurrent_delta_commits_on_the_s3_server_are_never_lost(cluster: ClusterUnderTest) -> None:
    settings = cluster.settings()
    options = settings.lake_storage_options
    assert options["aws_conditional_put"] == "etag"
    uri = f"s3://sop/race-{uuid.uuid4().hex[:8]}/t"
    write_deltalake(uri, pa.table({"writer": pa.array([], pa.int64()), "k": pa.array([], pa.int64())}),
                    storage_options=options)
    writers, commits = 3, 20
    ctx = multiprocessing.get_context("spawn")  # separate delta-rs instances, as separate machines would be
    procs = [ctx.Process(target=_append, args=(uri, options, w, commits)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * writers
    table = DeltaTable(uri, storage_options=options)
    assert table.version() == writers * commits  # one version per commit: none overwrote another
    rows = Counter(zip(*table.to_pyarrow_table().to_pydict().values(), strict=True))
    assert rows == Counter({(w, k): 1 for w in range(writers) for k in range(commits)})
    versions = sorted(c["version"] for c in table.history())
    assert versions == list(range(writers * commits + 1))


def _own_partition(root: str, options: dict[str, str], partition: int, batches: int) -> None:
    """One processor's writer: interventions of one Kafka partition, a watermark per commit."""
    writer = Lakehouse(root, storage_options=options).writer("interventions", app_id_prefix="race.interventions",
                                                             topic="sop.interventions")
    for k in range(batches):
        writer.write([{"episode_id": f"p{partition}-e{k}", "kind": "STARTED", "actor_id": "robot-0",
                       "task": "reach-v3", "step_index": 1, "event_time_us": 1_795_000_000_000_000 + k,
                       "operator_id": "scripted-expert", "reason": "divergence", "kafka_topic": "sop.interventions",
                       "kafka_partition": partition, "kafka_offset": k}], offsets={partition: k})


def test_two_owners_of_a_partition_and_a_third_writer_never_lose_or_duplicate_on_s3(cluster: ClusterUnderTest) -> None:
    # a zombie and the new owner of partition 0 commit the same events while another worker commits partition 1
    settings = cluster.settings()
    root = f"s3://sop/owners-{uuid.uuid4().hex[:8]}"
    Lakehouse(root, storage_options=settings.lake_storage_options).table("interventions")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_own_partition, args=(root, settings.lake_storage_options, p, 12)) for p in (0, 0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    lake = Lakehouse(root, storage_options=settings.lake_storage_options)
    got = query(lake, "SELECT kafka_partition, kafka_offset FROM interventions").to_pylist()
    assert Counter((r["kafka_partition"], r["kafka_offset"]) for r in got) == Counter(
        {(p, o): 1 for p in (0, 1) for o in range(12)})
    checker = lake.writer("interventions", app_id_prefix="race.interventions")
    assert checker.committed_offset(0) == 11 and checker.committed_offset(1) == 11


def _first(json_lines: str) -> dict:
    return json.loads(json_lines.strip().splitlines()[0])


def test_sql_lake_time_travel_and_replay_use_the_bucket(cluster: ClusterUnderTest) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    live, rebuilt = f"s3://sop/{prefix}lake", f"s3://sop/{prefix}rebuilt"
    env = {**cluster.env, "SOP_TOPIC_PREFIX": prefix, "SOP_TOPIC_PARTITIONS": "2", "SOP_LAKE_URI": live}
    again = sop_cli("up", env=env)  # idempotent: the services run, only this prefix's topics are new
    assert again.returncode == 0, again.stderr
    assert f"created {prefix}steps" in again.stdout
    gen = sop_cli("loadgen", "--robots", "2", "--hz", "0", "--episodes", "6", "--image-size", "32", env=env)
    assert gen.returncode == 0 and "failed 0" in gen.stdout, gen.stdout + gen.stderr

    refused = sop_cli("replay", "kafka", "--into", f"S3://sop/{prefix}lake/", env=env)
    assert refused.returncode != 0 and "is the live lake" in refused.stderr + refused.stdout
    replay = sop_cli("replay", "kafka", "--into", rebuilt, "--timeout", "240", env=env)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-3000:]

    rebuilt_env = {**env, "SOP_LAKE_URI": rebuilt}
    count = sop_cli("sql", "SELECT count(*) AS n FROM episodes", "--format", "json", env=rebuilt_env)
    assert count.returncode == 0, count.stderr
    assert _first(count.stdout)["n"] == 6
    history = sop_cli("lake", "history", "episodes", env=rebuilt_env)
    assert history.returncode == 0 and "WRITE" in history.stdout.upper(), history.stdout + history.stderr

    before = datetime.now(UTC)
    time.sleep(1.0)
    lake = Lakehouse(rebuilt, storage_options=cluster.settings().lake_storage_options)
    table = lake.table("episodes")
    write_deltalake(table, table.to_pyarrow_table().slice(0, 1), mode="append")  # a 7th row, after `before`
    now = sop_cli("sql", "SELECT count(*) AS n FROM episodes", "--format", "json", env=rebuilt_env)
    then = sop_cli("sql", "SELECT count(*) AS n FROM episodes", "--format", "json", "--as-of", before.isoformat(),
                   env=rebuilt_env)
    assert (_first(now.stdout)["n"], _first(then.stdout)["n"]) == (7, 6), then.stderr
    old, _ = snapshot(lake.table("episodes"), as_of=before, storage_options=lake.storage_options)
    assert old.num_rows == 6


def test_down_stops_every_service_and_up_brings_back_the_data(cluster: ClusterUnderTest) -> None:
    settings = cluster.settings()
    parts = local_cluster(settings)
    pids = [parts.kafka.node(i).state()["pid"] for i in parts.kafka.node_ids]
    pids += [parts.s3.state()["pid"], parts.postgres.pid(), parts.mlflow.state()["pid"]]
    uri = f"s3://sop/persist-{uuid.uuid4().hex[:8]}/t"
    write_deltalake(uri, pa.table({"x": [1, 2, 3]}), storage_options=settings.lake_storage_options)

    down = sop_cli("down", env=cluster.env)
    assert down.returncode == 0, down.stderr
    assert all(f"{name}: stopped" in down.stdout for name in ("mlflow-server", "postgres", "s3", "kafka"))
    assert not any(_pid_alive(pid) for pid in pids)
    assert "not running" in sop_cli("down", env=cluster.env).stdout

    up = sop_cli("up", env=cluster.env, timeout_s=600)
    assert up.returncode == 0, up.stderr
    assert "created" not in up.stdout  # the topics survived in the brokers' logs
    again = cluster.settings()
    assert again.bootstrap() == settings.bootstrap() and again.tracking_uri == settings.tracking_uri
    assert DeltaTable(uri, storage_options=again.lake_storage_options).to_pyarrow_table().num_rows == 3
    from infra.registry import registry_client

    assert registry_client(again.tracking_uri).get_experiment_by_name("sop") is not None


def test_object_store_roles_the_processor_writes_the_lake_readers_only_read_it(cluster: ClusterUnderTest) -> None:
    from learner.synthetic import fill_tables
    from sop.stack import lake_role_options

    settings = cluster.settings()
    s3 = local_cluster(settings).s3
    prefix = f"lake/roles-{uuid.uuid4().hex[:8]}"
    root = f"s3://sop/{prefix}"
    processor = lake_role_options(settings.model_copy(update={"lake_uri": root}), "processor")
    assert processor is not None and processor["AWS_ACCESS_KEY_ID"] != settings.lake_storage_options["AWS_ACCESS_KEY_ID"]
    fill_tables(Lakehouse(root, storage_options=processor), tasks=["reach-v3"], demos_per_task=1, online_per_task=2,
                length=5, image_size=16)  # the processor's keys write the tables
    with pytest.raises(ClientError) as outside:  # ... but only the lake: not MLflow's artifacts next to it
        s3.client("processor").put_object(Bucket="sop", Key="mlartifacts/planted", Body=b"x")
    assert outside.value.response["Error"]["Code"] == "AccessDenied"

    written = DeltaTable(f"{root}/steps", storage_options=processor).version()
    for role in ("learner", "analyst"):
        keys = lake_role_options(settings.model_copy(update={"lake_uri": root}), role)
        assert keys is not None
        steps = DeltaTable(f"{root}/steps", storage_options=keys).to_pyarrow_table()
        assert steps.num_rows == 10  # reads
        with pytest.raises(Exception, match="(?i)denied|403|forbidden"):
            write_deltalake(f"{root}/steps", steps.slice(0, 1), mode="append", storage_options=keys)
        client = s3.client(role)
        for attempt in (lambda c=client: c.put_object(Bucket="sop", Key=f"{prefix}/steps/planted.parquet", Body=b"x"),
                        lambda c=client: c.delete_object(Bucket="sop", Key=f"{prefix}/steps/_delta_log/"
                                                                           "00000000000000000000.json")):
            with pytest.raises(ClientError) as refused:
                attempt()
            assert refused.value.response["Error"]["Code"] == "AccessDenied", role
    assert DeltaTable(f"{root}/steps", storage_options=processor).version() == written  # nothing was changed

    analyst = lake_role_options(settings.model_copy(update={"lake_uri": root}), "analyst")
    env = {**cluster.env, "SOP_LAKE_URI": root, "SOP_LAKE_STORAGE_OPTIONS": json.dumps(analyst)}
    sql = sop_cli("sql", "SELECT count(*) AS n FROM steps WHERE task = 'reach-v3'", "--format", "json", env=env)
    assert sql.returncode == 0, sql.stderr
    assert _first(sql.stdout)["n"] == 10  # analysts' `sop sql` works with read-only keys
