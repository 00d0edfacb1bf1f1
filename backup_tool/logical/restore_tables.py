"""Selective restore: bring back some tables from a backup without touching anything else.

Only the manifest, the schema archive and the chosen tables' objects are downloaded. A
partitioned table selects all its partitions; a single partition can be chosen alone.

Three modes, each refusing rather than overwriting by accident:

- default: each table is restored where it was if it is absent (created from the backup's
  definition) or empty; a table holding rows is refused and nothing changes. Absent tables
  loaded by one session are created and loaded in one transaction: a load that fails leaves
  no new table behind. Whatever the sessions, a restore that fails before it is complete
  (a load, the indexes and constraints, an interruption) takes back what it did (see
  :class:`Undo`): the target is left as it was found. A restore that completes but fails
  validation keeps the tables, for inspection.
- ``into_schema``: the tables are recreated (columns, defaults, check and unique
  constraints, indexes, RLS and policies; not foreign keys or triggers, which would tie an
  inspection copy to live data) in a separate schema, live data untouched. A partitioned
  table comes back as its tree. Every sequence the copy's columns use is the copy's own, in
  that schema, owned by a copied column and set to the backup's value: nothing the copy
  does reaches a live sequence.
- ``replace``: the tables' contents are replaced in one transaction (readers see the old
  rows until commit, never a half-loaded table), with triggers silenced and no cascading
  to other tables; a partitioned table is replaced through its leaf partitions, all in that
  transaction, its leaf partitions the backup lacks emptied there too. Foreign keys from and
  to the replaced tables are then checked and any violation rolls everything back,
  reporting the orphan rows per foreign key. Owned
  sequences are moved forward (never back) past both the backed-up value and the data (a
  CYCLE sequence past the backed-up value only: see ``_MOVE_FORWARD``).

Restored in place (default or ``replace``), tables the restore leaves out that reference a
restored one ``ON DELETE CASCADE`` (directly or through each other) or ``SET NULL``/``SET
DEFAULT`` are named in a warning (:func:`cascade_referrers`): a ``DELETE`` on the restored
tables took their rows along or reset their references, and the verdict speaks of the
restored tables only.

Every mode refuses, before writing anything, a backup of a SQL_ASCII database into a
database of another encoding (see :func:`backup_tool.postgres.connection.refuse_unchecked_bytes`).

Table definitions are taken from the backup's own schema archive: it is replayed into a
scratch database, the tables moved to the inspection schema if asked, and pg_dump then
extracts exactly those tables' definitions (with their indexes, constraints, owned
sequences, policies and grants) in PostgreSQL's own quoting.

The same restore runs from a running database instead of a backup
(:func:`restore_tables_from` with a :class:`TableSource`, e.g.
:class:`backup_tool.logical.live_tables.LiveTables` for table PITR): same modes, refusals and
validation, against the source's rows and checksums.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import psycopg
from psycopg import sql

from backup_tool.config.settings import Settings
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.errors import (
    DatabaseError,
    LockHeldError,
    RefusedError,
    UsageError,
    ValidationFailed,
)
from backup_tool.logical.loading import BackupOrigin, checksums_by_ranges, copy_rows, load_failure
from backup_tool.logical.selection import as_typed, check_into_schema, resolve_tables
from backup_tool.logical.session_ahead import SessionAhead, open_session_ahead
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import roles, schema
from backup_tool.postgres.connection import ConnInfo, qualified
from backup_tool.postgres.triggers import Quieted, quiet_triggers, wake_triggers
from backup_tool.repository.catalog import Catalog, DatabaseHint
from backup_tool.repository.manifest import Manifest, SequenceRecord, StoredObject, TableEntry, utc_iso
from backup_tool.repository.storage import Storage, open_repository
from backup_tool.streams import pipeline, testhooks
from backup_tool.validation.validate import (
    Check,
    ValidationReport,
    check_foreign_keys,
    check_sequences,
    check_tables,
    compare_sets,
    table_checksums,
)

TableKey = tuple[str, str]

RANGED_CHECKSUM_BYTES = 32 * 2**20
"""A table loaded alone at least this big is checksummed by ``jobs`` sessions at once, each
over a range of its heap blocks, instead of by the session that loaded it."""


@dataclass(frozen=True)
class SequenceCopy:
    """A sequence an ``--into-schema`` copy uses: ``source`` in the backup, ``copy`` in the
    inspection schema, used by ``column`` of ``table`` (the copy's location)."""

    source: TableKey
    copy: TableKey
    table: TableKey
    column: str


@dataclass(frozen=True)
class TableDefinitions:
    """The pg_dump archive of the tables' definitions and, for a copy, the sequences it owns."""

    archive: bytes
    sequences: tuple[SequenceCopy, ...]


@dataclass(frozen=True)
class TablesRestoreResult:
    backup_id: str
    target: str
    tables: tuple[str, ...]
    mode: str
    into_schema: str | None
    rows: int
    bytes_read: int
    seconds: float
    validation: ValidationReport | None
    sequences: tuple[SequenceCopy, ...] = ()
    source: BackupOrigin | None = None
    recovered_to: datetime | None = None
    recovery_layout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"recovery_layout": self.recovery_layout} if self.recovery_layout is not None else {}),
            "backup_id": self.backup_id,
            **(self.source.to_dict() if self.source else {}),
            "recovered_to": utc_iso(self.recovered_to) if self.recovered_to else None,
            "target": self.target,
            "tables": list(self.tables),
            "mode": self.mode,
            "into_schema": self.into_schema,
            "rows": self.rows,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "ok": self.validation.ok if self.validation else None,
            "validation": self.validation.to_dict() if self.validation else None,
            "sequence_copies": [{"source": ".".join(c.source), "copy": ".".join(c.copy),
                           "column": f"{'.'.join(c.table)}.{c.column}"} for c in self.sequences],
        }


def _state(conn: psycopg.Connection[Any], schema_name: str, name: str) -> str:
    """'absent', 'empty' or 'rows' for a table in the target database."""
    row = conn.execute("SELECT to_regclass(%s)", (postgres.quoted_table(schema_name, name),)).fetchone()
    if not row or row[0] is None:
        return "absent"
    has = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(qualified(schema_name, name))).fetchone()
    return "rows" if has and has[0] else "empty"


def refuse_orphan_partitions(conn: psycopg.Connection[Any], manifest: Manifest, create: list[TableEntry]) -> None:
    """Refuse, before anything is written, partitions to create whose partitioned table is
    neither restored with them nor in the target: they could only be attached to it. The
    refusal names the topmost such ancestor, whose restore brings the whole tree."""
    creating = {t.full_name for t in create}
    known = {t.full_name: t for t in manifest.tables}
    present: dict[str, bool] = {}

    def absent(name: str | None) -> bool:
        if name is None or name not in known or name in creating:
            return False
        if name not in present:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                               (postgres.quoted_table(known[name].schema, known[name].name),)).fetchone()
            present[name] = bool(row and row[0])
        return not present[name]

    for t in create:
        if absent(t.parent):
            assert t.parent is not None
            parent = known[t.parent]
            while absent(parent.parent):
                assert parent.parent is not None
                parent = known[parent.parent]
            name = as_typed(parent.schema, parent.name)
            raise RefusedError(f"partition {as_typed(t.schema, t.name)} cannot be restored without its partitioned "
                               f"table {name}, which the target database lacks",
                               f"name {name} too (it brings its partitions), or restore it beside with "
                               f"--tables {name} --into-schema NAME")


