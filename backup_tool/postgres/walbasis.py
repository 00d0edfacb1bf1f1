"""What a backup records about its snapshot's place in the WAL (manifest ``wal_basis``).

The capture is split around the snapshot. :func:`before_snapshot` runs on an autocommit
connection just before the snapshot is taken: it reads the WAL insert position, then
commits a transaction that takes an xid (``pg_current_xact_id()``), so every xid assigned
before that position was read is below ``next_xid`` and, as that transaction has ended,
below the snapshot's xmax. :func:`after_snapshot` runs inside the snapshot's transaction
once its tables are locked: the snapshot's in-progress xids, the insert position now (every
record of every transaction the snapshot sees lies before it), and each table's relation
files both as the snapshot sees the catalog and as the locked table is read (TRUNCATE is
not MVCC-safe: the two differ after a TRUNCATE committed since the snapshot).

An incremental that may read the server's own ``pg_wal`` files (:func:`can_read_wal_files`)
reads its segments there (:class:`ServerWal`) once the server has flushed its WAL through
the snapshot's position: those not archived yet, instead of waiting for the archiver, and
those archived but not yet recycled, instead of downloading them. Flushed at
once where the role may (:func:`force_wal_flush`), else within ``wal_writer_delay``
(:func:`request_wal_flush`).

Every capture step may fail (a standby, a role that may not call the functions, a server
without them); the result is then None and the backup records no basis: the next
incremental compares checksums. Nothing here changes data (:func:`force_wal_flush` writes
one empty logical decoding message, and only when no logical slot would read it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import psycopg
from psycopg.conninfo import make_conninfo

from backup_tool.core import walnames
from backup_tool.errors import BackupToolError
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.manifest import RelationFile, WalBasis


@dataclass(frozen=True)
class BeforeSnapshot:
    start_lsn: str
    next_xid: int


def before_snapshot(conn: psycopg.Connection[Any]) -> BeforeSnapshot | None:
    """The WAL position and next xid, read in that order on an autocommit connection."""
    try:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
    except psycopg.Error:
        return None
    if row is None or xid is None:
        return None
    return BeforeSnapshot(str(row[0]), int(xid[0]))


TYPES_DIGEST_SQL = """
WITH RECURSIVE used(t) AS (
  SELECT a.atttypid FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
   WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'm', 'f')
  UNION
  SELECT n.t FROM used u CROSS JOIN LATERAL (
    SELECT typelem FROM pg_type WHERE oid = u.t AND typelem <> 0
    UNION ALL SELECT typbasetype FROM pg_type WHERE oid = u.t AND typbasetype <> 0
    UNION ALL SELECT rngsubtype FROM pg_range WHERE rngtypid = u.t
    UNION ALL SELECT rngtypid FROM pg_range WHERE rngmultitypid = u.t
    UNION ALL SELECT a.atttypid FROM pg_type ty JOIN pg_attribute a ON a.attrelid = ty.typrelid
               WHERE ty.oid = u.t AND ty.typrelid <> 0 AND a.attnum > 0 AND NOT a.attisdropped
  ) AS n(t)
)
SELECT md5(coalesce(string_agg(x, E'\\n' ORDER BY x), '')) FROM (
  SELECT format('enum %s %s %s', enumtypid, enumsortorder, enumlabel) FROM pg_enum
   WHERE enumtypid IN (SELECT t FROM used)
  UNION ALL
  SELECT format('type %s %s %s %s %s %s %s %s', t.oid, t.typtype, t.typbasetype, t.typtypmod, t.typelem,
                t.typoutput::oid, md5(coalesce(p.prosrc, '')), coalesce(p.probin, ''))
    FROM pg_type t JOIN pg_proc p ON p.oid = t.typoutput WHERE t.oid >= 16384 AND t.oid IN (SELECT t FROM used)
  UNION ALL
  SELECT format('range %s %s', rngtypid, rngsubtype) FROM pg_range WHERE rngtypid IN (SELECT t FROM used)
  UNION ALL
  SELECT format('attr %s %s %s %s %s %s', a.attrelid, a.attnum, a.attname, a.atttypid, a.atttypmod, a.attisdropped)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
   WHERE a.attnum > 0 AND c.reltype IN (SELECT t FROM used)
) AS s(x)
"""

NAMES_SHAPED_TYPES = ("regclass", "regtype", "regproc", "regprocedure", "regoper", "regoperator", "regconfig",
                      "regdictionary", "regnamespace", "regrole", "regcollation")
"""Types stored as an OID and printed as the name of what it identifies: renaming that object
changes a row's text without writing the row."""

