"""Errors of the lakehouse package. Every message says what went wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable


class LakehouseError(Exception):
    """Base class of every error raised by :mod:`lakehouse`."""


class UnknownTableError(LakehouseError, KeyError):
    """A table name that is not one of the lakehouse's table definitions."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"no table definition named {name!r}; the lakehouse defines {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class TableNotFoundError(LakehouseError):
    """A table is defined but was not created yet under this root (nothing has been written to it)."""

    def __init__(self, name: str, root: str, existing: Iterable[str], *, defined: Iterable[str] | None = None) -> None:
        self.name = name
        self.root = root
        self.existing = sorted(existing)
        have = ", ".join(self.existing) if self.existing else "none yet"
        if defined is not None and name not in set(defined):
            fix = f"the lakehouse has no table of that name (its tables: {', '.join(sorted(defined))})"
        else:
            fix = "write to it first (e.g. run the stream processor or `sop demos`), or check SOP_LAKE_URI"
        super().__init__(f"table {name!r} does not exist under {root} (tables there: {have}); {fix}")


class SchemaMismatchError(LakehouseError):
    """Rows or an existing table do not fit the table definition."""


class WriteConflictError(LakehouseError):
    """A commit kept conflicting with concurrent commits after every retry."""


class StorageUnavailableError(LakehouseError):
    """The object store kept failing (connection refused, 5xx) for longer than the writer retries."""


class ReaderFellBehindError(LakehouseError):
    """Files an incremental read needs were vacuumed, or their log entries cleaned up."""

    def __init__(self, table_uri: str, since_version: int, cause: BaseException) -> None:
        self.table_uri = table_uri
        self.since_version = since_version
        super().__init__(
            f"cannot read the changes of {table_uri} after version {since_version}: the files or log entries "
            f"they need were removed by vacuum or log clean-up ({cause}). Restart the reader from a snapshot "
            f"(rows_since(table, None)), and keep readers within the vacuum retention "
            f"(delta.deletedFileRetentionDuration)."
        )


class VersionNotFoundError(LakehouseError):
    """Time travel to a version or timestamp the table does not have."""


class QueryError(LakehouseError):
    """A SQL query failed; the message keeps the engine's explanation."""