def missing_schemas(conn: psycopg.Connection[Any], schemas: set[str]) -> list[str]:
    """Those of ``schemas`` the database lacks, sorted: a table is restored into its own schema,
    which ``restore tables`` does not create (as ``pg_restore --table``), so the restore is
    refused before anything is written rather than failing halfway through its definitions."""
    if not schemas:
        return []
    found = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                                        (sorted(schemas),)).fetchall()}
    return sorted(schemas - found)


def _pattern(schema_name: str, name: str) -> str:
    return postgres.quoted_table(schema_name, name)


_COLUMN_SEQUENCES = """
    SELECT a.attname, n.nspname, s.relname, s.oid
      FROM (SELECT ad.adnum AS attnum, d.refobjid AS seq
              FROM pg_attrdef ad
              JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                              AND d.refclassid = 'pg_class'::regclass
             WHERE ad.adrelid = %(table)s::regclass
            UNION
            SELECT d.refobjsubid, d.objid FROM pg_depend d
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = %(table)s::regclass AND d.deptype = 'i') used
      JOIN pg_class s ON s.oid = used.seq AND s.relkind = 'S'
      JOIN pg_namespace n ON n.oid = s.relnamespace
      JOIN pg_attribute a ON a.attrelid = %(table)s::regclass AND a.attnum = used.attnum
     ORDER BY a.attnum"""


def column_sequences(conn: psycopg.Connection[Any], schema_name: str, name: str) -> list[tuple[str, str, str, int]]:
    """(column, sequence schema, sequence name, sequence oid) for each column of the table whose
    default calls nextval() or that is an identity column."""
    rows = conn.execute(_COLUMN_SEQUENCES, {"table": postgres.quoted_table(schema_name, name)}).fetchall()
    return [(r[0], r[1], r[2], int(r[3])) for r in rows]


def _owner(conn: psycopg.Connection[Any], schema_name: str, name: str) -> str:
    row = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
                       (postgres.quoted_table(schema_name, name),)).fetchone()
    assert row is not None
    return str(row[0])