RELATIONS_SQL = """
WITH RECURSIVE contains(outer_type, inner_type) AS MATERIALIZED (
  SELECT oid, typelem FROM pg_type WHERE typelem <> 0
  UNION ALL SELECT oid, typbasetype FROM pg_type WHERE typbasetype <> 0
  UNION ALL SELECT t.oid, a.atttypid FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
   WHERE t.typtype = 'c' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL SELECT rngtypid, rngsubtype FROM pg_range
  UNION ALL SELECT rngmultitypid, rngsubtype FROM pg_range
), names_shaped(oid) AS (
  SELECT t.oid FROM pg_type t
   WHERE t.typnamespace = 'pg_catalog'::regnamespace AND t.typname = ANY(%s)
  UNION
  SELECT c.outer_type FROM contains c JOIN names_shaped s ON c.inner_type = s.oid
)
SELECT c.oid, format('%%I.%%I', n.nspname, c.relname),
       CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END::bigint,
       c.relfilenode::bigint, coalesce(t.relfilenode, 0)::bigint,
       coalesce(pg_relation_filenode(c.oid), 0)::bigint,
       coalesce(pg_relation_filenode(NULLIF(c.reltoastrelid, 0)), 0)::bigint,
       c.relpersistence = 'p' AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'heap')
         AND (t.oid IS NULL OR t.relpersistence = 'p')
         AND NOT EXISTS (SELECT FROM pg_attribute a JOIN names_shaped s ON s.oid = a.atttypid
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       md5(coalesce((SELECT string_agg(format('%%s %%s', a.atttypid, a.atttypmod), ',' ORDER BY a.attnum)
                       FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attgenerated = ''), ''))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_database d ON d.datname = current_database()
  LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
 WHERE c.oid = ANY(%s)
"""


def after_snapshot(conn: psycopg.Connection[Any], before: BeforeSnapshot | None, system_identifier: str,
                   table_oids: Sequence[int]) -> WalBasis | None:
    """The basis of the snapshot ``conn``'s transaction holds (its tables locked), or None."""
    if before is None:
        return None
    try:
        with conn.transaction():
            row, digest, rels = _read_basis(conn, table_oids)
    except psycopg.Error:
        return None
    if row is None or digest is None:
        return None
    return _basis(row, digest, rels, before, system_identifier)


def _read_basis(conn: psycopg.Connection[Any], table_oids: Sequence[int]) -> tuple[Any, Any, list[Any]]:
    row = conn.execute(
            "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text,"
            " ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::bigint,"
            " (SELECT oid FROM pg_database WHERE datname = current_database())::bigint,"
            " (SELECT bytes_per_wal_segment FROM pg_control_init())::bigint").fetchone()
    digest = conn.execute(TYPES_DIGEST_SQL).fetchone()
    rels = conn.execute(RELATIONS_SQL, (list(NAMES_SHAPED_TYPES), list(table_oids))).fetchall()
    return row, digest, rels


