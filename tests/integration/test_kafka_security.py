"""SOP_KAFKA_CLIENT_CONFIG reaches every client: against a broker whose only client listener is SASL_SSL (PLAIN
over TLS, a CA of our own), `sop up` (admin), `sop loadgen` (publisher), `sop process` (faust/aiokafka),
`sop status` (consumer, lag) and `sop replay kafka` (consumer + its own processor) all work with the settings alone."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra import KafkaBrokerConfig, LocalKafka
from sop.processes import SopProcess
from tests.conftest import sop_cli
from tests.integration.processing import count, wait_for

pytestmark = pytest.mark.integration

USER, PASSWORD = "sop", "sop-secret-pw"


def _certificates(directory: Path) -> tuple[Path, Path]:
    """A CA and a broker certificate for 127.0.0.1/localhost: (CA file, broker PEM keystore: key + chain)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sop test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    keystore = directory / "broker.pem"
    keystore.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    return ca_file, keystore


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("secure-kafka")
    ca_file, keystore = _certificates(tmp)
    broker = LocalKafka(KafkaBrokerConfig(
        data_dir=tmp / "broker", port=0, heap_mb=384, client_protocol="SASL_SSL", extra_properties={
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.client.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.client.plain.sasl.jaas.config":
                f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{USER}="{PASSWORD}";',
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
        }))
    bootstrap = broker.start()
    client_config = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": USER,
                     "sasl.password": PASSWORD, "ssl.ca.location": str(ca_file)}
    try:
        yield bootstrap, client_config
    finally:
        broker.stop()


def test_the_listener_refuses_clients_without_the_credentials(secure_broker) -> None:
    bootstrap, client_config = secure_broker
    for config in ({}, {**client_config, "sasl.password": "wrong"}):
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **config})
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=4)
    AdminClient({"bootstrap.servers": bootstrap, **client_config}).list_topics(timeout=10)


def test_every_command_honours_the_client_config(secure_broker, tmp_path) -> None:
    bootstrap, client_config = secure_broker
    lake, rebuilt = tmp_path / "lake", tmp_path / "rebuilt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update({"SOP_RUN_DIR": str(tmp_path / "run"), "SOP_KAFKA_BOOTSTRAP": bootstrap,
                "SOP_KAFKA_CLIENT_CONFIG": json.dumps(client_config), "SOP_TOPIC_PARTITIONS": "2",
                "SOP_LAKE_URI": str(lake), "SOP_PROCESSOR_FLUSH_INTERVAL_S": "0.5", "COLUMNS": "200"})
    up = sop_cli("up", env=env)
    assert up.returncode == 0 and "created sop.steps" in up.stdout, up.stdout + up.stderr
    gen = sop_cli("loadgen", "--robots", "2", "--hz", "0", "--episodes", "6", "--image-size", "32", env=env)
    assert gen.returncode == 0 and "6 episodes" in gen.stdout and "failed 0" in gen.stdout, gen.stdout + gen.stderr

    proc = SopProcess(["process"], env=env, log=tmp_path / "processor.log").start()
    try:
        wait_for(lambda: count(lake, "SELECT count(*) FROM episodes") >= 6, timeout_s=120, processor=proc)
        status = sop_cli("status", env=env)
        assert status.returncode == 0, status.stderr
        episodes_line = next(line for line in status.stdout.splitlines() if "sop.episodes" in line)
        assert "12 messages" in episodes_line, status.stdout  # 6 STARTED + 6 ENDED, read over SASL_SSL
        assert "unreachable" not in status.stdout
    finally:
        proc.stop()
    assert count(lake, "SELECT count(*) FROM episodes") == 6

    replay = sop_cli("replay", "kafka", "--into", str(rebuilt), "--timeout", "180", env=env)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-3000:]
    assert count(rebuilt, "SELECT count(*) FROM episodes") == 6


def test_a_client_setting_aiokafka_cannot_honour_stops_the_command_naming_it(secure_broker, tmp_path) -> None:
    bootstrap, client_config = secure_broker
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env.update({"SOP_RUN_DIR": str(tmp_path), "SOP_KAFKA_BOOTSTRAP": bootstrap,
                "SOP_KAFKA_CLIENT_CONFIG": json.dumps({**client_config, "socket.keepalive.enable": "true"})})
    out = sop_cli("process", env=env)
    assert out.returncode != 0
    assert "socket.keepalive.enable" in out.stderr and "aiokafka" in out.stderr, out.stderr