def _free_name(conn: psycopg.Connection[Any], schema_name: str, name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... : the first that no relation in the schema has."""
    candidate, n = name, 1
    while conn.execute("SELECT 1 FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace"
                       " WHERE ns.nspname = %s AND c.relname = %s", (schema_name, candidate)).fetchone():
        n += 1
        candidate = f"{name[:60]}_{n}"
    return candidate


def detach_copy(conn: psycopg.Connection[Any], tables: list[TableEntry], into_schema: str) -> list[SequenceCopy]:
    """In the scratch database: move ``tables`` into ``into_schema`` without foreign keys,
    triggers and inheritance from a parent left behind (the copy's rows would show in the live
    parent), and give them their own sequences there, each owned by a copied column.

    Sequences owned by a copied column move with their table; a sequence the copy only calls
    (a shared one, or one owned elsewhere) is moved into the schema too and made owned by the
    first copied column that uses it, so the copy's defaults never reach a live sequence.

    The scratch database's event triggers are disabled first (those the session may alter:
    a superuser's, every one): moving tables is DDL, and an event trigger may refuse it or read
    a table a table-PITR scratch cluster's partial lay-out left out (``periods`` reads
    ``periods.periods`` on every ``ddl_command_end``), which would fail the restore.
    """
    for (trigger,) in conn.execute("SELECT evtname FROM pg_event_trigger WHERE evtenabled <> 'D'"
                                   " AND pg_has_role(evtowner, 'USAGE')").fetchall():
        conn.execute(sql.SQL("ALTER EVENT TRIGGER {} DISABLE").format(sql.Identifier(trigger)))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(into_schema)))
    used: list[tuple[TableEntry, str, TableKey, int]] = []
    moved = {(t.schema, t.name) for t in tables}
    for t in tables:
        table = postgres.quoted_table(t.schema, t.name)
        for parent in conn.execute(
                "SELECT n.nspname, p.relname FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
                " JOIN pg_namespace n ON n.oid = p.relnamespace JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhrelid = %s::regclass AND NOT c.relispartition", (table,)).fetchall():
            if (parent[0], parent[1]) not in moved:
                conn.execute(sql.SQL("ALTER TABLE {} NO INHERIT {}").format(
                    qualified(t.schema, t.name), qualified(parent[0], parent[1])))
        for (con,) in conn.execute(
                "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = %s::regclass"
                " AND conparentid = 0", (table,)).fetchall():
            conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                qualified(t.schema, t.name), sql.Identifier(con)))
        for (trg,) in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgparentid = 0"
                " AND tgrelid = %s::regclass", (table,)).fetchall():
            conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(trg), qualified(t.schema, t.name)))
        used += [(t, column, (seq_schema, seq_name), oid)
                 for column, seq_schema, seq_name, oid in column_sequences(conn, t.schema, t.name)]
    for t in tables:
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
            qualified(t.schema, t.name), sql.Identifier(into_schema)))
    copies: list[SequenceCopy] = []
    for t, column, source, oid in used:
        row = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                           " ON n.oid = c.relnamespace WHERE c.oid = %s", (oid,)).fetchone()
        assert row is not None
        if row[0] != into_schema:
            conn.execute(sql.SQL("ALTER SEQUENCE {} OWNER TO {}").format(
                qualified(row[0], row[1]), sql.Identifier(_owner(conn, into_schema, t.name))))
            conn.execute(sql.SQL("ALTER SEQUENCE {} OWNED BY NONE").format(qualified(row[0], row[1])))
            name = _free_name(conn, into_schema, row[1])
            if name != row[1]:
                conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
                    qualified(row[0], row[1]), sql.Identifier(name)))
            conn.execute(sql.SQL("ALTER SEQUENCE {} SET SCHEMA {}").format(
                qualified(row[0], name), sql.Identifier(into_schema)))
            conn.execute(sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(
                qualified(into_schema, name), sql.Identifier(into_schema, t.name, column)))
            row = (into_schema, name)
        copies.append(SequenceCopy(source, (row[0], row[1]), (into_schema, t.name), column))
    return copies


def extract_definitions(target: ConnInfo, major: int, archive_path: Path, tables: list[TableEntry],
                        into_schema: str | None) -> TableDefinitions:
    """A pg_dump archive holding just ``tables``' definitions (moved to ``into_schema`` if given,
    with their own sequences there: see :func:`detach_copy`), read from a scratch database
    holding only what those definitions need (:func:`schema.definition_closure`: a table of a
    database of thousands costs its own definitions, not the whole schema's replay), or, where
    that cannot be told or its replay fails, the whole schema."""
    for only in scratch_attempts(archive_path, {(t.schema, t.name) for t in tables}):
        try:
            return _definitions_in_scratch(target, major, archive_path, tables, into_schema, only)
        except (DatabaseError, psycopg.Error):
            pass
    return _definitions_in_scratch(target, major, archive_path, tables, into_schema, None)


def scratch_attempts(archive_path: Path, tables: set[TableKey]) -> list[set[int]]:
    """What a scratch database holds for the tables' definitions, smallest first, before the
    whole schema: what they depend on, then that and every extension
    (:func:`schema.definition_closure`); none when their entries cannot be told."""
    try:
        toc = schema.read_toc(archive_path.read_bytes())
    except schema.UnreadableToc:
        return []
    closures = [schema.definition_closure(toc, tables, extensions) for extensions in (False, True)]
    return [c for i, c in enumerate(closures) if c is not None and c not in closures[:i]]


def _definitions_in_scratch(target: ConnInfo, major: int, archive_path: Path, tables: list[TableEntry],
                            into_schema: str | None, only: set[int] | None) -> TableDefinitions:
    scratch_name = f"backup_tool_scratch_{secrets.token_hex(4)}"
    with target.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(scratch_name)))
    scratch = target.with_database(scratch_name)
    try:
        schema.replay_into_scratch(archive_path, scratch, major, only)
        where = [(t.schema, t.name) for t in tables]
        copies: list[SequenceCopy] = []
        if into_schema:
            with scratch.connect() as conn, conn.transaction():
                copies = detach_copy(conn, tables, into_schema)
            where = [(into_schema, t.name) for t in tables]
        return TableDefinitions(schema.dump_schema(scratch, major, tables=[_pattern(*w) for w in where]),
                                tuple(copies))
    finally:
        with target.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch_name)))


def _is_superuser(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def _fks_touching(conn: psycopg.Connection[Any], keys: set[TableKey]) -> list[dict[str, Any]]:
    return postgres.foreign_keys(conn, touching=sorted(keys))


_CASCADE_REFERRERS = """
    WITH RECURSIVE restored(oid) AS (
        SELECT to_regclass(format('%%I.%%I', s, n))::oid FROM unnest(%s::text[], %s::text[]) u(s, n)),
    reached(oid) AS (
        SELECT c.conrelid FROM pg_catalog.pg_constraint c
         WHERE c.contype = 'f' AND c.confdeltype = 'c' AND c.conparentid = 0
           AND c.confrelid IN (SELECT oid FROM restored)
        UNION
        SELECT c.conrelid FROM pg_catalog.pg_constraint c JOIN reached r ON c.confrelid = r.oid
         WHERE c.contype = 'f' AND c.confdeltype = 'c' AND c.conparentid = 0),
    touched(oid) AS (
        SELECT oid FROM reached
        UNION
        SELECT c.conrelid FROM pg_catalog.pg_constraint c
         WHERE c.contype = 'f' AND c.confdeltype IN ('n', 'd') AND c.conparentid = 0
           AND (c.confrelid IN (SELECT oid FROM restored) OR c.confrelid IN (SELECT oid FROM reached)))
    SELECT n.nspname, k.relname FROM touched r
      JOIN pg_catalog.pg_class k ON k.oid = r.oid JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
     WHERE r.oid NOT IN (SELECT oid FROM restored WHERE oid IS NOT NULL) ORDER BY 1, 2"""


def cascade_referrers(conn: psycopg.Connection[Any], keys: set[TableKey]) -> list[TableKey]:
    """The tables not among ``keys`` that reference one of them ``ON DELETE CASCADE``, directly
    or through each other, and those referencing one of either ``ON DELETE SET NULL`` or ``SET
    DEFAULT`` (a catalog read, no table scanned).

    A ``DELETE`` on a restored table took their referencing rows along or rewrote their
    references; a table restore
    writes no other table, so those rows stay gone while the restore's verdict, about the
    restored tables, says they are complete: Prefect's ``flow`` restored after a
    ``DELETE FROM flow`` came back whole, its ``flow_run`` and ``task_run`` rows did not.
    """
    ordered = sorted(keys)
    rows = conn.execute(_CASCADE_REFERRERS, ([k[0] for k in ordered], [k[1] for k in ordered])).fetchall()
    return [(r[0], r[1]) for r in rows]


def _owned_sequences(manifest: Manifest, keys: set[TableKey]) -> Iterator[SequenceRecord]:
    for seq in manifest.sequences:
        owner = seq.get("owned_by")
        if owner and (owner["schema"], owner["table"]) in keys:
            yield seq


_MOVE_FORWARD = """
    SELECT pg_catalog.setval({seq}::regclass, CASE
             WHEN s.seqcycle AND s.seqincrement > 0 THEN GREATEST((SELECT last_value FROM {seqtab}), {value})
             WHEN s.seqcycle THEN LEAST((SELECT last_value FROM {seqtab}), {value})
             WHEN s.seqincrement > 0 THEN GREATEST((SELECT last_value FROM {seqtab}), {value},
                                                   coalesce((SELECT max({col}) FROM {tab}), {value}))
             ELSE LEAST((SELECT last_value FROM {seqtab}), {value}, coalesce((SELECT min({col}) FROM {tab}), {value}))
           END, true)
      FROM pg_catalog.pg_sequence s WHERE s.seqrelid = {seq}::regclass"""
"""Moves a replaced table's owned sequence forward, never back, past the backed-up value and,
in its direction (a descending one down, past the column's minimum), past the data. A
CYCLE sequence is not moved past the data: its column holds values of earlier laps, so at
the column's end it would wrap and hand out the values the rows hold."""


def _referenced(conn: psycopg.Connection[Any], schema_name: str, name: str) -> bool:
    """Whether a foreign key references the table or a partitioned table it belongs to (a
    partition is referenced through its ancestors, so TRUNCATE would refuse it)."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE contype = 'f' AND (confrelid = %(t)s::regclass"
        " OR confrelid IN (SELECT relid FROM pg_partition_ancestors(%(t)s::regclass))))",
        {"t": postgres.quoted_table(schema_name, name)}).fetchone()
    return bool(row and row[0])


def leaves_beyond(conn: psycopg.Connection[Any], entries: list[TableEntry], restored: set[TableKey]) -> list[TableKey]:
    """The leaf partitions (plain tables) the target's partitioned tables among ``entries``
    have beyond ``restored``: those attached since the backup (pg_partman's premade days),
    whose rows are rows of the partitioned table the backup did not have. Sorted."""
    parents = [postgres.quoted_table(t.schema, t.name) for t in entries if t.relkind == "p"]
    if not parents:
        return []
    rows = conn.execute("SELECT DISTINCT n.nspname, c.relname FROM unnest(%s::text[]) AS p(name)"
                        " CROSS JOIN LATERAL pg_partition_tree(p.name::regclass) t"
                        " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE t.isleaf AND c.relkind = 'r'", (parents,)).fetchall()
    return sorted(k for k in ((str(r[0]), str(r[1])) for r in rows) if k not in restored)


def replace_in_place(conn: psycopg.Connection[Any], source: TableSource, entries: list[TableEntry],
                     replace: bool, on_raw: Callable[[int], None],
                     on_wait: Callable[[str], None] = lambda _: None, beside: frozenset[TableKey] = frozenset()) -> None:
    """Load (after emptying, when replacing) existing tables in ONE transaction, or roll back.

    Each table is first locked against other writers (and, when it is truncated, readers)
    until the commit, so no row written meanwhile mixes with the restored ones; a lock other
    sessions hold is waited for, ``on_wait`` told who holds it
    (:func:`backup_tool.postgres.connection.lock_for_writing`).

    A partitioned table holds no rows of its own: it is neither emptied nor loaded, its
    partitions (always among ``entries``) are, so the whole tree is replaced at once. When
    replacing, its leaf partitions the backup does not have (:func:`leaves_beyond`; tables
    ``beside``, created by this restore, aside) are emptied too, in the same way: the
    partitioned table then holds the backup's rows and no others."""
    manifest = source.manifest
    keys = {(t.schema, t.name) for t in entries}
    superuser = _is_superuser(conn)
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL client_encoding = {}").format(sql.Literal(manifest.encoding)))
        if superuser:
            conn.execute("SET LOCAL session_replication_role = replica")
        quieted: Quieted = {}
        beyond = leaves_beyond(conn, entries, keys | beside) if replace else []

        def lock_and_empty(schema_name: str, name: str) -> None:
            target = qualified(schema_name, name)
            referenced = replace and _referenced(conn, schema_name, name)
            postgres.lock_for_writing(conn, schema_name, name, truncating=replace and not referenced,
                                      on_wait=on_wait)
            quieted[(schema_name, name)] = quiet_triggers(conn, schema_name, name)
            if replace:
                if referenced and not superuser:
                    raise RefusedError(f"--replace of {schema_name}.{name}, which other tables reference, needs a "
                                       "superuser", "connect as a superuser, or use --into-schema")
                if referenced:
                    conn.execute(sql.SQL("DELETE FROM ONLY {}").format(target))
                else:
                    conn.execute(sql.SQL("TRUNCATE ONLY {}").format(target))

        for t in entries:
            if t.relkind == "p":
                continue
            lock_and_empty(t.schema, t.name)
            if source.has_rows(t):
                source.load(t, conn, None, False, on_raw)
        for key in beyond:
            lock_and_empty(*key)
        keys |= set(beyond)
        wake_triggers(conn, quieted)
        for seq in _owned_sequences(manifest, keys):
            owner = seq.get("owned_by")
            assert owner is not None
            conn.execute(sql.SQL(_MOVE_FORWARD).format(
                seq=sql.Literal(postgres.quoted_table(seq["schema"], seq["name"])),
                seqtab=qualified(seq["schema"], seq["name"]), col=sql.Identifier(owner["column"]),
                tab=qualified(owner["schema"], owner["table"]), value=sql.Literal(seq["last_value"])))
        check = check_foreign_keys(conn, _fks_touching(conn, keys))
        if not check.ok:
            raise RefusedError(f"restoring {', '.join(t.full_name for t in entries)} would break foreign keys, "
                               f"rolled back: {check.detail}",
                               "restore the referenced tables too, or use --into-schema to inspect")


class Definitions:
    """How the chosen tables' definitions reach the target: ``before_data`` creates the
    tables (and their sequences and defaults) before the rows load, ``after_data`` their
    indexes, constraints, triggers and policies after. ``before_sql``: the SQL
    ``before_data`` runs in the restore's own session, when that is how they come (the
    restore may then run it in the transaction that loads the tables instead)."""

    def __init__(self, before_data: Callable[[], None], after_data: Callable[[], None],
                 before_sql: bytes | None = None) -> None:
        self.before_data = before_data
        self.after_data = after_data
        self.before_sql = before_sql

    @property
    def in_session(self) -> bool:
        """Whether both halves run as SQL in the restore's own session (so they may share
        its transactions), rather than in pg_restore's."""
        return self.before_sql is not None


def _run_script(conn: psycopg.Connection[Any], script: bytes, section: str) -> None:
    """Run pg_restore's SQL in one transaction in ``conn``, then give the session its own
    settings back (the script sets search_path, row_security...)."""
    try:
        with conn.transaction():
            conn.execute(script)
    except psycopg.Error as exc:
        state = f" [SQLSTATE {exc.sqlstate}]" if exc.sqlstate else ""
        raise DatabaseError(f"pg_restore ({section}) failed: {str(exc).splitlines()[0]}{state}") from None
    finally:
        conn.execute("RESET ALL")


def script_definitions(conn: psycopg.Connection[Any], archive: bytes, archive_path: Path,
                        tables: list[TableEntry], major: int, encoding: str) -> Definitions | None:
    """The tables' definitions selected from the backup's own schema archive (see
    :func:`schema.table_definition_ids`), as SQL from one pg_restore run, executed in
    ``conn``. None when the archive's table of contents cannot be read or the selection is
    ambiguous: the caller then extracts them with pg_dump (:func:`extract_definitions`).
    ``conn``'s client encoding must be ``encoding``, the archive's."""
    try:
        toc = schema.read_toc(archive)
    except schema.UnreadableToc:
        return None
    ids = schema.table_definition_ids(toc, {(t.schema, t.name) for t in tables})
    if ids is None:
        return None
    chosen = set(ids)
    schema.refuse_missing_tablespaces(conn, schema.tablespaces(e for e in toc if e.dump_id in chosen))
    scripts = schema.definition_scripts(archive_path, toc, ids, major,
                                        utf8=encoding.upper().replace("-", "") == "UTF8")
    return Definitions(lambda: _run_script(conn, scripts.before_data, "pre-data"),
                       lambda: _run_script(conn, scripts.after_data, "post-data") if scripts.after_data else None,
                       scripts.before_data)


def create_and_load(conn: psycopg.Connection[Any], before_sql: bytes, source: BackupSource,
                    loads: list[tuple[TableEntry, TableKey]], on_raw: Callable[[int], None]) -> None:
    """Create the tables (``before_sql``, pg_restore's pre-data) and COPY their rows in ONE
    transaction of ``conn``: a load that fails (a damaged object, a row the table refuses)
    takes the new tables with it, so the target is left as it was found. Created in that
    transaction, the tables take COPY FREEZE without being truncated first (a truncation
    leaves a file to drop at commit: 10-20 ms more). The session's settings are its own
    again afterwards (the script's SETs, search_path, row_security..., are reset in the
    transaction, or undone with it)."""
    with conn.transaction():
        try:
            conn.execute(before_sql)
        except psycopg.Error as exc:
            raise DatabaseError(f"pg_restore (pre-data) failed: {str(exc).splitlines()[0]}") from None
        conn.execute("RESET ALL")
        for entry, where in loads:
            source.load_created(entry, conn, where, on_raw)


def archive_definitions(path: Path, archive: bytes, target: ConnInfo, major: int) -> Definitions:
    """Definitions from a pg_dump archive of just the tables, replayed by pg_restore."""
    path.write_bytes(archive)
    return Definitions(lambda: schema.restore_section(path, target, major, "pre-data"),
                       lambda: schema.restore_section(path, target, major, "post-data"))


class TableSource(Protocol):
    """Where a selective restore takes the tables from: a backup in a repository
    (:class:`BackupSource`) or a running database
    (:class:`backup_tool.logical.live_tables.LiveTables`). The restore's refusal rules,
    modes and validation are the same for both."""

    @property
    def manifest(self) -> Manifest:
        """The tables (their rows and checksums need not be known yet: see :meth:`settled`),
        sequences, encoding and server version of the source."""

    def has_rows(self, entry: TableEntry) -> bool:
        """Whether the table has rows to load (a partitioned table has none of its own)."""

    def size(self, entry: TableEntry) -> int:
        """About how many bytes of COPY text loading the table writes (for progress)."""

    def load(self, entry: TableEntry, conn: psycopg.Connection[Any], target: TableKey | None, fresh: bool,
             on_raw: Callable[[int], None]) -> None:
        """COPY the table's rows into ``target`` in one transaction of ``conn`` (see
        :func:`backup_tool.logical.loading.copy_rows`)."""

    def ensure_roles(self, control: psycopg.Connection[Any], target: ConnInfo, major: int,
                     reporter: Reporter) -> frozenset[str]:
        """Refuse (or create, when asked) the roles the source needs that the target lacks;
        return the roles created."""

    def definitions(self, control: psycopg.Connection[Any], target: ConnInfo, major: int, tmp: Path,
                    create: list[TableEntry], into_schema: str | None) -> tuple[Definitions, tuple[SequenceCopy, ...]]:
        """How ``create`` reach the target (moved to ``into_schema`` with their own sequences,
        when given), and those sequences."""

    def bytes_read(self) -> int:
        """Bytes read from the source so far."""

    def settled(self) -> Manifest:
        """Called once every table is loaded: the manifest whose rows and checksums the
        restored tables must match."""


class BackupSource:
    """The tables of a logical backup in a repository."""

    def __init__(self, storage: Storage, manifest: Manifest, with_roles: bool = False) -> None:
        self.storage = storage
        self._manifest = manifest
        self.with_roles = with_roles
        self._read = [0]
        self._lock = threading.Lock()
        self._early: dict[str, pipeline.EarlyRead] = {}

    def prefetch(self, entries: list[TableEntry], tables: int) -> None:
        """Start downloading, in the background, the first object of the first ``tables`` of
        ``entries`` that have rows (the loads that start at once), so its request and first
        chunks overlap the target's checks and the tables' definitions instead of following
        them. Each is read once, by the load; :meth:`close` stops what no load took (a
        refused restore). The schema archive is read only once a table turns out absent."""
        for obj in [t.stored[0] for t in entries if t.stored][:max(0, tables)]:
            if obj.key not in self._early:
                self._early[obj.key] = pipeline.EarlyRead(self.storage, obj, self._count)

    def _chunks(self, obj: StoredObject) -> Iterator[bytes]:
        """The object's content: from its early read when one was started, else read now."""
        with self._lock:
            early = self._early.pop(obj.key, None)
        if early is not None:
            return early.chunks()
        return pipeline.read_stored(self.storage, obj.key, obj.sha256, obj.size, self._count)

    def close(self) -> None:
        """Stop the early reads nobody took (a refused or failed restore)."""
        with self._lock:
            early, self._early = list(self._early.values()), {}
        for read in early:
            read.close()

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def _count(self, n: int) -> None:
        with self._lock:
            self._read[0] += n

    def has_rows(self, entry: TableEntry) -> bool:
        return bool(entry.stored)

    def size(self, entry: TableEntry) -> int:
        return entry.raw_size

    def load(self, entry: TableEntry, conn: psycopg.Connection[Any], target: TableKey | None, fresh: bool,
             on_raw: Callable[[int], None]) -> None:
        copy_rows(conn, entry, (self._chunks(obj) for obj in entry.stored), target, fresh, on_raw)

    def load_created(self, entry: TableEntry, conn: psycopg.Connection[Any], target: TableKey,
                     on_raw: Callable[[int], None]) -> None:
        """COPY FREEZE the table's rows into ``target``, which ``conn``'s open transaction
        created, in that transaction (see :func:`create_and_load`)."""
        stmt = postgres.copy_in_statement(*target, entry.columns, freeze=True)
        try:
            with conn.cursor() as cur:
                for obj in entry.stored:
                    with cur.copy(stmt) as copy:
                        for chunk in self._chunks(obj):
                            copy.write(chunk)
                            on_raw(len(chunk))
        except psycopg.Error as exc:
            raise load_failure(entry, exc) from None

    def ensure_roles(self, control: psycopg.Connection[Any], target: ConnInfo, major: int,
                     reporter: Reporter) -> frozenset[str]:
        return roles.ensure_roles(control, target, self.storage, self._manifest, major, self.with_roles, reporter)

    def definitions(self, control: psycopg.Connection[Any], target: ConnInfo, major: int, tmp: Path,
                    create: list[TableEntry], into_schema: str | None) -> tuple[Definitions, tuple[SequenceCopy, ...]]:
        manifest = self._manifest
        assert manifest.schema is not None
        archive_path = tmp / "schema.pgdump"
        archive = b"".join(self._chunks(manifest.schema))
        archive_path.write_bytes(archive)
        if into_schema:
            extracted = extract_definitions(target, major, archive_path, create, into_schema)
            control.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(into_schema)))
            return archive_definitions(tmp / "tables.pgdump", extracted.archive, target, major), extracted.sequences
        return (script_definitions(control, archive, archive_path, create, major, manifest.encoding)
                or archive_definitions(tmp / "tables.pgdump",
                                        extract_definitions(target, major, archive_path, create, None).archive,
                                        target, major)), ()

    def bytes_read(self) -> int:
        return self._read[0]

    def settled(self) -> Manifest:
        return self._manifest


def restore_tables(settings: Settings, target_dsn: str | ConnInfo, tables: list[str],
                   backup_ref: str | None = "latest", into_schema: str | None = None, replace: bool = False,
                   with_roles: bool = False, jobs: int | None = None, run_validation: bool = True,
                   reporter: Reporter | None = None, database: DatabaseHint | None = None,
                   backend: Storage | None = None, session: SessionAhead | None = None) -> TablesRestoreResult:
    """Restore only ``tables`` from a backup into the target database, then validate them.
    ``database``: which database ``latest`` means (see :func:`backup_tool.repository.catalog.choose_latest`);
    ``backend``: the repository's store already opened (reads made ahead:
    :class:`backup_tool.repository.storage.ahead.ReplayBackend`); ``session``: the target
    session already being opened (:func:`open_session_ahead` of ``target_dsn``), else one is
    opened here."""
    started = time.monotonic()
    ahead = session
    try:
        check_request(tables, into_schema, replace)
    except BaseException:
        if ahead is not None:
            ahead.abandon()
        raise
    if ahead is None:
        ahead = open_session_ahead(target_dsn)
    jobs = jobs or settings.policy.backup.jobs
    try:
        storage = open_repository(settings.repo_url, backend=backend)
        manifest = Catalog(storage).resolve_logical(backup_ref, database)
        source = BackupSource(storage, manifest, with_roles)
        source.prefetch(resolve_tables(manifest, tables), jobs)
    except BaseException:
        if ahead is not None:
            ahead.abandon()
        raise
    try:
        return restore_tables_from(source, target_dsn, tables, into_schema, replace, jobs, run_validation, reporter,
                                   started, ahead)
    finally:
        source.close()


def check_request(tables: list[str], into_schema: str | None, replace: bool) -> None:
    """Refuse a request whose options exclude each other or that names no table."""
    if into_schema and replace:
        raise UsageError("--into-schema and --replace exclude each other", "choose one")
    if not tables:
        raise UsageError("no tables given", "pass --tables SCHEMA.TABLE[,...]")


def restore_tables_from(source: TableSource, target_dsn: str | ConnInfo, tables: list[str],
                        into_schema: str | None = None, replace: bool = False, jobs: int = 2,
                        run_validation: bool = True, reporter: Reporter | None = None,
                        started: float | None = None, ahead: SessionAhead | None = None) -> TablesRestoreResult:
    """Restore only ``tables`` from ``source`` into the target database, then validate them
    against what :meth:`TableSource.settled` says the source held (see the module docstring
    for the modes and their refusals). ``ahead``: the target session being opened meanwhile."""
    check_request(tables, into_schema, replace)
    reporter = reporter or NullReporter()
    started = time.monotonic() if started is None else started
    manifest = source.manifest
    try:
        entries = resolve_tables(manifest, tables)
        if into_schema:
            check_into_schema(manifest, entries)
        target = (target_dsn if isinstance(target_dsn, ConnInfo) else ConnInfo(target_dsn)).as_written(
            manifest.options)
    except BaseException:
        if ahead is not None:
            ahead.abandon()
        raise
    mode = "into-schema" if into_schema else "replace" if replace else "restore"

    if ahead is not None and target.unpinned:
        ahead.abandon()
        ahead = None
    opened = ahead.take(manifest.encoding, manifest.options.get("search_path")) if ahead is not None else None
    with opened or target.connect(settings={"client_encoding": manifest.encoding}) as control:
        if not postgres.try_advisory_lock(control, f"backup-tool:restore:{target.redacted()}"):
            raise LockHeldError(f"another restore into {target.redacted()} is running", "wait for it to finish")
        postgres.refuse_unchecked_bytes(control, manifest.encoding, manifest.id, target.redacted())
        major = postgres.tools_major(control, manifest.server_version_num // 10000)
        location = {(t.schema, t.name): (into_schema or t.schema, t.name) for t in entries}
        states = {k: _state(control, *loc) for k, loc in location.items()}
        if into_schema:
            present = [f"{s}.{n}" for (s, n), st in states.items() if st != "absent"]
            if present:
                raise RefusedError(f"schema {into_schema} already has {', '.join(present[:5])}",
                                   "choose a new --into-schema name or drop those tables")
        elif not replace:
            busy = [f"{s}.{n}" for (s, n), st in states.items() if st == "rows"]
            if busy:
                raise RefusedError(f"target tables are not empty: {', '.join(busy[:5])}",
                                   "use --replace to replace their contents, or --into-schema NAME to restore beside them")
        create = [t for t in entries if states[(t.schema, t.name)] == "absent"]
        existing = [t for t in entries if states[(t.schema, t.name)] != "absent"]
        if not into_schema:
            missing = missing_schemas(control, {t.schema for t in create})
            if missing:
                raise RefusedError(f"schema {', '.join(missing)} does not exist in the target database "
                                   f"{target.redacted()}",
                                   "create it first, restore beside with --into-schema NAME, or restore the "
                                   "whole backup with 'restore full'")
            refuse_orphan_partitions(control, manifest, create)
        reporter.event("restore tables started", id=manifest.id, mode=mode, target=target.redacted(),
                       create=len(create), existing=len(existing))

        undo = Undo(schema=into_schema if into_schema and missing_schemas(control, {into_schema}) else None)
        with tempfile.TemporaryDirectory(prefix="backup-tool-") as tmp:
            try:
                copies, checksums, settled = _restore_into(
                    source, control, target, major, Path(tmp), create, existing, location, into_schema,
                    replace, jobs, run_validation, reporter, undo)
            except BaseException as exc:
                take_back(control, target, manifest.encoding, undo, reporter)
                if schema.lock_table_exhausted(exc):
                    raise schema.lock_table_refusal(
                        control, list(location.values()),
                        "name fewer tables (a partition can be restored alone)" if into_schema else
                        "restore them beside the live tables with --into-schema NAME, or name fewer tables "
                        "(a partition can be restored alone)") from exc
                raise
        reporter.event("tables restored", tables=len(entries), bytes=source.bytes_read())
        if not into_schema:
            referrers = cascade_referrers(control, set(location.values()))
            if referrers:
                names = ", ".join(as_typed(*k) for k in referrers)
                reporter.warning(
                    f"{names} reference the restored tables ON DELETE CASCADE, SET NULL or SET DEFAULT"
                    " (directly or through tables that cascade) and were not restored: a DELETE on the restored"
                    " tables took their referencing rows there along or reset their references, which a table"
                    " restore does not bring back; if rows were deleted, add these tables to --tables")

        report = None
        settled_entries = [settled.table(t.schema, t.name) or t for t in entries]
        if run_validation:
            report = validate_tables(target, settled, settled_entries, location, jobs, reporter,
                                     copies if into_schema else None, conn=control, checksums=checksums)
    result = TablesRestoreResult(manifest.id, target.redacted(), tuple(t.full_name for t in entries), mode,
                                 into_schema, sum(t.rows for t in settled_entries), source.bytes_read(),
                                 time.monotonic() - started, report, copies, BackupOrigin.of(manifest))
    if report is not None and not report.ok:
        raise ValidationFailed(f"tables restored from {manifest.id} but validation failed: "
                               + "; ".join(f"{c.name}: {c.detail}" for c in report.failed)[:400], report=result)
    return result


TAKE_BACK_LOCK_WAIT = 30
"""Seconds :func:`take_back` waits for a lock on what it drops (a session still holding one,
e.g. the control session's own transaction when it could not be used) before giving up and
naming what is left."""


@dataclass
class Undo:
    """What a restore has done so far that it must take back if it fails before it is
    complete (see :func:`take_back`): the tables it created (their sequences, indexes,
    constraints, triggers, policies and partitions go with them), the ``--into-schema``
    schema when it created it, the existing tables that were empty and that it filled, and
    the roles ``--with-roles`` created. Nothing that existed before the run is ever listed."""

    schema: str | None = None
    created: tuple[TableKey, ...] = ()
    filled: tuple[TableKey, ...] = ()
    roles: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.schema or self.created or self.filled or self.roles)

    def describe(self) -> str:
        parts = [".".join(k) for k in self.created] + [f"rows of {'.'.join(k)}" for k in self.filled]
        return ", ".join(parts + ([f"schema {self.schema}"] if self.schema else [])
                         + [f"role {r}" for r in sorted(self.roles)])


def take_back(control: psycopg.Connection[Any], target: ConnInfo, encoding: str, undo: Undo,
              reporter: Reporter) -> None:
    """Leave the target as the restore found it, in one transaction: drop the tables the run
    created (never CASCADE: anything else depending on them was not the run's and makes the
    drop fail rather than go), empty again the tables it filled, drop the schema it created
    (if it is empty again) and the roles it created (once nothing depends on them: the
    tables they owned are gone by then). Runs in ``control`` when that session is idle, else
    in a new one (the control session was lost or interrupted mid-statement). If this fails
    too, the reporter is told what is left behind and the restore's own error stands."""
    if not undo:
        return
    idle = not control.closed and not control.broken and \
        control.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        with nullcontext(control) if idle else target.connect(settings={"client_encoding": encoding}) as conn:
            superuser = _is_superuser(conn)
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{TAKE_BACK_LOCK_WAIT}s")))
                if superuser:
                    conn.execute("SET LOCAL session_replication_role = replica")
                if undo.created:
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                        sql.SQL(", ").join(qualified(*k) for k in undo.created)))
                quieted = {key: quiet_triggers(conn, *key) for key in undo.filled}
                for key in undo.filled:
                    empty = "DELETE FROM ONLY {}" if _referenced(conn, *key) else "TRUNCATE ONLY {}"
                    conn.execute(sql.SQL(empty).format(qualified(*key)))
                wake_triggers(conn, quieted)
                if undo.schema:
                    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(undo.schema)))
                if undo.roles:
                    _drop_roles(conn, undo.roles, reporter)
    except (psycopg.Error, DatabaseError) as exc:
        reporter.warning(f"the failed restore could not take back what it did: {str(exc).splitlines()[0]}",
                         left=undo.describe())


