"""What every logical restore shares: loading one table's rows and naming what a restore
brought back.

Kept apart from :mod:`backup_tool.logical.restore` so that a table restore loads only what
it runs (not the migrations, drift and whole-database machinery of a full restore).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import psycopg
from psycopg import sql

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import DatabaseError
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.manifest import Manifest, StoredObject, TableEntry, utc_iso
from backup_tool.repository.storage import Storage
from backup_tool.streams import pipeline

TableKey = tuple[str, str]


@dataclass(frozen=True)
class BackupOrigin:
    """What a restore brought back: the source database and the moment its data represents
    (the backup's snapshot, taken as it started) and when the backup finished."""

    database: str
    snapshot_at: datetime
    finished_at: datetime

    @classmethod
    def of(cls, manifest: Manifest) -> "BackupOrigin":
        return cls(manifest.database, manifest.started_at, manifest.finished_at)

    def to_dict(self) -> dict[str, str]:
        return {"database": self.database, "snapshot_at": utc_iso(self.snapshot_at),
                "backup_finished_at": utc_iso(self.finished_at)}


def load_table(conninfo: ConnInfo, storage: Storage, entry: TableEntry, encoding: str,
               advance: Callable[[int], None], conn: psycopg.Connection[Any] | None = None,
               target: tuple[str, str] | None = None, fresh: bool = False,
               on_raw: Callable[[int], None] | None = None, prefetch: pipeline.Prefetch | None = None) -> None:
    """COPY one table's objects (all its parts, in order, for a split table) into ``target``
    (default: the table itself), in one transaction (see :func:`copy_rows`). ``advance``
    counts the stored (compressed) bytes read, ``on_raw`` the uncompressed bytes written to
    COPY (what a progress bar over ``raw_size`` measures)."""
    assert entry.stored
    own = conn is None
    conn = conn or conninfo.connect(autocommit=True, settings={"client_encoding": encoding})
    contents = stored_contents(storage, entry.stored, advance, prefetch)
    try:
        copy_rows(conn, entry, contents, target, fresh, on_raw)
    finally:
        contents.close()
        if own:
            conn.close()


def stored_contents(storage: Storage, objects: Sequence[StoredObject], advance: Callable[[int], None],
                    prefetch: pipeline.Prefetch | None = None) -> Generator[Iterator[memoryview], None, None]:
    """The decompressed, checked content of each of ``objects`` in order, the next one's
    download started as the previous one is handed out: a split table's COPY then goes from
    one part to the next without waiting for the next part's first bytes. Whatever has not
    been read is stopped when the consumer stops early. A lone object ``prefetch`` fetched
    already is read from its bytes (checked as any other). Each piece is valid until the
    next is asked for (see :func:`backup_tool.streams.pipeline.decompress_views`): what
    :func:`copy_rows` needs, as it sends a piece before asking for the next."""
    if not objects:
        return
    current: pipeline.EarlyRead | None = None
    ahead: pipeline.EarlyRead | None = None
    try:
        first = objects[0]
        if len(objects) == 1:
            fetched = prefetch.take(first.key) if prefetch is not None else None
            yield pipeline.read_stored_views(storage, first.key, first.sha256, first.size, advance, fetched,
                                             first.raw_size)
            return
        ahead = pipeline.EarlyRead(storage, first, advance)
        for nxt in [*objects[1:], None]:
            current, ahead = ahead, (pipeline.EarlyRead(storage, nxt, advance) if nxt is not None else None)
            assert current is not None
            yield current.views()
    finally:
        for early in (current, ahead):
            if early is not None:
                early.close()


def copy_rows(conn: psycopg.Connection[Any], entry: TableEntry, streams: Iterable[Iterable[bytes | memoryview]],
              target: tuple[str, str] | None = None, fresh: bool = False,
              on_raw: Callable[[int], None] | None = None, binary: bool = False) -> None:
    """COPY the COPY-text ``streams`` (one COPY each, in order; ``binary``: in COPY's binary
    format) into ``target`` (default: the table itself) over the entry's columns, in one
    transaction of ``conn``: a stream that raises rolls all of it back. Each piece is sent
    before the next is asked for, so a stream may reuse one buffer for all its pieces.

    ``fresh``: the table was created by this restore and nothing references it yet, so it is
    truncated in the loading transaction and loaded with COPY FREEZE: rows arrive frozen with
    their hint bits set, so neither validation's scan nor the first VACUUM rewrites every page.
    """
    schema_name, name = target or (entry.schema, entry.name)
    stmt = postgres.copy_in_statement(schema_name, name, entry.columns, freeze=fresh, binary=binary)
    verified = _verified_encoding(conn)
    try:
        with conn.transaction(), conn.cursor() as cur:
            if verified is not None:
                cur.execute(sql.SQL("SET LOCAL client_encoding = {}").format(sql.Literal(verified)))
            if fresh:
                cur.execute(postgres.truncate_statement(schema_name, name))
            for stream in streams:
                with cur.copy(stmt) as copy:
                    for chunk in stream:
                        copy.write(chunk)
                        if on_raw is not None:
                            on_raw(len(chunk))
    except psycopg.Error as exc:
        raise load_failure(entry, exc) from None


def _verified_encoding(conn: psycopg.Connection[Any]) -> str | None:
    """The client encoding a COPY into ``conn``'s database must run under for the server to
    check its text, when that is not the session's: rows of a SQL_ASCII backup (bytes of no
    stated encoding, sent in SQL_ASCII) loaded into a database of another encoding. PostgreSQL
    checks neither converts text COPY under SQL_ASCII, and bytes invalid in the target's
    encoding were stored as they were (a UTF8 database holding invalid UTF-8, which its own
    reads, pg_dump included, then refuse). Under the target's encoding the bytes still go in
    as they are, and any the target cannot hold fail the load. None: the session's
    encoding stands."""
    info = conn.info
    server = info.parameter_status("server_encoding")
    if info.parameter_status("client_encoding") == "SQL_ASCII" and server not in (None, "SQL_ASCII"):
        return server
    return None


def load_failure(entry: TableEntry, exc: psycopg.Error) -> DatabaseError:
    """The one-line error of a COPY into ``entry`` that the server refused; a CHECK
    constraint's refusal says why rows the source held can fail (:data:`CHECK_HINT`)."""
    if isinstance(exc, psycopg.errors.CheckViolation):
        hint: str | None = CHECK_HINT
    elif isinstance(exc, (psycopg.errors.UndefinedColumn, psycopg.errors.InvalidTextRepresentation,
                          psycopg.errors.InvalidDatetimeFormat, psycopg.errors.NumericValueOutOfRange,
                          psycopg.errors.StringDataRightTruncation, psycopg.errors.NotNullViolation,
                          psycopg.errors.BadCopyFileFormat)):
        hint = COLUMNS_HINT
    else:
        hint = None
    return DatabaseError(f"loading {entry.full_name} failed: {str(exc).splitlines()[0]}", hint)


COLUMNS_HINT = ("the table's columns here are not the backup's (altered since the backup was taken?); nothing was "
                "kept: restore it with --into-schema NAME to get the backed-up table beside the live one, then copy "
                "the rows you need")


CHECK_HINT = ("these rows are the backup's, so the constraint reads more than its row (another table through a "
              "function, a setting, the time): PostgreSQL checks such a condition only when a row is written, and "
              "pg_restore of this backup fails the same way; in the source, fix the rows or enforce the rule with a "
              "trigger instead, then take a new backup")


def checksums_by_ranges(conninfo: ConnInfo, tables: dict[TableKey, Sequence[str]],
                        jobs: int, method: ChecksumMethod) -> dict[TableKey, tuple[int, str]]:
    """Row count and content checksum of each table (key: (schema, name), over its columns),
    each read as ``jobs`` ranges of its heap blocks by as many sessions at once and summed.

    For tables a restore has just loaded, which nothing else writes: the sessions do not
    share a snapshot, so on a table being written the ranges could see different moments."""
    if not tables:
        return {}
    with conninfo.connect() as conn:
        oids = {key: int(postgres.scalar(conn, "SELECT %s::regclass::oid", (postgres.quoted_table(*key),)))
                for key in tables}
        heaps = postgres.heap_blocks(conn, list(oids.values()))
    pieces: dict[TableKey, list[tuple[int, str]]] = {key: [] for key in tables}
    tasks = [(key, span) for key in tables for span in postgres.block_ranges(heaps.get(oids[key], 0), jobs)]

    def one(task: tuple[TableKey, postgres.BlockRange]) -> None:
        key, span = task
        with conninfo.connect() as session:
            pieces[key].append(postgres.table_checksum(session, *key, tables[key], method, span))

    pipeline.run_parallel(max(1, jobs), [(one, t) for t in tasks])
    return {key: postgres.combine_checksums(found) for key, found in pieces.items()}
