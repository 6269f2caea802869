"""SQL over the lakehouse for people: DuckDB over each table's Arrow dataset (no DuckDB extension needed).

Every table that exists under the root is registered under its name (``steps``, ``episodes``,
``interventions``, ``demonstrations``); tables nothing has been written to yet are not, and a query naming
one fails with :class:`TableNotFoundError` listing the tables that do exist. Time travel: ``as_of`` (a
datetime or ISO-8601 string) reads every table as it was then; ``versions`` pins single tables to a Delta
version. Scans push column projection and filters down to the Parquet files. A table of the old shape (text
``policy_version``: not migrated yet, or read as of a version before its migration) is registered as a view
with the current shape, so that every query sees ``policy_version`` as a number.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset
import pyarrow.parquet as pq

from lakehouse.errors import LakehouseError, QueryError, TableNotFoundError, VersionNotFoundError
from lakehouse.lake import Lakehouse
from lakehouse.tables import TABLES, VERSION, VERSION_DIGITS, VERSION_LIST, VERSION_TEXT, needs_upgrade

Format = Literal["csv", "json", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "json", "parquet")
_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist", re.IGNORECASE)


def connect(
    lakehouse: Lakehouse,
    *,
    as_of: datetime | str | None = None,
    versions: Mapping[str, int] | None = None,
    threads: int | None = None,
) -> tuple[duckdb.DuckDBPyConnection, dict[str, int]]:
    """A DuckDB connection with every existing table registered, and the Delta version each was read at."""
    versions = dict(versions or {})
    unknown = sorted(set(versions) - set(TABLES))
    if unknown:
        raise LakehouseError(f"versions given for unknown table(s) {unknown}; tables are {sorted(TABLES)}")
    con = duckdb.connect(config={"threads": threads} if threads else {})
    read_at: dict[str, int] = {}
    for name in lakehouse.existing():
        when: int | datetime | str | None = versions.get(name, as_of)
        try:
            dt = lakehouse.table(name, create=False, as_of=when)
        except VersionNotFoundError:
            if name in versions:
                raise
            continue  # the table did not exist yet at `as_of`
        register(con, name, dt.to_pyarrow_dataset())
        read_at[name] = dt.version()
    return con, read_at


def register(con: duckdb.DuckDBPyConnection, name: str, dataset: pa.dataset.Dataset) -> None:
    """Make a table's Arrow dataset queryable as ``name``, in the current shape: a dataset of a table written
    before ``policy_version`` became a number (or read back in time) behind a view that converts it."""
    if not needs_upgrade(dataset.schema):
        con.register(name, dataset)
        return
    con.register(f"_stored_{name}", dataset)
    con.execute(f'CREATE VIEW "{name}" AS SELECT {_upgrading_columns(dataset.schema)} FROM "_stored_{name}"')


def _upgrading_columns(schema: pa.Schema) -> str:
    """The select list that gives an old-shaped table the current shape, as ``tables.upgrade`` does."""
    def number(column: str) -> str:
        return f"CAST(CASE WHEN regexp_full_match({column}, '{VERSION_DIGITS}') THEN {column} END AS BIGINT)"

    out = []
    for f in schema:
        if f.name == VERSION:
            out.append(f"{number(VERSION)} AS {VERSION}")
            if VERSION_TEXT not in schema.names:
                out.append(f"{VERSION} AS {VERSION_TEXT}")
        elif f.name == VERSION_LIST and pa.types.is_list(f.type):
            out.append(f"list_transform({VERSION_LIST}, lambda v: {number('v')}) AS {VERSION_LIST}")
        else:
            out.append(f'"{f.name}"')
    return ", ".join(out)


def query(
    lakehouse: Lakehouse,
    sql: str,
    *,
    as_of: datetime | str | None = None,
    versions: Mapping[str, int] | None = None,
) -> pa.Table:
    """Run one SQL statement over the lakehouse's tables and return the result."""
    con, read_at = connect(lakehouse, as_of=as_of, versions=versions)
    try:
        result = con.sql(sql)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.CatalogException as exc:
        missing = _MISSING_TABLE.search(str(exc))
        if missing:
            raise TableNotFoundError(missing.group(1).strip('"'), lakehouse.root, read_at, defined=TABLES) from None
        raise QueryError(str(exc)) from None
    except duckdb.Error as exc:
        raise QueryError(f"{exc}\n(tables: {', '.join(sorted(read_at)) or 'none yet'})") from None
    finally:
        con.close()


# -- results to files --------------------------------------------------------------------------------------

def format_of(path: str | Path) -> Format:
    suffix = Path(path).suffix.lstrip(".").lower()
    fmt = {"csv": "csv", "json": "json", "jsonl": "json", "ndjson": "json", "parquet": "parquet", "pq": "parquet"}.get(suffix)
    if fmt is None:
        raise LakehouseError(f"cannot tell the output format of {path}: use .csv, .json/.jsonl or .parquet, or pass fmt")
    return fmt  # type: ignore[return-value]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def json_lines(result: pa.Table) -> Iterator[str]:
    """One JSON object per row; bytes as base64, times as ISO-8601."""
    for row in result.to_pylist():
        yield json.dumps(_jsonable(row), ensure_ascii=False)


def _flat_for_csv(result: pa.Table) -> pa.Table:
    """CSV holds scalars only: nested and binary cells become JSON text."""
    columns = []
    for column in result.columns:
        t = column.type
        if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            column = pa.array([None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.table(columns, names=result.column_names)


def write_result(result: pa.Table, dest: str | Path | IO[bytes], *, fmt: Format | None = None) -> None:
    """Write a query result as CSV, JSON lines or Parquet to a path or a binary stream."""
    if fmt is None:
        if not isinstance(dest, str | Path):
            raise LakehouseError("writing to a stream needs fmt='csv' | 'json' | 'parquet'")
        fmt = format_of(dest)
    if fmt not in FORMATS:
        raise LakehouseError(f"unknown format {fmt!r}; use one of {FORMATS}")
    if fmt == "parquet":
        pq.write_table(result, dest)
    elif fmt == "csv":
        pacsv.write_csv(_flat_for_csv(result), dest)
    else:
        text = "".join(line + "\n" for line in json_lines(result)).encode()
        if isinstance(dest, str | Path):
            Path(dest).write_bytes(text)
        else:
            dest.write(text)