def _basis(row: Any, digest: Any, rels: list[Any], before: BeforeSnapshot, system_identifier: str) -> WalBasis:
    snapshot, end_lsn, timeline, db_oid, seg_size = row
    xip = (snapshot.split(":") + [""])[2]
    running = tuple(sorted(int(x) for x in xip.split(",") if x and int(x) < before.next_xid))
    relations = []
    for oid, name, spc, rfn, toast, rfn_now, toast_now, logged_heap, column_types in rels:
        same_file = (rfn, toast) == (rfn_now, toast_now)
        relations.append(RelationFile(name, int(oid), int(spc), int(rfn) if same_file else 0,
                                      int(toast), bool(logged_heap) and same_file and rfn != 0, column_types))
    walnames.parse_lsn(end_lsn)
    return WalBasis(int(timeline), before.start_lsn, end_lsn, before.next_xid, running, int(db_oid),
                    int(seg_size), system_identifier, str(digest[0]), tuple(sorted(relations, key=lambda r: r.table)))


def switch_wal(conn: psycopg.Connection[Any]) -> bool:
    """Ask the server to finish the current WAL segment so it gets archived now (as
    pg_basebackup does); False when this role may not or archiving is off."""
    try:
        row = conn.execute("SELECT current_setting('archive_mode')").fetchone()
        if row is None or row[0] == "off":
            return False
        conn.execute("SELECT pg_switch_wal()")
        return True
    except psycopg.Error:
        return False


def can_read_wal_files(conn: psycopg.Connection[Any]) -> bool:
    """Whether this role may read the server's own ``pg_wal`` files with
    ``pg_read_binary_file`` (superuser, ``pg_read_server_files``, or EXECUTE granted)."""
    try:
        row = conn.execute("SELECT has_function_privilege("
                           "'pg_read_binary_file(text, bigint, bigint, boolean)', 'EXECUTE')").fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def request_wal_flush(conn: psycopg.Connection[Any]) -> bool:
    """Commit a transaction that takes an xid, so a commit record follows every record
    inserted so far. It is an asynchronous commit (the transaction wrote nothing else), which
    the WAL writer flushes within ``wal_writer_delay``: :func:`wal_flushed_through` then
    turns true for any position read before this call. False when the server refuses."""
    try:
        conn.execute("SELECT pg_current_xact_id()")
    except psycopg.Error:
        return False
    return True


FLUSH_MESSAGE_PREFIX = "backup-tool"


def force_wal_flush(conn: psycopg.Connection[Any]) -> bool:
    """Have the server flush its WAL through every record inserted so far, now, instead of
    within ``wal_writer_delay`` (:func:`request_wal_flush`): a transaction that takes an xid
    and writes one empty, non-transactional logical decoding message (prefix ``backup-tool``)
    commits with ``synchronous_commit = local``, which flushes before it returns. True once
    that commit has returned. False, with nothing written, when the role may not emit
    messages (every role may unless EXECUTE was revoked), when a logical replication slot
    exists (its consumers would receive the message), or when the server refuses (a
    standby). The message changes no data and lies after the span the backup reads."""
    try:
        row = conn.execute("SELECT has_function_privilege('pg_logical_emit_message(boolean, text, text)', 'EXECUTE')"
                           " AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_type = 'logical')"
                           ).fetchone()
        if not row or not row[0]:
            return False
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = local")
            conn.execute("SELECT pg_current_xact_id(), pg_logical_emit_message(false, %s, '')",
                         (FLUSH_MESSAGE_PREFIX,))
    except psycopg.Error:
        return False
    return True


def wal_flushed_through(conn: psycopg.Connection[Any], lsn: str, timeout: float,
                        clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep) -> bool:
    """Whether the server has flushed its WAL through ``lsn`` within ``timeout`` seconds
    (polled, quickly at first), so a reader of the ``pg_wal`` files finds every record before
    ``lsn`` there."""
    deadline = clock() + timeout
    pause = 0.002
    while True:
        try:
            row = conn.execute("SELECT pg_current_wal_flush_lsn() >= %s::text::pg_lsn", (lsn,)).fetchone()
        except psycopg.Error:
            return False
        if row and row[0]:
            return True
        if clock() >= deadline:
            return False
        sleep(pause)
        pause = min(pause * 2, 0.05)


