"""The loop with both security switches on (what `sop up --secure` sets): `sop run` on a fresh run directory with
SOP_KAFKA_SECURITY=scram-tls and SOP_SECURITY=true — the actor is its own robot principal and signs its events, the
processor verifies them, nothing is dead-lettered; the base policy goes through the authenticated registry (the
pretraining registers it as the learner's user, the actor loads it as the actor's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from lakehouse import Lakehouse, query


def _read_all(bootstrap: str, config: dict, topic: str) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"sop-tools-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, **config})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list = []
    while sum(ends.values()) > len(out):
        m = c.poll(5)
        assert m is not None, f"{topic}: {len(out)} of {sum(ends.values())} read"
        if m.error() is None:
            out.append(m)
    c.close()
    return out


def _episodes(lake: Lakehouse) -> int:
    try:
        return int(query(lake, "SELECT count(*) FROM episodes").column(0)[0].as_py()) if lake.exists("episodes") else 0
    except Exception:  # noqa: BLE001 - the table is being created
        return 0


def test_sop_run_with_security_on_stores_signed_episodes_and_dead_letters_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_") or k in ("SOP_JAR_CACHE", "SOP_TOOL_CACHE")}
    env.update({"SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_PORT": "0", "SOP_KAFKA_SECURITY": "scram-tls",
                "SOP_SECURITY": "true",
                "SOP_PRETRAIN_STEPS": "20", "SOP_ACTOR_IMAGE_SIZE": "48", "SOP_TOPIC_PARTITIONS": "2",
                "SOP_KAFKA_HEAP_MB": "384", "COLUMNS": "200"})
    log = open(tmp_path / "sop-run.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "sop", "run", "--actors", "1", "--minutes", "6",
                             "--demos-per-task", "2", "--tasks", "reach-v3", "--no-learn", "--keep-stack"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    lake = Lakehouse(str(run_dir / "lake"))
    try:
        deadline = time.time() + 420
        while proc.poll() is None and time.time() < deadline and _episodes(lake) < 2:
            time.sleep(2)
        assert _episodes(lake) >= 2, (tmp_path / "sop-run.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the actor ends its episode, the processor drains
        assert proc.wait(timeout=300) == 0, (tmp_path / "sop-run.log").read_text()[-3000:]
        assert "robots actor-00" in (tmp_path / "sop-run.log").read_text()
        episodes = query(lake, "SELECT actor_id, count(*) AS n FROM episodes GROUP BY actor_id").to_pylist()
        assert [r["actor_id"] for r in episodes] == ["actor-00"] and episodes[0]["n"] > 0, episodes
        # the actor acted with the pretrained version it loaded from the authenticated registry
        versions = query(lake, "SELECT DISTINCT policy_version FROM episodes").to_pylist()
        assert versions == [{"policy_version": 1}], versions
        port = json.loads((run_dir / "mlflow-server" / "port.json").read_text())["port"]
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials: the registry refuses
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name=sop-policy",
                                   timeout=10)
        assert refused.value.code == 401

        bootstrap = json.loads((run_dir / "kafka" / "broker.json").read_text())["bootstrap"]
        tools = json.loads((run_dir / "security" / "clients" / "sop-tools.json").read_text())
        assert _read_all(bootstrap, tools, "sop.deadletter") == []
        steps = _read_all(bootstrap, tools, "sop.steps")
        assert steps and {dict(m.headers())["sop.principal"] for m in steps} == {b"actor-00"}
        stored = query(lake, "SELECT count(*) AS n FROM steps").to_pylist()[0]["n"]
        assert stored == query(lake, "SELECT sum(num_steps) FROM episodes").column(0)[0].as_py() > 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        subprocess.run([sys.executable, "-m", "sop", "down"], env=env, capture_output=True, timeout=120)
