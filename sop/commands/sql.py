"""`sop sql "SELECT …"`: SQL over the Delta tables (DuckDB), printed or written as csv/json/parquet."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from lakehouse import EXAMPLES, Lakehouse, LakehouseError, query, write_result
from sop.settings import load_settings


def _cell(value: object, width: int = 48) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@click.command("sql")
@click.argument("sql", required=False)
@click.option("--example", type=click.Choice(sorted(EXAMPLES)), help="Run one of the ready-made questions instead.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write the result here (csv/json/parquet).")
@click.option("--as-of", "as_of", default=None, help="Time travel: read every table as of this ISO time.")
@click.option("--version", "versions", multiple=True, help="Time travel one table: TABLE=VERSION (repeatable).")
@click.option("--limit", default=50, show_default=True, help="Rows to print in table format.")
def command(sql: str | None, example: str | None, fmt: str, output: str | None, as_of: str | None,
            versions: tuple[str, ...], limit: int) -> None:
    """Query steps, episodes, interventions and demonstrations by name."""
    if bool(sql) == bool(example):
        raise click.UsageError("give a SQL query or --example NAME (one of: " + ", ".join(sorted(EXAMPLES)) + ")")
    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    pinned = {}
    for item in versions:
        name, _, v = item.partition("=")
        if not v.isdigit():
            raise click.BadParameter(f"{item!r}: use TABLE=VERSION, e.g. steps=12")
        pinned[name] = int(v)
    try:
        result = query(lake, EXAMPLES[example] if example else sql, as_of=as_of, versions=pinned or None)
    except LakehouseError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "table" and not output:
        table = Table(show_lines=False)
        for name in result.column_names:
            table.add_column(name)
        for row in result.slice(0, limit).to_pylist():
            table.add_row(*(_cell(v) for v in row.values()))
        console = Console()
        console.print(table)
        if result.num_rows > limit:
            console.print(f"… {result.num_rows - limit} more rows (use --limit or --format csv -o FILE)")
        return
    if fmt == "table":
        fmt = None  # from the output file's suffix
    try:
        write_result(result, output or sys.stdout.buffer, fmt=fmt)
    except LakehouseError as exc:
        raise click.ClickException(str(exc)) from None
    if output:
        click.echo(f"{result.num_rows} rows written to {output}", err=True)
