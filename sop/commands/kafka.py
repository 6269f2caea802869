"""`sop kafka topics | groups | consume …`: Kafka's own command-line tools against the stack's broker.

    sop kafka topics --list
    sop kafka topics --describe --topic sop.steps
    sop kafka groups --describe --group sop-processor          # lag per partition, as Kafka reports it
    sop kafka consume sop.deadletter --from-beginning --max-messages 5 --property print.headers=true

Thin wrappers: the arguments after the verb go to the standard tool classes of ``kafka-tools`` (the broker's
version; resolved by ``make setup`` into the jar cache, next to the broker's jars) unchanged, with
``--bootstrap-server`` set to the broker the settings name (``SOP_KAFKA_BOOTSTRAP`` or the one `sop up`
started) and the client settings (``SOP_KAFKA_CLIENT_CONFIG``, translated to Java names) in a properties file
(``<SOP_RUN_DIR>/kafka-tools.properties``). ``--help`` after the verb prints the tool's own options.
"""

from __future__ import annotations

import subprocess
import sys

import click

from infra.kafka import KafkaBrokerConfig, StackError
from infra.kafka_tools import TOOLS, java_client_properties, resolve_tool_jars, tool_command, write_properties
from sop.settings import load_settings

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def run_tool(tool: str, args: list[str]) -> int:
    """Run one of Kafka's tools with ``args``; returns its exit status."""
    settings = load_settings()
    try:
        bootstrap = settings.bootstrap()
        cache = KafkaBrokerConfig(data_dir=settings.run_path / "kafka").jar_cache
        classpath = resolve_tool_jars(settings.kafka_version, cache)
        properties = write_properties(settings.run_path / "kafka-tools.properties",
                                      {"bootstrap.servers": bootstrap, **java_client_properties(settings.kafka_client_config)})
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    argv = tool_command(tool, args, bootstrap=bootstrap, classpath=classpath, properties=properties)
    try:
        return subprocess.run(argv).returncode
    except KeyboardInterrupt:  # the console consumer runs until Ctrl-C
        return 130


@click.group("kafka")
def command() -> None:
    """Kafka's own tools (topics, consumer groups, console consumer) against the stack's broker."""


def _verb(tool: str, doc: str, default: tuple[str, ...] = ()) -> None:
    main = TOOLS[tool][0]

    @command.command(tool, context_settings=PASS_THROUGH, help=f"{doc}\n\nRuns {main}; `sop kafka {tool} --help` "
                                                                "lists its options.", add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def run(args: tuple[str, ...]) -> None:
        argv = list(args) or list(default)
        if tool == "consume" and argv and not argv[0].startswith("-"):
            argv = ["--topic", *argv]  # `sop kafka consume TOPIC …`
        sys.exit(run_tool(tool, argv))


_verb("topics", "Create, list, describe, alter topics (default: --list).", ("--list",))
_verb("groups", "List and describe consumer groups: members, committed offsets, lag (default: --list).", ("--list",))
_verb("consume", "Print messages of a topic: TOPIC then the console consumer's options.")