class WalNotFlushed(BackupToolError):
    """The server did not flush its WAL through the span's end in time."""


class ServerWal:
    """WAL segment files read from the server's own ``pg_wal`` through ``conn``
    (``pg_read_binary_file``): the segments the archive does not hold yet, and those it holds
    that are still there (a local read, instead of a download and its decompression).

    Guaranteed: bytes are returned only when they are what the server wrote. The first read
    waits until the server has flushed its WAL through ``end_lsn`` (:func:`wal_flushed_through`;
    :class:`WalNotFlushed` after ``flush_timeout`` seconds), so every record before it is in
    the files. A file read is returned only if, once read, the server could not have
    recycled it while it was read: it is the segment being written or a later one, or it is
    still there under its name. The server recycles a segment by renaming it to a future
    segment's name and never gives a file a past segment's name, so a past segment's name
    still there after the read is the file that was read, unchanged (the server writes no
    finished segment). Otherwise, or when the file is not there, the answer is None (the
    archive has it now, or nobody does). Safe to call from several threads (calls take turns
    on the connection)."""

    def __init__(self, conn: psycopg.Connection[Any], end_lsn: str, segment_size: int,
                 flush_timeout: float) -> None:
        self.conn = conn
        self.end_lsn = end_lsn
        self.segment_size = segment_size
        self.flush_timeout = flush_timeout
        self._flushed = False
        self._turn = threading.Condition()
        self._busy = False
        self._waiting: list[str] = []

    def __call__(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """The bytes of segment ``name`` in each ``[start, stop)`` of ``ranges``, read at once,
        or None (see the class). Calls waiting for the connection take it earliest segment
        first: a reader walks the WAL forwards."""
        with self._turn:
            self._waiting.append(name)
            self._turn.wait_for(lambda: not self._busy and min(self._waiting) == name)
            self._waiting.remove(name)
            self._busy = True
        try:
            read = self._read(name, ranges)
        finally:
            with self._turn:
                self._busy = False
                self._turn.notify_all()
        if read is None:
            return None
        pieces, now, still_there = read
        writing = walnames.parse_lsn(now) // self.segment_size
        segno = walnames.segment_number(name, self.segment_size)
        return pieces if segno >= writing or still_there else None

    def _read(self, name: str, ranges: Sequence[tuple[int, int]]) -> tuple[list[bytes], str, bool] | None:
        """The pieces, then the insert position and whether the file is still there."""
        if not self._flushed:
            if not wal_flushed_through(self.conn, self.end_lsn, self.flush_timeout):
                raise WalNotFlushed(f"the server did not flush its WAL through {self.end_lsn} "
                                    f"within {self.flush_timeout:g} s", "check the server's WAL writer")
            self._flushed = True
        pieces = read_wal_ranges(self.conn, name, ranges)
        if pieces is None:
            return None
        row = self.conn.execute("SELECT pg_current_wal_insert_lsn()::text,"
                                " pg_read_binary_file(%s, 0, 0, true) IS NOT NULL",
                                (f"pg_wal/{name}",)).fetchone()
        return None if row is None else (pieces, str(row[0]), bool(row[1]))


READ_PIECE = 1 << 20
"""Bytes per row when reading a WAL file: a 16 MiB segment as one value took 70-140 ms to
come through (the server and libpq building and taking one 16 MiB message), as 16 rows of
1 MiB 14-35 ms."""


def read_wal_ranges(conn: psycopg.Connection[Any], name: str,
                    ranges: Sequence[tuple[int, int]]) -> list[bytes] | None:
    """The bytes of ``pg_wal/<name>`` in each ``[start, stop)`` of ``ranges`` as the server has
    them now (fewer at the file's end), in one query, or None when the file is not there.
    Raises psycopg.Error when the role may not read it. Says nothing about whether the file
    was being recycled meanwhile: see :class:`ServerWal`."""
    offsets: list[int] = []
    lengths: list[int] = []
    index: list[int] = []
    for i, (start, stop) in enumerate(ranges):
        for at in range(start, stop, READ_PIECE) if stop > start else [start]:
            offsets.append(at)
            lengths.append(max(0, min(READ_PIECE, stop - at)))
            index.append(i)
    rows = conn.execute("SELECT pg_read_binary_file(%s, p.o, p.l, true)"
                        " FROM unnest(%s::bigint[], %s::bigint[]) WITH ORDINALITY AS p(o, l, n) ORDER BY p.n",
                        (f"pg_wal/{name}", offsets, lengths), binary=True).fetchall()
    if len(rows) != len(offsets) or any(r[0] is None for r in rows):
        return None
    parts: list[list[bytes]] = [[] for _ in ranges]
    for i, row in zip(index, rows, strict=True):
        parts[i].append(row[0])
    return [p[0] if len(p) == 1 else b"".join(p) for p in parts]


def read_wal_file(conn: psycopg.Connection[Any], name: str, length: int, offset: int = 0) -> bytes | None:
    """``length`` bytes from ``offset`` of ``pg_wal/<name>`` (see :func:`read_wal_ranges`)."""
    pieces = read_wal_ranges(conn, name, [(offset, offset + length)])
    return None if pieces is None else pieces[0]


def row_writes(conn: psycopg.Connection[Any], oids: Sequence[int]) -> dict[int, int]:
    """Per table oid, the rows inserted, updated and deleted in it as the server's cumulative
    statistics count them now (``n_tup_ins + n_tup_upd + n_tup_del``, rolled back or not).
    Lossy (a backend reports its counts up to a second or more after its transaction ends)
    and reset by ``pg_stat_reset()`` or a crash: good only to guess what to do first. Empty
    when the server refuses. ``conn``: an autocommit session."""
    if not oids:
        return {}
    try:
        rows = conn.execute("SELECT relid::bigint, n_tup_ins + n_tup_upd + n_tup_del"
                            " FROM pg_catalog.pg_stat_all_tables WHERE relid = ANY(%s::bigint[]::oid[])",
                            (list(oids),)).fetchall()
    except psycopg.Error:
        return {}
    return {int(oid): int(n) for oid, n in rows if n is not None}


def committed_since(conn: psycopg.Connection[Any], xids: Sequence[int]) -> tuple[int, ...] | str:
    """Which of these transactions (open at the parent's snapshot) have committed since: the
    WAL must then be read back to where they began. A status no longer known (or not
    readable) is returned as the reason the WAL cannot be used."""
    committed = []
    for xid in xids:
        try:
            row = conn.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),)).fetchone()
        except psycopg.Error:
            return f"the status of transaction {xid} (open at the parent's snapshot) is unknown"
        status = row[0] if row else None
        if status == "committed":
            committed.append(xid)
        elif status not in ("aborted", "in progress"):
            return f"the status of transaction {xid} (open at the parent's snapshot) is unknown"
    return tuple(committed)


