"""The secured stack's material and grants, without a broker: what each role is allowed, the certificates, and the
broker properties (the integration tests check that the broker enforces them)."""

from __future__ import annotations

import ssl
import stat

import pytest

from infra.kafka import topic_names
from infra.kafka_security import (
    ADMIN,
    BROKER_PRINCIPAL,
    LocalSecurity,
    SecurityError,
    check_robot_name,
    processor_grants,
    robot_grants,
    tools_grants,
)

TOPICS = topic_names("sop.")


def test_a_robot_may_only_write_and_describe_the_three_inputs() -> None:
    grants = {(g.resource, g.name, g.pattern, g.operation) for g in robot_grants(TOPICS)}
    inputs = {"sop.steps", "sop.episodes", "sop.interventions"}
    assert grants == {("TOPIC", t, "LITERAL", op) for t in inputs for op in ("WRITE", "DESCRIBE")} | {
        ("CLUSTER", "kafka-cluster", "LITERAL", "IDEMPOTENT_WRITE")}
    assert not any(g.operation in ("READ", "CREATE", "DELETE", "ALTER", "ALL") for g in robot_grants(TOPICS))


def test_the_processor_reads_inputs_writes_dead_letters_and_owns_its_prefix() -> None:
    grants = {(g.resource, g.name, g.pattern, g.operation) for g in processor_grants(TOPICS, "sop-processor")}
    assert ("TOPIC", "sop.steps", "LITERAL", "READ") in grants
    assert ("TOPIC", "sop.steps", "LITERAL", "WRITE") not in grants
    assert ("TOPIC", "sop.deadletter", "LITERAL", "WRITE") in grants
    assert ("TOPIC", "sop.deadletter", "LITERAL", "READ") not in grants
    assert ("TOPIC", "sop-processor-", "PREFIXED", "CREATE") in grants
    assert ("GROUP", "sop-processor", "LITERAL", "READ") in grants
    assert not any(op == "DELETE" for *_, op in grants)
    tools = {(g.resource, g.pattern, g.operation) for g in tools_grants("sop.")}
    assert not any(op in ("WRITE", "CREATE", "DELETE") for *_, op in tools)


@pytest.mark.parametrize("name", ["", "Robot", "sop-admin", "sop-processor", "a b", "-x", "x" * 64, "r;User:admin"])
def test_robot_names_that_could_collide_or_inject_are_refused(name: str) -> None:
    with pytest.raises(SecurityError):
        check_robot_name(name)
    assert check_robot_name("robot-17.lab_a") == "robot-17.lab_a"


def test_the_material_is_private_and_the_broker_certificate_verifies_for_loopback(tmp_path) -> None:
    sec = LocalSecurity(tmp_path / "security")
    sec.ensure()
    before = {p.name: p.read_bytes() for p in sec.directory.iterdir() if p.is_file()}
    sec.ensure()  # idempotent: nothing re-issued
    assert {p.name: p.read_bytes() for p in sec.directory.iterdir() if p.is_file()} == before
    for name in ("ca-key.pem", "broker-key.pem", "broker.pem", "services.json"):
        assert stat.S_IMODE((sec.directory / name).stat().st_mode) == 0o600, name
    # a TLS client trusting only our CA accepts the broker's chain for 127.0.0.1 (as librdkafka/aiokafka will)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(sec.directory / "broker-cert.pem", sec.directory / "broker-key.pem")
    client = ssl.create_default_context(cafile=str(sec.ca_file))
    import socket
    import threading

    a, b = socket.socketpair()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    with client.wrap_socket(b, server_hostname="127.0.0.1") as c:
        assert c.getpeercert()["subject"] == ((("commonName", "sop-broker"),),)
        c.send(b"x")
    t.join(5)
    assert errors == []


def test_broker_properties_refuse_everything_not_granted(tmp_path) -> None:
    sec = LocalSecurity(tmp_path / "security")
    sec.ensure()
    fields = sec.broker_settings()
    props = fields["extra_properties"]
    assert (fields["client_protocol"], fields["internal_protocol"], fields["controller_protocol"]) == (
        "SASL_SSL", "SSL", "SSL")
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == f"{BROKER_PRINCIPAL};User:{ADMIN}"
    assert props["listener.name.client.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.internal.ssl.client.auth"] == props["listener.name.controller.ssl.client.auth"] == \
        "required"
    assert sec.service_config(ADMIN)["sasl.username"] == ADMIN
