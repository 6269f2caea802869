"""The secured stack against its real broker (`sop up` with SOP_KAFKA_SECURITY=scram-tls, once for the module):
SASL/SCRAM over TLS only, ACLs per principal, `sop robot add/revoke`, and signed identities the processor checks."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from consumers.deadletter import HEADER_REASON, parse_headers
from producers.loadgen import LoadGenConfig, iter_fleet
from schemas import codec
from schemas.identity import load_signer
from sop.processes import SopProcess
from tests.conftest import sop_cli
from tests.integration.processing import count, wait_for

pytestmark = pytest.mark.integration


@dataclass
class SecureStack:
    run_dir: Path
    env: dict[str, str]
    bootstrap: str
    internal: str

    def client(self, principal: str) -> dict[str, str]:
        return json.loads((self.run_dir / "security" / "clients" / f"{principal}.json").read_text())

    def add_robot(self, name: str, *actors: str) -> dict[str, str]:
        out = sop_cli("robot", "add", name, *(a for actor in actors for a in ("--actor", actor)), env=self.env)
        assert out.returncode == 0, out.stdout + out.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())
        assert set(exports) == {"SOP_KAFKA_SECURITY", "SOP_KAFKA_CLIENT_CONFIG", "SOP_PUBLISH_IDENTITY_FILE"}, out.stdout
        return exports


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    run_dir = tmp_path_factory.mktemp("secure") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_") or k in ("SOP_JAR_CACHE", "SOP_TOOL_CACHE")}
    env.update({"SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_SECURITY": "scram-tls", "SOP_KAFKA_PORT": "0",
                "SOP_TOPIC_PARTITIONS": "2", "SOP_KAFKA_HEAP_MB": "384", "COLUMNS": "200"})
    up = sop_cli("up", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "security" in up.stdout and "created sop.steps" in up.stdout, up.stdout
        state = json.loads((run_dir / "kafka" / "broker.json").read_text())
        yield SecureStack(run_dir=run_dir, env=env, bootstrap=state["bootstrap"], internal=state["ready"])
    finally:
        sop_cli("down", env=env)


def _refused(bootstrap: str, *configs: dict) -> None:
    """Every one of ``configs`` fails to get metadata (tried at once: a refused handshake can take the timeout)."""
    def attempt(config: dict) -> bool:
        try:
            AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **config}).list_topics(timeout=5)
        except KafkaException:
            return True
        return False

    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        refused = list(pool.map(attempt, configs))
    assert all(refused), [c for c, r in zip(configs, refused, strict=True) if not r]


def test_only_scram_over_tls_gets_in(secure: SecureStack) -> None:
    admin = secure.client("sop-admin")
    tls_only = {"security.protocol": "SSL", "ssl.ca.location": admin["ssl.ca.location"]}
    _refused(secure.bootstrap,
             {},  # plaintext, unauthenticated
             tls_only,  # TLS without SASL
             {k: v for k, v in admin.items() if not k.startswith("ssl.")} | {"security.protocol": "SASL_PLAINTEXT"},
             {**admin, "sasl.password": "wrong"},
             {**admin, "sasl.mechanism": "SCRAM-SHA-256"})  # only SCRAM-SHA-512 is enabled
    _refused(secure.internal, {}, tls_only)  # the brokers' own listener wants a client certificate from the CA
    topics = AdminClient({"bootstrap.servers": secure.bootstrap, **admin}).list_topics(timeout=10).topics
    assert {"sop.steps", "sop.deadletter"} <= set(topics)


def _step_bytes(actor_id: str) -> tuple[str, bytes]:
    name, rec = next((n, r) for n, r in iter_fleet(LoadGenConfig(robots=1, hz=0, episodes=1, seed=3))
                     if n == "Step")
    rec = {**rec, "actor_id": actor_id, "event_time_us": time.time_ns() // 1000}
    return rec["episode_id"], codec.encode(name, rec)


def _produce(config: dict, topic: str, value: bytes, *, key: str, headers: list | None = None) -> KafkaError | None:
    """Produce one message and wait for its delivery report: None when the broker took it, else the error."""
    errors: list[KafkaError | None] = []
    p = Producer({"bootstrap.servers": config.pop("bootstrap"), "enable.idempotence": True, "acks": "all",
                  "message.timeout.ms": 10_000, "log_level": 0, **config})
    p.produce(topic, value, key, headers=headers, on_delivery=lambda err, _msg: errors.append(err))
    p.flush(15)
    return errors[0] if errors else KafkaError(KafkaError._MSG_TIMED_OUT)


def test_a_robot_writes_its_inputs_and_nothing_else(secure: SecureStack) -> None:
    exports = secure.add_robot("acl-robot")
    robot = json.loads(Path(exports["SOP_KAFKA_CLIENT_CONFIG"]).read_text())
    assert robot["sasl.username"] == "acl-robot" and "sop-admin" not in json.dumps(robot)
    eid, value = _step_bytes("acl-robot")
    assert _produce({"bootstrap": secure.bootstrap, **robot}, "sop.steps", value, key=eid) is None

    err = _produce({"bootstrap": secure.bootstrap, **robot}, "sop.deadletter", value, key=eid)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err

    consumer = Consumer({"bootstrap.servers": secure.bootstrap, "group.id": f"acl-robot-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 0, **robot})
    try:  # reading partitions from offset 0: refused (on the group it names, and on the topic)
        consumer.assign([TopicPartition("sop.steps", 0, 0), TopicPartition("sop.steps", 1, 0)])
        codes = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and KafkaError.TOPIC_AUTHORIZATION_FAILED not in codes:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is not None, "a robot read a step"
                codes.add(msg.error().code())
        assert codes and codes <= {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}, codes
    finally:
        consumer.close()

    admin = AdminClient({"bootstrap.servers": secure.bootstrap, **robot})
    with pytest.raises(KafkaException) as info:
        admin.create_topics([NewTopic("sop.robot-made", 1, 1)])["sop.robot-made"].result(timeout=15)
    assert info.value.args[0].code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException) as info:  # nor delete one, nor see the groups
        admin.delete_topics(["sop.steps"])["sop.steps"].result(timeout=15)
    assert info.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    visible = set(admin.list_topics(timeout=10).topics)
    assert visible == {"sop.steps", "sop.episodes", "sop.interventions"}, visible  # not even the dead-letter topic
    assert admin.list_consumer_groups().result(timeout=15).valid == []


def test_forged_actors_are_dead_lettered_and_a_revoked_robot_is_refused(secure: SecureStack, tmp_path: Path) -> None:
    env = {**secure.env, "SOP_PROCESSOR_FLUSH_INTERVAL_S": "0.5", "SOP_PROCESSOR_END_GRACE_S": "2"}
    loadgen = secure.add_robot("lg", "loadgen-*")  # a principal for a group of robots: the load generator's
    intruder = secure.add_robot("intruder")
    robot_env = {**env, **loadgen}
    gen = sop_cli("loadgen", "--robots", "2", "--hz", "0", "--episodes", "4", env=robot_env)
    assert gen.returncode == 0 and "failed 0" in gen.stdout, gen.stdout + gen.stderr

    # the intruder signs with its own (valid) key but claims a loadgen actor; then sends unsigned; then claims to be lg
    intr = json.loads(Path(intruder["SOP_KAFKA_CLIENT_CONFIG"]).read_text())
    signer = load_signer(Path(intruder["SOP_PUBLISH_IDENTITY_FILE"]))
    eid, value = _step_bytes("loadgen-forged-0")
    forged = [signer.headers("sop.steps", key=eid, value=value), None,
              [("sop.principal", b"lg"), signer.headers("sop.steps", key=eid, value=value)[1]]]
    for headers in forged:
        assert _produce({"bootstrap": secure.bootstrap, **intr}, "sop.steps", value, key=eid, headers=headers) is None

    lake = secure.run_dir / "lake"
    proc = SopProcess(["process"], env=env, log=tmp_path / "processor.log").start()
    try:
        wait_for(lambda: count(lake, "SELECT count(*) FROM episodes") >= 4, timeout_s=120, processor=proc)
        letters = [h for h in _dead_letters(secure, expected=4) if "loadgen-forged-0" in h["sop.error"]]
        assert [h[HEADER_REASON] for h in letters] == ["identity-mismatch"] * 3, letters
        assert "intruder" in letters[0]["sop.error"] and "loadgen-forged-0" in letters[0]["sop.error"]
        assert count(lake, "SELECT count(*) FROM steps WHERE actor_id = 'loadgen-forged-0'") == 0

        # revoke: the intruder's next connection is refused, and so is a write on a connection it still holds
        held = Producer({"bootstrap.servers": secure.bootstrap, "log_level": 0, "message.timeout.ms": 8000, **intr})
        held.list_topics(timeout=10)
        out = sop_cli("robot", "revoke", "intruder", env=env)
        assert out.returncode == 0 and "ACLs deleted" in out.stdout, out.stdout + out.stderr
        _refused(secure.bootstrap, intr)
        errors: list = []
        held.produce("sop.steps", value, eid, on_delivery=lambda err, _m: errors.append(err))
        held.flush(12)
        assert errors and errors[0] is not None, errors
        assert not Path(intruder["SOP_PUBLISH_IDENTITY_FILE"]).exists()
        assert "intruder" not in json.loads((secure.run_dir / "security" / "robots.json").read_text())["robots"]
    finally:
        proc.stop()


def _dead_letters(secure: SecureStack, *, expected: int, timeout_s: float = 60) -> list[dict[str, str]]:
    """The dead letters' headers (at least ``expected``, in offset order), read as the operators' tools principal
    (it may read every topic)."""
    c = Consumer({"bootstrap.servers": secure.bootstrap, "group.id": f"sop-tools-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, **secure.client("sop-tools")})
    c.subscribe(["sop.deadletter"])
    out: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                out.append(parse_headers(m.headers()))
    finally:
        c.close()
    return sorted(out, key=lambda h: (h.get("sop.origin.partition", ""), int(h.get("sop.origin.offset", -1))))