def _drop_roles(conn: psycopg.Connection[Any], names: frozenset[str], reporter: Reporter) -> None:
    """Drop the roles a failed run created, in a savepoint: a role something else came to
    depend on meanwhile stays (named), and the rest of the take-back still commits."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(
                sql.SQL(", ").join(sql.Identifier(r) for r in sorted(names))))
    except psycopg.Error as exc:
        reporter.warning(f"roles created by the failed restore were left: {str(exc).splitlines()[0]}",
                         left=sorted(names))


def _restore_into(source: TableSource, control: psycopg.Connection[Any], target: ConnInfo, major: int,
                  tmp: Path, create: list[TableEntry], existing: list[TableEntry],
                  location: dict[TableKey, TableKey], into_schema: str | None, replace: bool, jobs: int,
                  run_validation: bool, reporter: Reporter,
                  undo: Undo) -> tuple[tuple[SequenceCopy, ...], dict[TableKey, tuple[int, str]], Manifest]:
    """Create the absent tables, load every table, set the sequences, build the created
    tables' indexes and constraints; ``undo`` records, as it goes, what a failure must take
    back. Returns the sequence copies, the checksums read after the loads, and the manifest
    the restored tables must match.

    Existing tables are loaded (or replaced) after the created ones, in their one
    transaction: a created table's load that fails leaves them untouched. Their rows are in
    place before the created tables' foreign keys are added; when those come as SQL run in
    ``control`` (:attr:`Definitions.in_session`) they are added in that same transaction,
    so a key that cannot be built rolls the existing tables back too (else the tables that
    were empty are emptied again by :func:`take_back`; replaced contents stay replaced)."""
    manifest = source.manifest
    definitions: Definitions | None = None
    copies: tuple[SequenceCopy, ...] = ()
    loads = [t for t in create if source.has_rows(t)]
    serial = jobs == 1 or len(loads) <= 1
    together: bytes | None = None
    created = tuple(location[(t.schema, t.name)] for t in create)
    if create:
        undo.roles = source.ensure_roles(control, target, major, reporter)
        definitions, copies = source.definitions(control, target, major, tmp, create, into_schema)
        if serial and not existing and isinstance(source, BackupSource):
            together = definitions.before_sql
        if together is None:
            definitions.before_data()
            undo.created = created

    progress = reporter.task("data", total=sum(source.size(t) for t in [*create, *existing]))
    checksums: dict[TableKey, tuple[int, str]] = {}

    def load(t: TableEntry, conn: psycopg.Connection[Any]) -> None:
        source.load(t, conn, location[(t.schema, t.name)], True, progress.advance)
        checksum(t, conn)

    def checksum(t: TableEntry, conn: psycopg.Connection[Any]) -> None:
        where = location[(t.schema, t.name)]
        if not run_validation or t.relkind != "r":
            return
        if len(loads) == 1 and jobs > 1 and source.size(t) >= RANGED_CHECKSUM_BYTES:
            checksums[(t.schema, t.name)] = checksums_by_ranges(target, {where: t.columns}, jobs,
                                                                manifest.checksum_method)[where]
        else:
            checksums[(t.schema, t.name)] = postgres.table_checksum(conn, *where, t.columns,
                                                                    manifest.checksum_method)

    sessions = postgres.SessionPool(target, {"client_encoding": manifest.encoding})

    def load_alone(t: TableEntry) -> None:
        with sessions.session() as conn:
            load(t, conn)
        testhooks.pause_point("tables:loaded")

    if together is not None:
        assert isinstance(source, BackupSource)
        create_and_load(control, together, source, [(t, location[(t.schema, t.name)]) for t in loads],
                        progress.advance)
        undo.created = created
        for t in loads:
            checksum(t, control)
    elif serial:
        for t in loads:
            load(t, control)
    else:
        try:
            pipeline.run_parallel(jobs, [(load_alone, t) for t in loads])
        finally:
            sessions.close()
    in_session = definitions is not None and definitions.in_session
    with control.transaction() if existing and in_session else nullcontext():
        if existing:
            replace_in_place(control, source, existing, replace, progress.advance,
                             lambda holders: reporter.warning(f"waiting for a lock: {holders}"),
                             frozenset(created))
            if not replace and not in_session:
                undo.filled = tuple((t.schema, t.name) for t in existing if source.has_rows(t))
        progress.finish()
        settled = source.settled()
        recorded = {(seq["schema"], seq["name"]): seq for seq in manifest.sequences}
        if into_schema:
            values = [(c.copy, recorded[c.source]) for c in copies if c.source in recorded]
        else:
            values = [((seq["schema"], seq["name"]), seq)
                      for seq in _owned_sequences(manifest, {(t.schema, t.name) for t in create})]
        with control.transaction() if values else nullcontext():
            for (seq_schema, seq_name), seq in values:
                control.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)",
                                (postgres.quoted_table(seq_schema, seq_name), seq["last_value"], seq["is_called"]))
        if definitions is not None:
            try:
                definitions.after_data()
            except DatabaseError as exc:
                raise DatabaseError(f"building the restored tables' indexes/constraints failed, nothing was kept: "
                                    f"{exc.message}", post_data_hint(exc.message)) from None
    return copies, checksums, settled


def post_data_hint(message: str) -> str:
    """What to do when the restored tables' indexes, keys, triggers or policies could not be
    built (``message``: PostgreSQL's, through pg_restore). A foreign key that fails names rows
    missing live (SQLSTATE 23503); anything else is in the way or missing in the target (an
    index or constraint name already taken in the schema, a function a trigger calls), as the
    message names it. Pure."""
    if "SQLSTATE 23503" in message or "violates foreign key constraint" in message:
        return "a foreign key points at rows missing live: restore those tables too, or use --into-schema NAME to inspect"
    return ("the target is in the way of what the message names (an index or constraint name is taken in its "
            "schema, or something the definitions use is missing): remove the cause, or restore beside with "
            "--into-schema NAME")


def check_table_sequences(conn: psycopg.Connection[Any], manifest: Manifest, entries: list[TableEntry],
                          location: dict[TableKey, TableKey], copies: tuple[SequenceCopy, ...] | None) -> Check:
    """The restored tables' sequences hold the backup's values.

    For an ``--into-schema`` copy (``copies`` not None) each column that used a sequence must
    use its own copy, in the copy's schema, owned by a copied column and set to the backup's
    value: a copy whose inserts would advance a live sequence fails. In place, the sequences
    owned by the restored tables must be neither behind the backup nor behind their column.
    """
    recorded = {(seq["schema"], seq["name"]): seq for seq in manifest.sequences}
    if copies is None:
        keys = {(t.schema, t.name) for t in entries}
        mine = [s for s in postgres.sequences(conn, owned_by=sorted(keys))
                if s["owned_by"] and (s["owned_by"]["schema"], s["owned_by"]["table"]) in keys]
        check = check_sequences(conn, mine, list(_owned_sequences(manifest, keys)))
        return Check("table_sequences", check.ok, check.detail)
    copied = set(location.values())
    present = {(s["schema"], s["name"]): s
               for s in postgres.sequences(conn, owned_by=sorted(copied), named=sorted({c.copy for c in copies}))}
    bad: list[str] = []
    for c in copies:
        uses = {col: (sch, name) for col, sch, name, _ in column_sequences(conn, *c.table)}
        if uses.get(c.column) != c.copy:
            used = ".".join(uses[c.column]) if c.column in uses else "no sequence"
            bad.append(f"{c.table[0]}.{c.table[1]}.{c.column} uses {used}, not its copy {c.copy[0]}.{c.copy[1]}")
            continue
        now = present[c.copy]
        by = now["owned_by"]
        if not by or (by["schema"], by["table"]) not in copied:
            bad.append(f"{c.copy[0]}.{c.copy[1]} is not owned by the copy")
        seq = recorded.get(c.source)
        if seq and (now["last_value"], now["is_called"]) != (seq["last_value"], seq["is_called"]):
            bad.append(f"{c.copy[0]}.{c.copy[1]} at {now['last_value']}, backup had {seq['last_value']}")
    if bad:
        return Check("table_sequences", False, "; ".join(bad))
    return Check("table_sequences", True,
                 f"{len({c.copy for c in copies})} sequences of the copy, its own, at the backup's values")


_FK_FIELDS = ("schema", "table", "name", "definition")


def check_backed_up_keys(conn: psycopg.Connection[Any], manifest: Manifest, restored: set[TableKey]) -> Check:
    """The backup's foreign keys from or to tables restored in place, between tables the target
    has, are there as backed up (``foreign_keys_match``, scoped to those tables).

    A table dropped with ``DROP TABLE ... CASCADE`` takes the keys of the tables referencing
    it along; restored, it comes back with its own definition only, since a table restore
    writes no other table. Without this check the restore's verdict called such a database
    complete while those keys were missing. A missing key is named with the statement that
    adds it back as the backup defines it. Keys to or from a table the target lacks are not
    expected (a table restored into another database). The keys are read under the settings
    the backup read its inventory under, as ``validate`` reads them, so that their
    definitions name objects alike.
    """
    with postgres.settings_within(conn, manifest.options.get("inventory_read_with")):
        live = _fks_touching(conn, restored)
    backed = [fk for fk in manifest.inventory.get("foreign_keys", [])
              if all(f in fk for f in (*_FK_FIELDS, "ref_schema", "ref_table"))
              and ((fk["schema"], fk["table"]) in restored or (fk["ref_schema"], fk["ref_table"]) in restored)]
    ends = sorted({(fk["schema"], fk["table"]) for fk in backed}
                  | {(fk["ref_schema"], fk["ref_table"]) for fk in backed})
    present = {(r[0], r[1]) for r in conn.execute(
        "SELECT s, n FROM unnest(%s::text[], %s::text[]) u(s, n)"
        " WHERE to_regclass(format('%%I.%%I', s, n)) IS NOT NULL",
        ([e[0] for e in ends], [e[1] for e in ends])).fetchall()} if ends else set()
    expected = [fk for fk in backed
                if (fk["schema"], fk["table"]) in present and (fk["ref_schema"], fk["ref_table"]) in present]
    names = {(fk["schema"], fk["table"], fk["name"]) for fk in expected}
    actual = [{f: fk[f] for f in _FK_FIELDS} for fk in live if (fk["schema"], fk["table"], fk["name"]) in names]
    check = compare_sets("foreign_keys_match", "foreign keys of the backup touching the restored tables",
                         [{f: fk[f] for f in _FK_FIELDS} for fk in expected], actual,
                         lambda fk: f"{fk['schema']}.{fk['table']}.{fk['name']}")
    have = {(fk["schema"], fk["table"], fk["name"]) for fk in actual}
    gone = [fk for fk in expected if (fk["schema"], fk["table"], fk["name"]) not in have]
    if check.ok or not gone:
        return check
    statements = [r[0] for r in conn.execute(
        "SELECT format('ALTER TABLE %%I.%%I ADD CONSTRAINT %%I ', s, t, n) || d"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) WITH ORDINALITY u(s, t, n, d, i) ORDER BY i",
        ([fk["schema"] for fk in gone], [fk["table"] for fk in gone], [fk["name"] for fk in gone],
         [fk["definition"] for fk in gone])).fetchall()]
    return Check(check.name, False, f"{check.detail} (a table restore writes no other table: add a missing"
                 f" key back with {'; '.join(statements)})")


def validate_tables(target: ConnInfo, manifest: Manifest, entries: list[TableEntry],
                    location: dict[TableKey, TableKey], jobs: int, reporter: Reporter,
                    copies: tuple[SequenceCopy, ...] | None = None, conn: psycopg.Connection[Any] | None = None,
                    checksums: dict[TableKey, tuple[int, str]] | None = None) -> ValidationReport:
    """Row counts and content checksums of the restored tables, their sequences, and the
    foreign keys and indexes touching them.

    ``conn``: a session on the target to run the checks in (else one is opened);
    ``checksums``: row counts and checksums already read from the target after the loads
    committed, by table key; only the other tables are scanned (in ``conn`` when one remains).
    """
    data = [t for t in entries if t.relkind == "r"]
    known = {k: v for k, v in (checksums or {}).items()}
    wanted = {(t.schema, t.name): (*location[(t.schema, t.name)], t.columns) for t in data
              if (t.schema, t.name) not in known}
    with (nullcontext(conn) if conn is not None else target.connect()) as session:
        if len(wanted) == 1:
            key, (schema_name, name, columns) = next(iter(wanted.items()))
            try:
                live: dict[TableKey, tuple[int, str] | None] = {
                    key: postgres.table_checksum(session, schema_name, name, columns, manifest.checksum_method)}
            except psycopg.errors.UndefinedTable:
                live = {key: None}
            except psycopg.errors.UndefinedColumn:
                live = {key: (-1, "")}
        else:
            live = dict(table_checksums(target, wanted, jobs, reporter, manifest.checksum_method))
        live.update(known)
        checks = check_tables(manifest, live)
        places = set(location.values())
        checks.append(check_table_sequences(session, manifest, entries, location, copies))
        checks.append(check_foreign_keys(session, _fks_touching(session, places)))
        in_place = {key for key, place in location.items() if key == place}
        if in_place:
            checks.append(check_backed_up_keys(session, manifest, in_place))
        bad = [f"{i['schema']}.{i['name']}" for i in postgres.indexes(session, of=sorted(places))
               if (i["schema"], i["table"]) in places and not (i["valid"] and i["ready"])]
        checks.append(Check("indexes_valid", not bad, f"invalid: {', '.join(bad)}" if bad
                            else "indexes of the restored tables valid"))
    return ValidationReport(target.redacted(), manifest.id, tuple(checks))
