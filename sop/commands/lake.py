"""`sop lake compact | vacuum | history | migrate`: maintenance of the Delta tables."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from lakehouse import TABLES, Lakehouse, compact, history, small_files, vacuum
from sop.settings import load_settings

TABLE_CHOICE = click.Choice(sorted(TABLES))


def _lake() -> Lakehouse:
    settings = load_settings()
    return Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)


@click.group("lake")
def command() -> None:
    """Compact small files, vacuum old ones, show a table's commit history, migrate old tables."""


@command.command("compact")
@click.argument("tables", nargs=-1, type=TABLE_CHOICE)
def compact_cmd(tables: tuple[str, ...]) -> None:
    """Rewrite many small files into few large ones (reads get faster; rows and versions stay)."""
    lake = _lake()
    for name in tables or lake.existing():
        dt = lake.table(name, create=False)
        before = small_files(dt)
        res = compact(dt)
        click.echo(f"{name}: {res.files_removed} files → {res.files_added} (small files before: {before}); "
                   f"version {res.version}")


@command.command("vacuum")
@click.argument("tables", nargs=-1, type=TABLE_CHOICE)
@click.option("--retention-hours", type=float, default=None, help="Keep files younger than this (default: 7 days).")
@click.option("--apply", is_flag=True, help="Delete for real (default is a dry run that lists the files).")
def vacuum_cmd(tables: tuple[str, ...], retention_hours: float | None, apply: bool) -> None:
    """Delete files no longer referenced by the table (older time-travel versions stop working)."""
    lake = _lake()
    for name in tables or lake.existing():
        files = vacuum(lake.table(name, create=False), retention_hours=retention_hours, dry_run=not apply)
        click.echo(f"{name}: {'deleted' if apply else 'would delete'} {len(files)} files")


@command.command("history")
@click.argument("table", type=TABLE_CHOICE)
@click.option("--limit", default=20, show_default=True)
def history_cmd(table: str, limit: int) -> None:
    """The table's commits: version, time, operation, rows and files."""
    commits = history(_lake().table(table, create=False), limit=limit)
    out = Table(title=f"{table} history")
    for col in ("version", "timestamp", "operation", "metrics"):
        out.add_column(col)
    for c in commits:
        metrics = ", ".join(f"{k}={v}" for k, v in (c.metrics or {}).items() if k.startswith("num"))
        out.add_row(str(c.version), str(c.timestamp), c.operation, metrics[:80])
    Console().print(out)


@command.command("migrate")
@click.argument("tables", nargs=-1, type=TABLE_CHOICE)
@click.option("--dry-run", is_flag=True, help="Only list the tables that need it.")
def migrate_cmd(tables: tuple[str, ...], dry_run: bool) -> None:
    """Rewrite tables written by older SOP to the current definition (policy_version text -> int64).

    Every writer (the processor, `sop demos`, `sop import`) does this by itself before its first write, and every
    reader reads old tables as they are; this runs it ahead, e.g. before external tools (Spark, DuckDB) read the
    tables. Stop processors of the old code first: their rows no longer fit a migrated table.
    """
    lake = _lake()
    for name in tables or lake.existing():
        pending = lake.pending_migrations(name)
        if not pending:
            click.echo(f"{name}: current")
        elif dry_run:
            click.echo(f"{name}: needs {', '.join(pending)}")
        else:
            click.echo(f"{name}: {', '.join(pending)} at version {lake.migrate(name)}")