@dataclass(frozen=True)
class SnapshotFiles:
    """Relation files (tablespace, database, relfilenode) of a snapshot's catalog: ``user``
    those of every relation created after initdb (tables, TOAST, indexes, sequences,
    materialized views) but extensions' configuration tables and sequences (and their
    TOAST), whose rows and values ``pg_dump --schema-only`` dumps; ``statistics`` those of
    ``pg_statistic`` and ``pg_statistic_ext_data`` with their TOAST tables and indexes;
    ``inplace`` those of ``pg_class`` and ``pg_database`` (database oid 0: shared)."""

    user: frozenset[tuple[int, int, int]]
    statistics: frozenset[tuple[int, int, int]]
    inplace: frozenset[tuple[int, int, int]]


SNAPSHOT_FILES_SQL = """
WITH stats AS (
  SELECT 'pg_catalog.pg_statistic'::regclass::oid AS oid
  UNION ALL SELECT 'pg_catalog.pg_statistic_ext_data'::regclass::oid
), heaps AS (
  SELECT oid FROM stats
  UNION SELECT c.reltoastrelid FROM pg_class c JOIN stats s ON s.oid = c.oid WHERE c.reltoastrelid <> 0
), statistics AS (
  SELECT oid FROM heaps UNION SELECT i.indexrelid FROM pg_index i JOIN heaps h ON h.oid = i.indrelid
), config AS (
  SELECT unnest(extconfig) AS oid FROM pg_extension WHERE extconfig IS NOT NULL
), dumped AS (
  SELECT oid FROM config
  UNION SELECT c.reltoastrelid FROM pg_class c JOIN config f ON f.oid = c.oid WHERE c.reltoastrelid <> 0
)
SELECT CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END::bigint,
       CASE WHEN c.relisshared THEN 0 ELSE d.oid END::bigint,
       CASE WHEN c.relfilenode <> 0 THEN c.relfilenode ELSE pg_relation_filenode(c.oid) END::bigint,
       CASE WHEN c.oid IN (SELECT oid FROM statistics) THEN 'statistics'
            WHEN c.oid IN ('pg_catalog.pg_class'::regclass, 'pg_catalog.pg_database'::regclass) THEN 'inplace'
            ELSE 'user' END
  FROM pg_class c JOIN pg_database d ON d.datname = current_database()
 WHERE pg_relation_filenode(c.oid) IS NOT NULL
   AND (c.oid >= %s AND c.oid NOT IN (SELECT oid FROM dumped) OR c.oid IN (SELECT oid FROM statistics)
        OR c.oid IN ('pg_catalog.pg_class'::regclass, 'pg_catalog.pg_database'::regclass))
"""


