"""Kafka's own command-line tools (topics, consumer groups, console consumer) on a classpath of their own.

The broker's jars (``kafka/pom.xml``) do not hold the tool classes; ``kafka/tools-pom.xml`` resolves
``org.apache.kafka:kafka-tools`` of the same version into ``<jar cache>/kafka-<version>/tools``, apart from the
broker's classpath so that neither changes the other's dependency versions::

    tools = resolve_tool_jars(DEFAULT_KAFKA_VERSION, cache)
    argv = tool_command("topics", ["--list"], bootstrap="127.0.0.1:9092", classpath=tools, properties=path)
    subprocess.run(argv)

``java_client_properties`` translates SOP's Kafka client settings (librdkafka names, ``SOP_KAFKA_CLIENT_CONFIG``)
into the Java client's, for the tools' ``--command-config`` / ``--consumer.config`` file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra.kafka import StackError, resolve_jars

TOOLS_POM = Path(__file__).parent / "kafka" / "tools-pom.xml"
TOOLS_LOG4J_CONFIG = Path(__file__).parent / "kafka" / "tools-log4j2.properties"

# verb -> (main class in kafka-tools 4.x, the option that takes the client properties file)
TOOLS: Mapping[str, tuple[str, str]] = {
    "topics": ("org.apache.kafka.tools.TopicCommand", "--command-config"),
    "groups": ("org.apache.kafka.tools.consumer.group.ConsumerGroupCommand", "--command-config"),
    "consume": ("org.apache.kafka.tools.consumer.ConsoleConsumer", "--consumer.config"),
}

# librdkafka settings that the Java client takes under the same name with the same meaning
_SAME = ("security.protocol", "client.id", "request.timeout.ms", "socket.connection.setup.timeout.ms",
         "reconnect.backoff.ms", "reconnect.backoff.max.ms", "retry.backoff.ms", "metadata.max.age.ms")
_LOGIN_MODULES = {"PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
                  "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
                  "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule"}


def resolve_tool_jars(version: str, cache: Path) -> Path:
    """Resolve kafka-tools ``version`` and its dependencies into ``cache/kafka-<version>/tools`` (once)."""
    return resolve_jars(version, cache, pom=TOOLS_POM, folder="tools")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def java_client_properties(config: Mapping[str, str]) -> dict[str, str]:
    """SOP's librdkafka client settings as Java client properties; StackError names a setting with no translation."""
    out: dict[str, str] = {}
    left = dict(config)
    for key in _SAME:
        if key in left:
            out[key] = str(left.pop(key))
    mechanism = left.pop("sasl.mechanisms", None) or left.pop("sasl.mechanism", None)
    if mechanism is not None:
        out["sasl.mechanism"] = str(mechanism)
    user, password = left.pop("sasl.username", None), left.pop("sasl.password", None)
    if (user is None) != (password is None):
        raise StackError("SOP_KAFKA_CLIENT_CONFIG: sasl.username and sasl.password go together")
    if user is not None:
        module = _LOGIN_MODULES.get(str(mechanism or "PLAIN").upper())
        if module is None:
            raise StackError(f"SOP_KAFKA_CLIENT_CONFIG: no Java login module for sasl.mechanisms={mechanism!r} "
                             f"(known: {', '.join(_LOGIN_MODULES)})")
        out["sasl.jaas.config"] = f"{module} required username={_quote(str(user))} password={_quote(str(password))};"
    if "ssl.ca.location" in left:
        out["ssl.truststore.type"] = "PEM"
        out["ssl.truststore.location"] = str(left.pop("ssl.ca.location"))
    if "ssl.endpoint.identification.algorithm" in left:
        value = str(left.pop("ssl.endpoint.identification.algorithm"))
        out["ssl.endpoint.identification.algorithm"] = "" if value.lower() == "none" else value
    if left:
        raise StackError(f"SOP_KAFKA_CLIENT_CONFIG: {', '.join(sorted(left))} cannot be translated for Kafka's Java "
                         "tools; run them by hand with a properties file of your own")
    return out


def write_properties(path: Path, properties: Mapping[str, str]) -> Path:
    """A Java .properties file (only this user may read it: it may hold a password)."""
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("=", "\\=").replace(":", "\\:")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# written by `sop kafka` from the SOP Kafka client settings\n")
        for key, value in properties.items():
            f.write(f"{escape(key)}={escape(value)}\n")
    return path


def tool_command(tool: str, args: Sequence[str], *, bootstrap: str, classpath: Path, properties: Path,
                 heap_mb: int = 256) -> list[str]:
    """The ``java`` command line that runs ``tool`` (a key of TOOLS) against ``bootstrap``."""
    if tool not in TOOLS:
        raise StackError(f"unknown Kafka tool {tool!r}; known: {', '.join(TOOLS)}")
    main, config_option = TOOLS[tool]
    return ["java", f"-Xmx{heap_mb}m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={TOOLS_LOG4J_CONFIG}", "-cp", f"{classpath}/*", main,
            "--bootstrap-server", bootstrap, config_option, str(properties), *args]
