"""Tables copied straight from a running database into another: what a table
point-in-time restore reads from the scratch cluster recovered to the time.

:class:`LiveTables` is a :class:`backup_tool.logical.restore_tables.TableSource`, so the
selective restore's refusal rules, modes, owned sequences and validation apply unchanged.
What it guarantees:

- One exported snapshot of the source database, the tables share-locked in it. Each
  table's rows stream from ``psql``'s COPY TO STDOUT in that snapshot straight into COPY
  FROM STDIN on the target (one chunk in flight per table: memory does not grow with the
  table; in COPY's binary format where that is safe, see :meth:`LiveTables.load`), and each
  table's row count and content checksum are computed in the same snapshot
  by parallel sessions while the rows move. Validation compares the restored tables with
  those, exactly as with a backup taken of the source at that snapshot.
- Definitions come from ``pg_dump --schema-only --table`` of the source itself: no dump of
  the whole schema, no scratch database on the target. For ``--into-schema`` the tables
  are first moved, in the source, into that schema with their own sequences
  (:func:`backup_tool.logical.restore_tables.detach_copy`), which changes the source: only
  a disposable source (the scratch cluster) may be asked for that.
- Sequence values, the roles the database uses and its foreign keys (what the validation of
  tables restored in place compares the keys touching them with) are read before anything
  is moved.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, cast

import psycopg
from psycopg import sql

from backup_tool.core.checksum_methods import checksum_method_for
from backup_tool.core.kinds import BackupKind
from backup_tool.core.report import Reporter
from backup_tool.errors import RefusedError
from backup_tool.logical.loading import copy_rows
from backup_tool.logical.restore_tables import (
    Definitions,
    SequenceCopy,
    TableKey,
    archive_definitions,
    detach_copy,
    script_definitions,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import inventory as catalog_inventory
from backup_tool.postgres import roles, schema
from backup_tool.postgres.connection import ConnInfo, Snapshot, TableInfo
from backup_tool.repository.manifest import Manifest, ManifestInventory, TableEntry
from backup_tool.streams import pipeline
from backup_tool.streams.background import Background

FIRST_USER_OID = 16384
"""PostgreSQL's FirstNormalObjectId: types below it are built in (the same in every database
of a major version, so their binary COPY format means the same on both sides)."""


class LiveTables:
    """``tables`` (with their partitions) of the database ``conninfo`` points at, as a
    restore source named ``label`` (the manifest id validation reports against).

    ``into_schema``: the restore will be a copy there; the tables are moved there in the
    source first (see the module docstring). ``on_settled`` is called once, as soon as every
    table's rows are copied out and checksummed and the snapshot is closed: nothing reads the
    source any more (it may run on a worker thread, while the target still checksums and
    indexes the tables). Use as a context manager: leaving it closes every session it
    opened, and after that ``on_settled`` is never called."""

    def __init__(self, conninfo: ConnInfo, tables: set[TableKey], label: str, into_schema: str | None = None,
                 jobs: int = 2, on_settled: Callable[[], None] | None = None) -> None:
        conninfo = conninfo.with_search_path(postgres.NAME_SEARCH_PATH)
        self.conninfo = conninfo
        self.on_settled = on_settled
        self._read = 0
        self._lock = threading.Lock()
        self._sums: dict[TableKey, tuple[int, str]] = {}
        self._error: BaseException | None = None
        self._sessions: list[psycopg.Connection[Any]] = []
        self._snap: Snapshot | None = None
        self.snapshot_id = ""
        self._summing: threading.Thread | None = None
        self._dumping: Background[bytes] | None = None
        self._closed = False
        self._released = False
        self._pending = 1
        self.copies: tuple[SequenceCopy, ...] = ()
        with conninfo.connect() as conn:
            info = postgres.server_info(conn)
            self.major = int(info["server_version_num"]) // 10000
            self.encoding = str(info["encoding"])
            found = postgres.selected_tables(postgres.list_tables(conn), tables)
            sequences = postgres.sequences(conn)
            builtin = {int(oid): bool(ok) for oid, ok in conn.execute(
                "SELECT attrelid, bool_and(atttypid < %s) FROM pg_attribute"
                " WHERE attrelid = ANY(%s) AND attnum > 0 AND NOT attisdropped GROUP BY attrelid",
                (FIRST_USER_OID, [t.oid for t in found])).fetchall()}
            read = catalog_inventory.inventory(conn)
            entries = [TableEntry(t.schema, t.name, t.relkind, t.parent, t.columns, 0, "", None) for t in found]
            if into_schema:
                with conn.transaction():
                    self.copies = tuple(detach_copy(conn, entries, into_schema))
        now = datetime.now(timezone.utc)
        self._manifest = Manifest(
            id=label, kind=BackupKind.FULL, parent_id=None, database=str(info["database"]),
            server_version=str(info["server_version"]), server_version_num=int(info["server_version_num"]),
            encoding=self.encoding, system_identifier=str(info["system_identifier"]), started_at=now,
            finished_at=now, expires_at=now, policy={}, snapshot_lsn=None, schema=None, globals=None,
            schema_fingerprint="", tables=tuple(entries), sequences=tuple(sequences),
            inventory=cast(ManifestInventory, {"roles": read["roles"], "foreign_keys": read["foreign_keys"]}),
            options={"pinned": sorted(set(postgres.RECORDED_PINS) - conninfo.unpinned),
                     "search_path": postgres.NAME_SEARCH_PATH,
                     "inventory_read_with": dict(catalog_inventory.READ_WITH)},
            checksum_method=checksum_method_for(int(info["server_version_num"]) // 10000))
        self._builtin = {(t.schema, t.name): builtin.get(t.oid, True) for t in found}
        self._located: dict[TableKey, TableInfo] = {
            (t.schema, t.name): replace(t, schema=into_schema) if into_schema else t for t in found}
        try:
            if into_schema:
                self._dumping = Background(self._dump_definitions, list(self._located.values()), self.major)
            self._snap = Snapshot(conninfo)
            self._snap.lock_tables(list(self._located.values()))
            self.snapshot_id = self._snap.snapshot_id
            data = [t for t in found if t.has_data]
            self._pending = len(data) + 1
            self._summing = threading.Thread(target=self._sum_all, args=(data, jobs), daemon=True,
                                             name="live-table-checksums")
            self._summing.start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "LiveTables":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def _sum_all(self, tables: list[TableInfo], jobs: int) -> None:
        try:
            pipeline.run_parallel(max(1, jobs), [(self._sum, t) for t in tables])
        except BaseException as exc:  # noqa: BLE001 - handed to the restore by settled()
            self._error = exc
            return
        self._one_done()

    def _one_done(self) -> None:
        """A table's rows or the checksums are read: once all are, nothing reads the source
        any more and it is released at once (while the target checksums and indexes them)."""
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self._release()

    def _release(self) -> None:
        """Close the snapshot and call ``on_settled``, once."""
        with self._lock:
            if self._released:
                return
            self._released = True
            snap, self._snap = self._snap, None
        if snap is not None:
            snap.close()
        if self.on_settled is not None:
            self.on_settled()

    def _sum(self, table: TableInfo) -> None:
        if self._closed:
            return
        with postgres.snapshot_session(self.conninfo, self.snapshot_id) as conn:
            with self._lock:
                self._sessions.append(conn)
            try:
                located = self._located[(table.schema, table.name)]
                self._sums[(table.schema, table.name)] = postgres.table_checksum(
                    conn, located.schema, located.name, table.columns, self._manifest.checksum_method)
            finally:
                with self._lock:
                    self._sessions.remove(conn)

    def has_rows(self, entry: TableEntry) -> bool:
        return entry.relkind == "r"

    def size(self, entry: TableEntry) -> int:
        """The table's size on disk: the progress of its load is credited as its COPY text
        flows, never past that, and in full once loaded."""
        return self._located[(entry.schema, entry.name)].size

    def load(self, entry: TableEntry, conn: psycopg.Connection[Any], target: TableKey | None, fresh: bool,
             on_raw: Callable[[int], None]) -> None:
        """Stream the rows from the source's snapshot. Into a table this restore created
        (``fresh``: from the source's own definition) whose columns are all of built-in
        types, on a server of the source's major, in COPY's binary format (its parsing costs
        the target about a third less); else as text, which any column type accepts."""
        binary = fresh and self._builtin[(entry.schema, entry.name)] and \
            conn.info.server_version // 10000 == self.major
        argv = postgres.copy_out_command(self.conninfo, self.major, self.snapshot_id,
                                         self._located[(entry.schema, entry.name)], binary=binary)
        env = self.conninfo.tool_env(settings={})
        env["PGCLIENTENCODING"] = self.encoding
        proc = pipeline.Process(argv, env, f"COPY of {entry.full_name} from {self.conninfo.redacted()}")

        def rows() -> Any:
            for chunk in proc.chunks():
                with self._lock:
                    self._read += len(chunk)
                yield chunk
            proc.finish()

        share, credited = self.size(entry), 0

        def advance(n: int) -> None:
            nonlocal credited
            step = min(n, share - credited)
            if step > 0:
                credited += step
                on_raw(step)

        try:
            copy_rows(conn, entry, [rows()], target, fresh, advance, binary)
        finally:
            proc.kill()
        on_raw(share - credited)
        self._one_done()

    def ensure_roles(self, control: psycopg.Connection[Any], target: ConnInfo, major: int,
                     reporter: Reporter) -> frozenset[str]:
        missing = roles.missing_roles(control, self._manifest.inventory.get("roles", []))
        if missing:
            raise RefusedError(f"roles missing on the target server: {', '.join(missing)}",
                               "create them and rerun")
        return frozenset()

    def definitions(self, control: psycopg.Connection[Any], target: ConnInfo, major: int, tmp: Path,
                    create: list[TableEntry], into_schema: str | None) -> tuple[Definitions, tuple[SequenceCopy, ...]]:
        """From one ``pg_dump --schema-only --table`` of the source (started as the source
        opened when it is a copy: every table is created then), run as SQL in ``control``
        when its table of contents allows, else replayed by pg_restore."""
        located = [self._located[(t.schema, t.name)] for t in create]
        if self._dumping is not None and len(located) == len(self._located):
            archive = self._dumping.result()
        else:
            archive = self._dump_definitions(located, major)
        path = tmp / "tables.pgdump"
        path.write_bytes(archive)
        if into_schema:
            control.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(into_schema)))
        named = [replace(t, schema=into_schema) for t in create] if into_schema else create
        return (script_definitions(control, archive, path, named, major, self.encoding)
                or archive_definitions(path, archive, target, major)), self.copies

    def _dump_definitions(self, tables: list[TableInfo], major: int) -> bytes:
        return schema.dump_schema(self.conninfo, major, tables=[t.qualified for t in tables])

    def bytes_read(self) -> int:
        return self._read

    def settled(self) -> Manifest:
        """The manifest with each table's rows and checksum in the snapshot; the source is
        released (see :meth:`_release`) when it was not already."""
        if self._summing is not None:
            self._summing.join()
        if self._error is not None:
            raise self._error
        tables = tuple(replace(t, rows=self._sums[(t.schema, t.name)][0], checksum=self._sums[(t.schema, t.name)][1])
                       if (t.schema, t.name) in self._sums else t for t in self._manifest.tables)
        self._manifest = replace(self._manifest, tables=tables)
        self._release()
        return self._manifest

    def close(self) -> None:
        """Cancel checksums still running and close the snapshot (idempotent)."""
        self._closed = True
        with self._lock:
            for conn in self._sessions:
                try:
                    conn.cancel()
                except Exception:  # noqa: BLE001 - the session is ending anyway
                    pass
        if self._summing is not None and self._summing is not threading.current_thread():
            self._summing.join()
        if self._dumping is not None:
            self._dumping.join()
        with self._lock:
            snap, self._snap = self._snap, None
        if snap is not None:
            snap.close()