def snapshot_files(conn: psycopg.Connection[Any], first_normal_oid: int) -> SnapshotFiles:
    """:class:`SnapshotFiles` as ``conn``'s snapshot sees the catalog."""
    found: dict[str, set[tuple[int, int, int]]] = {"user": set(), "statistics": set(), "inplace": set()}
    for spc, db, node, kind in conn.execute(SNAPSHOT_FILES_SQL, (first_normal_oid,)):
        found[kind].add((int(spc), int(db), int(node)))
    return SnapshotFiles(frozenset(found["user"]), frozenset(found["statistics"]), frozenset(found["inplace"]))


DUMP_SETTINGS = ("TimeZone", "bytea_output", "client_encoding", "DateStyle", "IntervalStyle", "extra_float_digits",
                 "lc_monetary", "lc_numeric", "lc_time", "xmloption")
"""Settings that shape how a dump run as this session prints values (a default's timestamptz
constant, a role's VALID UNTIL, a bytea constant...): the server's own defaults can change
with a reload, which writes no WAL."""


def dump_session(conninfo: ConnInfo) -> dict[str, str]:
    """The role a client program run as ``conninfo`` (:meth:`ConnInfo.tool_env`, as the schema
    and roles dumps are) connects as, and its :data:`DUMP_SETTINGS`: the server's defaults,
    the database's and the role's settings and the tool's options, as a session of its own
    reads them (the backup's sessions pin some of them: a dump's do not). Empty when the
    session cannot be opened."""
    params = {k: v for k, v in conninfo.params.items() if k != "options"}
    params["options"] = conninfo.tool_env().get("PGOPTIONS", "")
    params.setdefault("application_name", "backup-tool")
    params.setdefault("connect_timeout", "15")
    names = ", ".join(f"current_setting('{name}')" for name in DUMP_SETTINGS)
    try:
        with psycopg.connect(make_conninfo(**params), autocommit=True) as conn:
            row = conn.execute(f"SELECT current_user::text, {names}").fetchone()
    except psycopg.Error:
        return {}
    if row is None:
        return {}
    return {"role": str(row[0]), **{name: str(value) for name, value in zip(DUMP_SETTINGS, row[1:], strict=True)}}
