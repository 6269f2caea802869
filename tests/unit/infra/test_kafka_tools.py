"""SOP's librdkafka client settings translated for Kafka's Java tools, and the tools' command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.kafka import StackError
from infra.kafka_tools import java_client_properties, tool_command, write_properties


def test_sasl_over_tls_becomes_a_jaas_line_and_a_pem_truststore() -> None:
    props = java_client_properties({"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
                                    "sasl.username": "robot", "sasl.password": 'p"w', "ssl.ca.location": "/etc/ca.pem",
                                    "ssl.endpoint.identification.algorithm": "none"})
    assert props == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.jaas.config": 'org.apache.kafka.common.security.scram.ScramLoginModule required username="robot" '
                            'password="p\\"w";',
        "ssl.truststore.type": "PEM", "ssl.truststore.location": "/etc/ca.pem",
        "ssl.endpoint.identification.algorithm": ""}
    assert "PlainLoginModule" in java_client_properties({"sasl.username": "u", "sasl.password": "p"})["sasl.jaas.config"]


def test_what_cannot_be_translated_is_named() -> None:
    with pytest.raises(StackError, match="linger.ms cannot be translated"):
        java_client_properties({"linger.ms": "5"})
    with pytest.raises(StackError, match="go together"):
        java_client_properties({"sasl.username": "u"})
    with pytest.raises(StackError, match="no Java login module"):
        java_client_properties({"sasl.mechanisms": "GSSAPI", "sasl.username": "u", "sasl.password": "p"})


def test_properties_file_is_private_and_escaped(tmp_path: Path) -> None:
    path = write_properties(tmp_path / "p.properties", {"bootstrap.servers": "127.0.0.1:9092", "a": "x=y"})
    assert path.stat().st_mode & 0o077 == 0
    lines = path.read_text().splitlines()[1:]
    assert lines == ["bootstrap.servers=127.0.0.1\\:9092", "a=x\\=y"]


def test_each_verb_runs_its_tool_class(tmp_path: Path) -> None:
    argv = tool_command("groups", ["--list"], bootstrap="b:1", classpath=tmp_path, properties=tmp_path / "p")
    main = argv.index("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")
    assert argv[main + 1:] == ["--bootstrap-server", "b:1", "--command-config", str(tmp_path / "p"), "--list"]
    assert "--consumer.config" in tool_command("consume", [], bootstrap="b", classpath=tmp_path, properties=tmp_path)
    with pytest.raises(StackError):
        tool_command("produce", [], bootstrap="b", classpath=tmp_path, properties=tmp_path)
