"""Logical backups: full and incremental, consistent, streamed, one object per table.

A full backup exports one snapshot and lets every worker import it, so the schema archive
(pg_dump --snapshot), every table's COPY stream and every checksum describe the same
instant. Each ordinary table (and each leaf partition) becomes one zstd object streamed
from ``psql``'s COPY output straight into the repository: no local copy of the data is
made, and a table can later be restored alone. A table of at least ``backup.split_table_mb``
is stored as several objects instead, one per range of its heap blocks, dumped and
checksummed by parallel sessions (see :mod:`backup_tool.logical.parts`; a full backup splits
only a table too big for the sessions to share the work otherwise). Content
checksums are computed in the same snapshot by parallel sessions. Objects go under
``backups/<id>/``; the manifest is written last, after every object is durable, so an
interrupted backup is never listed.

Incremental backups store only the tables whose content changed since the parent backup
(the newest complete backup of the same database) and reference the parent's objects for
the rest. Change detection compares, per table, the content checksum computed in the new
snapshot with the parent's: row count plus the sum of 64-bit hashes of every row's text
form over the dumped column list, by the parent's checksum method (a chain keeps the method
of its full backup; a full backup takes the cheapest the server has). Any INSERT, UPDATE,
DELETE, TRUNCATE or COPY changes the multiset of rows and so the checksum (a collision needs two different row multisets with
equal 64-bit hash sums); ALTER TABLE that adds, drops, renames or reorders columns changes
the column list; partitions attached or detached change the table's parent; new tables
have no parent entry. The checksum is taken in the backup's own snapshot, so a change
committed just before it is seen. Unchanged tables yield the same rows from the parent's
object, so the incremental restores to exactly its own snapshot. Sequence values are
always stored fresh; so are the schema and roles, unless the WAL method shows that no
catalog they are read from changed (:mod:`backup_tool.logical.schema_reuse`): then the
parent's objects are reused. Table statistics (pg_stat) are deliberately not
trusted: they are lossy and reset on crash.

When the repository's WAL archive covers the span from the parent's snapshot to this one,
and reading the WAL written since is cheaper than checksumming the tables (policy
``backup.change_detection``: ``auto`` estimates both, ``wal`` always prefers the WAL,
``checksum`` never reads it),
the changed tables are learnt from the WAL instead, without reading every table (method
``wal``, recorded in the manifest's ``changed_tables_method``): a table is unchanged when
its relation files (heap and TOAST) are the same at both snapshots, no row-changing record
in the span touched them, and its column types are the same; every table that is not a
WAL-logged heap (unlogged tables), or that has a column printing catalog names (regclass,
regrole... directly or through an array, domain, composite or range: a rename elsewhere
changes its text), is still compared by checksum. The span runs from a WAL
position read before the parent's snapshot to one read after this one; a transaction that
was open at the parent's snapshot and has committed since is followed back to where it
began (its earlier records precede the span); and no definition that shapes rows' text
(enum labels, composite types) may have changed; see :mod:`backup_tool.postgres.walbasis`. Anything uncertain (no archive,
a segment missing, a timeline change, a record the reader does not know) means today's
checksum comparison (method ``checksum``), with the reason in the output. A table the WAL
shows written is dumped as soon as the reading finds it, while the rest of the span is read
(:class:`Touched`), and a table new or replaced since the parent, or counted written since
then by the server's statistics, with the snapshot (:func:`early_candidates`); only the
reading's final answer decides which parent objects are reused.

Only one backup of a database into a repository runs at a time: a PostgreSQL advisory
lock on the source database (visible to every machine that backs it up) guards the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import os
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar, cast

import psycopg

from backup_tool import __version__
from backup_tool.config.policy import Policy
from backup_tool.config.settings import Settings
from backup_tool.core.checksum_methods import ChecksumMethod, checksum_method_for
from backup_tool.core.kinds import LOGICAL_KINDS, BackupKind
from backup_tool.core.report import NullReporter, Reporter, Task, Unit
from backup_tool.core.walnames import WalChanges, WalSpan, format_lsn, parse_lsn
from backup_tool.errors import BackupToolError, DatabaseError, LockHeldError, WalDamagedError
from backup_tool.logical import parts, schema_reuse
from backup_tool.logical.schema_reuse import SideReuse
from backup_tool.postgres import (
    column_order,
    database_level,
    extension_config,
    large_objects,
    matviews,
    schema,
    walbasis,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import inventory as catalog_inventory
from backup_tool.postgres.connection import ConnInfo, Snapshot, TableInfo
from backup_tool.repository.catalog import Candidate, Catalog, data_prefix, manifest_key, new_backup_id
from backup_tool.repository.catalog_index import IndexEntry
from backup_tool.repository.keyguard import guard_writes
from backup_tool.repository.manifest import (
    CHECKSUM_METHOD_FORMATS,
    FRAMED_BASE_FORMAT,
    SPLIT_TABLE_FORMAT,
    Manifest,
    ManifestInventory,
    ManifestOptions,
    RelationFile,
    SequenceRecord,
    StoredObject,
    TableEntry,
    WalBasis,
    utc_iso,
)
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage import Storage, open_storage
from backup_tool.repository.storage.base import ObjectLock
from backup_tool.repository.storage.encrypted import encryption_of
from backup_tool.streams import pipeline, pipes, testhooks
from backup_tool.streams.background import Background


def compression_threads(jobs: int) -> int:
    cores = os.cpu_count() or 1
    return 0 if jobs >= cores else cores // jobs


def lock_name(repo_url: str, database: str) -> str:
    return f"backup-tool:backup:{repo_url}:{database}"


RENEW_EVERY = 8
"""Tables a snapshot session reads before it lets go of its locks (see :class:`_Sessions`),
and the small tables checksummed in one statement (:func:`parts.batched`)."""

DATA_SESSION_SETTINGS = {"max_parallel_workers_per_gather": "0"}
"""Settings of the data phase's sessions (snapshot sessions and psql's COPY sessions): no
parallel workers, so ``jobs`` bounds the server processes the backup keeps busy. A checksum
query's workers would be more processes than cores beside the other sessions, each a fresh
backend paying its start and a page fault for every shared buffer page it reads (pgbench
scale 50 with 16 wide tables, jobs 2: 0.2-0.3 s of the server's CPU); results are the same."""


class _Sessions:
    """The data phase's server sessions: at most ``jobs`` work on the server at once (a COPY
    or a checksum query each, without parallel workers: :data:`DATA_SESSION_SETTINGS`),
    whatever the number of threads. A dump holds its slot only
    while its COPY runs, not while its object's upload completes, so the next table's COPY
    starts while the last request of the previous one is answered. Checksum queries (and the
    COPY of small tables) run on sessions importing the backup's snapshot, opened on demand
    (never more than ``jobs``) and reused; every :data:`RENEW_EVERY` uses a session ends its
    transaction and imports the snapshot again, so it holds the locks of a few tables at a
    time (the snapshot's own session holds every table's): a database of thousands of tables
    needs no more lock slots than ``pg_dump`` does."""

    def __init__(self, conninfo: ConnInfo, snapshot_id: str, stack: ExitStack, jobs: int,
                 encoding: str) -> None:
        self.conninfo = conninfo
        self.snapshot_id = snapshot_id
        self.settings = {"client_encoding": encoding, **DATA_SESSION_SETTINGS}
        self.stack = stack
        self._slots = threading.Semaphore(jobs)
        self._idle: list[psycopg.Connection[Any]] = []
        self._uses: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self) -> Callable[[], None]:
        """Wait for a slot; returns its release, which may be called more than once."""
        self._slots.acquire()
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._slots.release()
        try:
            pipeline.check_cancelled()
        except BaseException:
            release()
            raise
        return release

    @contextmanager
    def snapshot_session(self, tables: int = 1) -> Iterator[psycopg.Connection[Any]]:
        """A slot and a snapshot session for one statement that reads ``tables`` tables
        (counted as that many uses: :data:`RENEW_EVERY` bounds the locks held, not the
        statements)."""
        release = self.acquire()
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else self.stack.enter_context(
                    postgres.snapshot_session(self.conninfo, self.snapshot_id, self.settings))
            yield conn
            uses = self._uses.get(id(conn), 0) + tables
            if uses >= RENEW_EVERY:
                postgres.renew_snapshot(conn, self.snapshot_id)
                uses = 0
            with self._lock:
                self._uses[id(conn)] = uses
                self._idle.append(conn)
        finally:
            release()


def _store_compressed(storage: Storage, key: str, chunks: Iterable[bytes] | pipeline.Fill, level: int,
                      threads: int, on_raw: Callable[[int], None] | None = None,
                      pause: str = "") -> tuple[StoredObject, pipeline.StreamStats]:
    """Compress ``chunks`` (an iterator of chunks, or a :data:`pipeline.Fill`) into the object ``key``."""
    stats = pipeline.StreamStats()
    fill = chunks if callable(chunks) else pipeline.fill_from(chunks)
    stream = pipeline.compress_filled(fill, level, threads, stats, on_raw)
    result = storage.put(key, testhooks.paused_stream(pause, stream) if pause else stream)
    return StoredObject(key, result.size, result.sha256, stats.raw_size), stats


def _dump_table(storage: Storage, conninfo: ConnInfo, major: int, snapshot_id: str,
                table: TableInfo, key: str, level: int, threads: int, encoding: str,
                advance: Callable[[int], None], sessions: _Sessions,
                blocks: postgres.BlockRange = (None, None)) -> tuple[StoredObject, int]:
    """COPY ``table`` (or its ``blocks``) into the object ``key``, read from psql's stdout
    straight into the compressor's frame buffers. The session slot is held from the start
    of the COPY to its end (psql's exit checked, so a failed COPY never completes its
    object); the upload's last request is answered outside it. A table smaller than
    :data:`SMALL_COPY_BYTES` is copied on a snapshot session of our own instead: no psql
    process and server backend to start for each of thousands of small tables."""
    if table.size < SMALL_COPY_BYTES and blocks == (None, None):
        return _dump_small_table(storage, table, key, level, threads, advance, sessions)
    argv = postgres.copy_out_command(conninfo, major, snapshot_id, table, blocks)
    env = conninfo.tool_env(settings=DATA_SESSION_SETTINGS)
    env["PGCLIENTENCODING"] = encoding
    release = sessions.acquire()
    try:
        proc = pipeline.Process(argv, env, f"COPY of {table.schema}.{table.name}")
    except BaseException:
        release()
        raise
    # one wake-up of this thread per 64 KiB of COPY text otherwise, each waiting for the GIL
    # beside a computing thread (an incremental's WAL scan): the bench's 26 MB table read in
    # 0.26-0.34 s that way, 0.18-0.22 s through 1 MiB (0.19 s without that thread)
    pipes.widen_pipe(proc.stdout.fileno())

    def copied(view: memoryview) -> int:
        n = proc.readinto(view)
        if not n:
            proc.finish()
            release()
        return n

    try:
        obj, stats = _store_compressed(storage, key, copied, level, threads, advance, "backup:upload")
    except BaseException:
        proc.kill()
        raise
    finally:
        release()
    return obj, stats.lines


SMALL_COPY_BYTES = 1 << 20
"""Tables smaller than this on disk are copied in-process (see :func:`_dump_table`)."""

def _dump_small_table(storage: Storage, table: TableInfo, key: str, level: int, threads: int,
                      advance: Callable[[int], None], sessions: _Sessions) -> tuple[StoredObject, int]:
    """The COPY and its compression inside the session slot; the compressed object (about the
    table's size on disk) is uploaded after it, while the next table's COPY runs."""
    stats = pipeline.StreamStats()
    with sessions.snapshot_session() as conn:
        try:
            with conn.cursor() as cur, cur.copy(postgres.copy_out_sql(table)) as copy:
                compressed = list(pipeline.compress_filled(pipeline.fill_from(bytes(row) for row in copy),
                                                           level, threads, stats, advance))
        except psycopg.Error as exc:
            raise DatabaseError(f"COPY of {table.schema}.{table.name} failed: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    result = storage.put(key, testhooks.paused_stream("backup:upload", iter(compressed)))
    return StoredObject(key, result.size, result.sha256, stats.raw_size), stats.lines


class ChainMember(Candidate, Protocol):
    """What :func:`choose_parent` reads of a backup (a :class:`Manifest` or a :class:`ChainLink`)."""

    @property
    def parent_id(self) -> str | None: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def encryption_key_id(self) -> str | None: ...


@dataclass(frozen=True)
class ChainLink:
    """A backup as the catalog index describes it, enough to choose a parent without reading
    every manifest."""

    id: str
    kind: str
    database: str
    started_at: datetime
    parent_id: str | None
    expires_at: datetime
    encryption_key_id: str | None

    @classmethod
    def of(cls, entry: IndexEntry) -> ChainLink:
        r = entry.parsed
        return cls(entry.id, r.kind, r.database, r.started_at, r.parent_id, r.expires_at, entry.key_id)


M = TypeVar("M", bound=ChainMember)


def choose_parent(backups: Sequence[M], database: str, policy: Policy,
                  now: datetime, key_id: str | None = None) -> tuple[M | None, str]:
    """The backup an incremental taken ``now`` builds on, or None and the reason a full is needed.

    Pure: a function of the repository's backups (oldest first), the policy, the time and the
    id of the encryption key in use. The parent is the newest full or incremental of the same
    database. A full is needed when there is none, when the chain already holds
    ``max_chain_length`` incrementals, when the chain's full would expire before the new
    incremental (a chain must outlive its tips), or when the chain was written with another
    encryption key or none (a chain never mixes keys: its tables are read with one key).
    """
    chain = [m for m in backups if m.database == database and m.kind in LOGICAL_KINDS]
    if not chain:
        return None, f"no full backup of {database} in the repository"
    parent = chain[-1]
    parent_key = parent.encryption_key_id
    if parent_key != key_id:
        was = f"encrypted with key id {parent_key}" if parent_key else "not encrypted"
        now_ = f"key id {key_id}" if key_id else "no key"
        return None, f"the chain of {parent.id} is {was} and this backup uses {now_} (a chain never mixes keys)"
    by_id = {m.id: m for m in chain}
    links = [parent]
    while links[0].parent_id:
        ancestor = by_id.get(links[0].parent_id)
        if ancestor is None:
            return None, f"the chain of {parent.id} is broken ({links[0].parent_id} is missing)"
        links.insert(0, ancestor)
    incrementals = len(links) - 1
    if incrementals >= policy.retention.max_chain_length:
        return None, f"the chain of {links[0].id} already has {incrementals} incrementals (max_chain_length)"
    if links[0].expires_at < policy.expires_at(BackupKind.INCREMENTAL, now):
        return None, f"full {links[0].id} expires before a new incremental would"
    return parent, ""


def unchanged(entry: TableEntry | None, table: TableInfo, rows: int, checksum: str) -> bool:
    """True only if the parent's object holds exactly this table's current rows."""
    return (entry is not None and bool(entry.stored) and entry.relkind == table.relkind
            and entry.parent == table.parent and entry.columns == table.columns
            and entry.rows == rows and entry.checksum == checksum)


RelFile = tuple[int, int, int]
LiveWal = Callable[[str, "list[tuple[int, int]]"], "list[bytes] | None"]
"""The bytes of WAL segment ``name`` in each ``[start, stop)`` of a list of ranges, as the
server's ``pg_wal`` holds it (``live(name, ranges)``), or None."""


class ChangeSource(Protocol):
    """Reads the WAL of a span and returns the (tablespace, database, relfilenode) of every
    relation a row-changing record touched; raises when it cannot say for certain. The
    third argument is how long to wait for the span's last segment to reach the archive;
    ``live``, when given, reads the segments still in the server's ``pg_wal`` there, archived
    or not (the server has flushed its WAL through the span's end); ``seen``, when given, is told each
    relation as it is first found touched, while the reading goes on. The CLI passes
    :func:`backup_tool.physical.walscan.changed_relations` (this layer may not import it)."""

    def __call__(self, storage: Storage, span: WalSpan, wait_seconds: float,
                 live: LiveWal | None = None, seen: Callable[[RelFile], None] | None = None) -> WalChanges: ...


class Touched:
    """The tables the WAL scan has shown written so far, as it reads, and whether it has ended.

    Fed by the scan's thread (:meth:`seen`, :meth:`ended`), read by the data phase
    (:meth:`wait`), which starts dumping those tables before the scan is over: a table a
    row-changing record touched is changed whatever the rest of the span holds (see
    :func:`classify`), so its COPY, taken in the backup's snapshot like any other, is needed.
    Only the scan's final answer decides what is reused. Only WAL-logged heaps of the
    backup's database count (the others are compared by checksum)."""

    def __init__(self, basis: WalBasis | None) -> None:
        self._database = basis.database_oid if basis is not None else -1
        self._tables: dict[int, int] = {}
        for rel in basis.relations if basis is not None else ():
            if rel.logged_heap:
                self._tables[rel.relfilenode] = rel.oid
                if rel.toast_relfilenode:
                    self._tables[rel.toast_relfilenode] = rel.oid
        self._found: list[int] = []
        self._ended = False
        self._changed = threading.Condition()

    def hint(self, oids: Iterable[int]) -> None:
        """Tables to dump now as if the scan had named them (see :func:`early_candidates`):
        only the WAL-logged heaps it could name."""
        known = set(self._tables.values())
        with self._changed:
            for oid in oids:
                if oid in known and oid not in self._found:
                    self._found.append(oid)
            self._changed.notify_all()

    def seen(self, rel: RelFile) -> None:
        _tablespace, database, node = rel
        oid = self._tables.get(node) if database == self._database else None
        if oid is None:
            return
        with self._changed:
            if oid not in self._found:
                self._found.append(oid)
                self._changed.notify_all()

    def ended(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait(self, known: int) -> tuple[list[int], bool]:
        """The table oids found after the first ``known``, once there are some or the scan has
        ended; and whether it has."""
        with self._changed:
            self._changed.wait_for(lambda: self._ended or len(self._found) > known)
            return self._found[known:], self._ended


ARCHIVE_WAIT_SECONDS = 30.0
#: How long the WAL writer gets to flush the span's end before the checksums decide instead.
FLUSH_WAIT_SECONDS = 2.0
#: Estimates behind ``change_detection = "auto"`` (measured on 2 cores by scripts/bench):
#: checksumming tables per session, reading archived WAL, and the fixed delay of having the
#: server switch segments and its archiver push the last one, or (for a role that may read
#: the server's pg_wal) of having it flush its WAL and reading the tail there.
CHECKSUM_BYTES_PER_SECOND = 150e6
WAL_BYTES_PER_SECOND = 40e6
ARCHIVE_DELAY_SECONDS = 2.5
SERVER_WAL_DELAY_SECONDS = 0.3


class TableVerdict(enum.Enum):
    UNCHANGED = "unchanged"
    CHANGED = "changed"
    SCAN = "scan"


def wal_span(parent: WalBasis | None, current: WalBasis | None) -> WalSpan | str:
    """The WAL that holds every change between the parent's snapshot and this one, or why
    there is no such span the tool can trust. Pure."""
    if parent is None:
        return "the parent backup recorded no WAL position"
    if current is None:
        return "this backup could not record its WAL position"
    if parent.system_identifier != current.system_identifier:
        return "the parent backup comes from another cluster"
    if parent.timeline != current.timeline:
        return f"the server changed timeline since the parent backup ({parent.timeline} -> {current.timeline})"
    if parent.database_oid != current.database_oid:
        return "the database was re-created since the parent backup"
    if parent.segment_size != current.segment_size:
        return "the WAL segment size changed since the parent backup"
    if parent.types_digest != current.types_digest:
        return "a type definition that shapes rows' text (enum labels, composite or user types) changed"
    start, end = parse_lsn(parent.start_lsn), parse_lsn(current.end_lsn)
    if end < parse_lsn(parent.end_lsn) or parse_lsn(current.start_lsn) < start:
        return "the WAL position went back since the parent backup"
    return WalSpan(current.timeline, start, end, current.segment_size, int(current.system_identifier))


def wal_worth_reading(mode: str, span: WalSpan, table_bytes: int, jobs: int,
                      from_server: bool = False) -> str | None:
    """Why the checksums decide instead of the span's WAL, or None. Pure.

    ``mode`` is the policy's ``backup.change_detection``: ``wal`` reads the WAL whenever it
    can answer, ``checksum`` never does, ``auto`` reads it when that is estimated cheaper
    than checksumming the tables with ``jobs`` sessions. ``from_server``: the WAL not
    archived yet can be read from the server's pg_wal, so the archiver is not waited for."""
    if mode == "checksum":
        return "the policy says backup.change_detection = checksum"
    if mode == "wal":
        return None
    wal_bytes = span.end - span.start
    wal_cost = (SERVER_WAL_DELAY_SECONDS if from_server else ARCHIVE_DELAY_SECONDS) + wal_bytes / WAL_BYTES_PER_SECOND
    checksum_cost = table_bytes / (CHECKSUM_BYTES_PER_SECOND * max(jobs, 1))
    if wal_cost >= checksum_cost:
        return (f"checksumming the tables ({table_bytes / 2**20:.0f} MiB, about {checksum_cost:.1f} s) is cheaper "
                f"than reading the WAL written since the parent ({wal_bytes / 2**20:.0f} MiB, about {wal_cost:.1f} s)")
    return None


def classify(parent: WalBasis, current: WalBasis, touched: frozenset[RelFile]) -> dict[int, TableVerdict]:
    """Per table oid (of ``current``'s relations): SCAN for tables the WAL does not describe
    (not a WAL-logged heap at either snapshot), CHANGED when new, moved to another relation
    file, of other column types, or touched by a row-changing record; else UNCHANGED. Pure."""
    written = {(db, rel) for _spc, db, rel in touched}
    db = current.database_oid
    verdicts: dict[int, TableVerdict] = {}
    for rel in current.relations:
        before = parent.relation(rel.table)
        if not rel.logged_heap:
            verdicts[rel.oid] = TableVerdict.SCAN
        elif _replaced(before, rel):
            verdicts[rel.oid] = TableVerdict.CHANGED
        elif (db, rel.relfilenode) in written or (rel.toast_relfilenode and (db, rel.toast_relfilenode) in written):
            verdicts[rel.oid] = TableVerdict.CHANGED
        else:
            verdicts[rel.oid] = TableVerdict.UNCHANGED
    return verdicts


def _replaced(before: RelationFile | None, rel: RelationFile) -> bool:
    """Whether a table is changed whatever the WAL says: new since the parent (or not a
    WAL-logged heap there), in other relation files, or of other column types. Pure."""
    return before is None or not before.logged_heap or (
        before.oid, before.tablespace, before.relfilenode, before.toast_relfilenode, before.column_types) != (
        rel.oid, rel.tablespace, rel.relfilenode, rel.toast_relfilenode, rel.column_types)


def early_candidates(parent: WalBasis, current: WalBasis, parent_writes: Any,
                     writes: dict[int, int]) -> list[int]:
    """The tables (oids of ``current``'s WAL-logged heaps) an incremental dumps at once,
    before its WAL scan names any: those changed whatever the WAL says (:func:`_replaced`),
    and those whose write count (``writes``, read now) is above the one the parent recorded
    (``parent_writes``: its ``row_writes`` option, read as the parent ended by
    :func:`backup_tool.postgres.walbasis.row_writes`). Pure.

    Only the order of the work depends on it, never what is stored: the counts are lossy
    and reset (a table they miss is dumped once the scan names it, as before), and a table
    dumped early that the scan's final answer shows unchanged has its new objects deleted and
    the parent's reused (:meth:`_TableDumper.dump_changed`). A count above the parent's
    means rows were written since the parent read it, as a reset only lowers them."""
    recorded = parent_writes if isinstance(parent_writes, dict) else {}
    found = []
    for rel in current.relations:
        if not rel.logged_heap:
            continue
        was = recorded.get(str(rel.oid))
        now = writes.get(rel.oid)
        if _replaced(parent.relation(rel.table), rel) or (
                type(was) is int and now is not None and now > was):
            found.append(rel.oid)
    return found


def same_shape(entry: TableEntry | None, table: TableInfo) -> bool:
    """True if the parent's object was dumped from a table of this kind, place and columns."""
    return (entry is not None and bool(entry.stored) and entry.relkind == table.relkind
            and entry.parent == table.parent and entry.columns == table.columns)


class NoLongerDue(Exception):
    """Raised instead of backing up when ``still_due`` says, under the lock, that another
    run has already taken the backup (run-due's guard against two overlapping cron runs)."""


StillDue = Callable[[list[BackupRecord]], bool]
"""Asked under the lock with every backup's record (oldest first)."""


def backup_full(settings: Settings, reporter: Reporter | None = None, jobs: int | None = None,
                only_tables: set[tuple[str, str]] | None = None, still_due: StillDue | None = None,
                lock_timeout: float = 0.0, storage: Storage | None = None) -> Manifest:
    """Take a full logical backup of the settings' database; return its committed manifest.

    ``only_tables`` limits the table data to those (schema, name) pairs (and, for a
    partitioned table, its partitions); the schema archive is always complete.
    ``still_due`` is asked, once the lock is held, whether the backup is still wanted.
    ``lock_timeout``: seconds to wait for a running backup of the same database into the
    same repository to finish (0: fail at once with :class:`LockHeldError`).
    ``storage``: the repository of ``settings.repo_url`` already opened (:func:`open_storage`).
    """
    return _logical_backup(settings, reporter or NullReporter(), jobs, BackupKind.FULL, only_tables, still_due,
                           lock_timeout, storage=storage)


def backup_incremental(settings: Settings, reporter: Reporter | None = None,
                       jobs: int | None = None, still_due: StillDue | None = None,
                       lock_timeout: float = 0.0, changes: ChangeSource | None = None,
                       storage: Storage | None = None) -> Manifest:
    """Back up only what changed since the newest backup; take a full (and say so) if needed.

    ``changes`` reads the archived WAL (see :data:`ChangeSource`); without it, or when the
    WAL cannot answer for certain, every table is compared by checksum. ``storage``: as for
    :func:`backup_full`."""
    return _logical_backup(settings, reporter or NullReporter(), jobs, BackupKind.INCREMENTAL, None, still_due,
                           lock_timeout, changes, storage)


def _logical_backup(settings: Settings, reporter: Reporter, jobs: int | None, kind: str,
                    only_tables: set[tuple[str, str]] | None, still_due: StillDue | None = None,
                    lock_timeout: float = 0.0, changes: ChangeSource | None = None,
                    storage: Storage | None = None) -> Manifest:
    if storage is None:
        storage = open_storage(settings.repo_url)
    catalog = Catalog(storage)
    conninfo = ConnInfo(settings.dsn).with_search_path(postgres.NAME_SEARCH_PATH)
    policy = settings.policy
    opening = Background(_open_source, conninfo, name="source-session")
    try:
        guard_writes(storage, policy.backup.encryption_key_id, policy.name, f"take a {kind} backup",
                     catalog.key_ids)
    except BaseException:
        _close_when_open(opening)
        raise
    jobs = jobs or policy.backup.jobs
    level = policy.backup.logical_compression_level
    threads = compression_threads(jobs)

    with ExitStack() as stack:
        source = opening.result()
        control = source.control
        stack.callback(source.close)
        info = source.info
        if info["encoding"] == "SQL_ASCII":
            postgres.refuse_non_ascii_names(control)
        major = info["server_version_num"] // 10000
        probing = source.tools
        database = info["database"]
        if lock_timeout > 0:
            reporter.event("waiting for the backup lock", database=database, seconds=lock_timeout)
        if not postgres.advisory_lock(control, lock_name(storage.url, database), lock_timeout):
            waited = f" (waited {lock_timeout:g} s)" if lock_timeout > 0 else ""
            raise LockHeldError(f"another backup of {database} into {storage.url} is running{waited}",
                                "wait for it to finish, let cron retry later, or pass --lock-timeout SECONDS")
        current = catalog.current() if still_due is not None or kind == BackupKind.INCREMENTAL else []
        if still_due is not None and not still_due([e.backup_record() for e in current]):
            raise NoLongerDue(f"another run already took the due backup of {database}")
        started_at = datetime.now(timezone.utc)
        parent = None
        if kind == BackupKind.INCREMENTAL:
            key = encryption_of(storage)
            link, why = choose_parent([ChainLink.of(e) for e in current], database, policy,
                                      started_at, key.key_id if key else None)
            parent = catalog.load(link.id) if link is not None else None
            if parent is not None and major < parent.checksum_method.min_server_major:
                why = (f"the chain of {parent.id} checksums tables by {parent.checksum_method}, "
                       f"which PostgreSQL {major} cannot compute")
                parent = None
            if parent is None:
                kind = BackupKind.FULL
                reporter.warning(f"taking a full backup instead of an incremental: {why}")
        else:
            catalog.ids()
        tools = probing.result()
        backup_id = new_backup_id(kind, started_at)
        prefix = data_prefix(backup_id)
        storage.defer_name_sync(prefix)  # Catalog.commit syncs them, before the manifest publishes them
        expires_at = policy.expires_at(kind, started_at)
        marking = Background(catalog.mark_running, backup_id, kind, database, name="running-marker")
        unmark = _Unmark(marking, catalog, backup_id)
        stack.callback(unmark)
        lock = None
        if policy.object_lock.mode != "none":
            marking.result()  # the marker itself is written unlocked: it is deleted at the end
            lock = ObjectLock(policy.object_lock.mode, expires_at)
            storage.lock_new_objects(lock)
        reporter.event("backup started", id=backup_id, kind=kind, database=database,
                       parent=parent.id if parent else None, repository=storage.url)
        try:
            method = parent.checksum_method if parent is not None else checksum_method_for(major)
            written_as = _written_as(conninfo, settings.dsn, parent)
            job = _DumpJob(storage, written_as, major, policy, jobs, level, threads, kind, backup_id,
                           started_at, expires_at, parent, only_tables, reporter, method,
                           dump_context(info, tools, written_as, _search_path_of(parent)))
            manifest = replace(_dump(job, control, info, stack, changes, _session_as(source, conninfo, written_as),
                                     marking.result), client_tools=tools)
            if lock is not None:
                manifest.options["object_lock"] = {"mode": lock.mode, "retain_until": utc_iso(lock.retain_until)}
            counting = Background(walbasis.row_writes, control, [r.oid for r in manifest.wal_basis.relations
                                                                 if r.logged_heap] if manifest.wal_basis else [],
                                  name="row-writes")
            try:
                testhooks.pause_point("backup:before-manifest")
                missing = catalog.missing_objects(manifest)
            finally:
                counting.join()  # never left running on the session the backup closes
            if manifest.wal_basis is not None:
                manifest.options["row_writes"] = {str(oid): n for oid, n in counting.result().items()}
            if missing:
                raise BackupToolError(f"backup {backup_id} lost {len(missing)} object(s) before its manifest "
                                      f"was written ({missing[0]}); it was not committed",
                                      "something deleted them while the backup ran (a retention sweep or a "
                                      "bucket lifecycle rule?): check, then run the backup again")
            manifest = catalog.commit(manifest, published=unmark)
        except BaseException:
            _discard(storage, prefix, backup_id)
            raise
        reporter.event("backup finished", id=backup_id, kind=kind, size_bytes=manifest.size_bytes,
                       seconds=round((manifest.finished_at - started_at).total_seconds(), 2))
        return manifest


class _Unmark:
    """Removes the backup's running marker once its write has ended (were it still on its
    way, the removal could come first and leave it behind), at most once: as the commit
    publishes the manifest (while the catalog index is updated), or when the backup ends
    without one."""

    def __init__(self, marking: Background[None], catalog: Catalog, backup_id: str) -> None:
        self._marking = marking
        self._catalog = catalog
        self._backup_id = backup_id
        self._once = threading.Lock()

    def __call__(self) -> None:
        if self._once.acquire(blocking=False):
            self._marking.join()
            self._catalog.unmark_running(self._backup_id)


def _written_as(opened: ConnInfo, dsn: str, parent: Manifest | None) -> ConnInfo:
    """How this backup's sessions read and write text: as its parent was written (the text
    settings it pinned, the search_path it wrote names under, or the sessions' own where it
    recorded none), so that every backup of a chain reads alike; a full backup as ``opened``
    (every pin, :data:`~backup_tool.postgres.connection.NAME_SEARCH_PATH`)."""
    return ConnInfo(dsn).as_written(parent.options) if parent is not None else opened


def _session_as(source: _Source, opened: ConnInfo, written_as: ConnInfo) -> psycopg.Connection[Any]:
    """The snapshot's session opened ahead (as ``opened``), unless the backup's sessions are
    to be opened otherwise (an incremental on a backup written before a pin): then one opened
    as they are, so that every session of the backup reads rows and writes checksums alike."""
    if (written_as.unpinned, written_as.params.get("options")) == (opened.unpinned, opened.params.get("options")):
        return source.snapshot_session
    source.snapshot_session.close()
    return Snapshot.open_session(written_as)


@dataclass(frozen=True)
class _Source:
    """The backup's control session, what the server said of itself, and the probe of the
    client programs serving its major (started as soon as the major was known)."""

    control: psycopg.Connection[Any]
    info: dict[str, Any]
    tools: Background[dict[str, str]]
    snapshot_session: psycopg.Connection[Any]
    """The session the snapshot will be exported from, opened (no transaction yet)."""

    def close(self) -> None:
        self.snapshot_session.close()
        self.control.close()


def _open_source(conninfo: ConnInfo) -> _Source:
    """Connect to the source, read its server information, start probing the client
    programs and open the snapshot's session: run on a thread while the repository's key
    guard and catalog are read, so the backends' start and the programs' ``--version`` runs
    overlap those requests. Its errors are raised where the backup takes the session, after
    the guard's, as when it connected there."""
    control = conninfo.connect()
    try:
        info = postgres.server_info(control)
        tools = Background(postgres.tool_versions, info["server_version_num"] // 10000, name="client-tool-versions")
        return _Source(control, info, tools, Snapshot.open_session(conninfo))
    except BaseException:
        control.close()
        raise


def _close_when_open(opening: Background[_Source]) -> None:
    """Close the source's sessions once they are open, without waiting for them here (a
    refused backup must not wait for an unreachable server's connect timeout)."""
    def close() -> None:
        try:
            opening.result().close()
        except BaseException:  # noqa: BLE001 - the backup already fails with its own error
            pass
    threading.Thread(target=close, name="source-session-close", daemon=True).start()


def _discard(storage: Storage, prefix: str, backup_id: str) -> None:
    """Best-effort removal of an unfinished backup's objects (the retention sweep catches the
    rest). Nothing is removed if the manifest made it to the repository after all."""
    try:
        if storage.exists(manifest_key(backup_id)):
            return
        for obj in storage.list(prefix):
            storage.delete(obj.key)
    except Exception:  # noqa: BLE001 - cleanup on a failure path: the caller reports the failure itself
        pass


def _start_wal_scan(storage: Storage, control: psycopg.Connection[Any], parent: Manifest | None,
                    basis: WalBasis | None, changes: ChangeSource | None, table_bytes: int,
                    policy: Policy, jobs: int, touched: Touched) -> Background[Any] | str:
    """The WAL scan of the span since the parent, started in the background (telling
    ``touched`` what it finds), or why not."""
    if parent is None or changes is None:
        return "no WAL reader"
    span = wal_span(parent.wal_basis, basis)
    if isinstance(span, str):
        return span
    readable = walbasis.can_read_wal_files(control)
    costly = wal_worth_reading(policy.backup.change_detection, span, table_bytes, jobs, readable)
    if costly is not None:
        return costly
    assert parent.wal_basis is not None
    early = walbasis.committed_since(control, parent.wal_basis.running_xids)
    if isinstance(early, str):
        return early
    span = replace(span, early_xids=early)
    if readable and (walbasis.force_wal_flush(control) or walbasis.request_wal_flush(control)):
        live = walbasis.ServerWal(control, format_lsn(span.end), span.segment_size, FLUSH_WAIT_SECONDS)
        return Background(_watched_scan, changes, touched, storage, span, 0.0, live, name="wal-scan")
    wait = ARCHIVE_WAIT_SECONDS if walbasis.switch_wal(control) else 0.0
    return Background(_watched_scan, changes, touched, storage, span, wait, None, name="wal-scan")


def _watched_scan(changes: ChangeSource, touched: Touched, storage: Storage, span: WalSpan, wait: float,
                  live: LiveWal | None) -> WalChanges:
    """The WAL scan, telling ``touched`` what it finds as it reads and when it has ended."""
    try:
        return changes(storage, span, wait, live=live, seen=touched.seen)
    finally:
        touched.ended()


@dataclass(frozen=True)
class _DumpJob:
    """What one backup run fixed before its snapshot: where it goes, how it compresses, what it
    is (kind, id, parent) and what it covers."""

    storage: Storage
    conninfo: ConnInfo
    major: int
    policy: Policy
    jobs: int
    level: int
    threads: int
    kind: str
    backup_id: str
    started_at: datetime
    expires_at: datetime
    parent: Manifest | None
    only_tables: set[tuple[str, str]] | None
    reporter: Reporter
    checksum_method: ChecksumMethod
    """The parent's (its unchanged tables' checksums are reused), else the cheapest the server has."""
    dump_context: dict[str, Any] = field(default_factory=dict)
    """How the schema and roles dumps are made, but the session's role and settings (see :func:`dump_context`)."""

    @property
    def prefix(self) -> str:
        return data_prefix(self.backup_id)


@dataclass(frozen=True)
class _Snapshotted:
    """What was read in the backup's snapshot before any data moved."""

    snap: Snapshot
    tables: list[TableInfo]
    basis: WalBasis | None
    wal_scan: Background[Any] | str
    touched: Touched | None
    """What the running WAL scan has found so far (None: no scan)."""
    large_objects: dict[str, Any]
    """The large objects' summary (manifest inventory ``large_objects``)."""

    @property
    def data_tables(self) -> list[TableInfo]:
        return [t for t in self.tables if t.has_data]


@dataclass(frozen=True)
class _Catalogs:
    """What the manifest records of the snapshot's catalogs besides its tables."""

    sequences: list[SequenceRecord]
    inventory: ManifestInventory
    extension_rows: StoredObject | None
    """The extension configuration tables' rows (see :mod:`backup_tool.postgres.extension_config`)."""
    session: dict[str, str]
    """The role the backup's sessions (and so its dumps) run as, and the settings that shape
    how they print values (:func:`backup_tool.postgres.walbasis.dump_session`)."""
    files: walbasis.SnapshotFiles | None
    """The relation files no schema dump reads, for an incremental reading the WAL (else None)."""


@dataclass(frozen=True)
class _SideObjects:
    schema: StoredObject
    globals: StoredObject
    large_objects: StoredObject | None
    fingerprint: str
    reuse: SideReuse | None
    """What an incremental reused of its parent's schema and roles dumps (None: a full backup)."""


def _dump(job: _DumpJob, control: psycopg.Connection[Any], info: dict[str, Any], stack: ExitStack,
          changes: ChangeSource | None = None, snapshot_session: psycopg.Connection[Any] | None = None,
          marked: Callable[[], None] = lambda: None) -> Manifest:
    """The snapshot, then (once ``marked`` has returned: the backup's running marker, written
    while the snapshot is taken, is in the repository before any of its objects), each on a
    thread of its own while the tables are compared and
    dumped: its side objects (schema, roles, large objects: client tools that mostly wait on
    the server) and its catalog reads (sequences, inventories: only the manifest needs them).
    All are finished before anything is assembled or a failure propagates.

    The schema's pg_dump starts once the catalog reads are done: it locks every table as the
    snapshot's session does, and the catalog relations the reads lock meanwhile (released at
    once, but taken beyond each session's fast-path slots) would otherwise come on top of both
    in the server's shared lock table, so a server sized for ``pg_dump --jobs 2`` ran out of
    it in one backup in six or eight (``test_a_backup_needs_two_lock_slots_per_table_as_readme_says``)."""
    taken = _take_snapshot(job, control, info, stack, changes, snapshot_session)
    marked()
    catalogs = Background(_read_catalogs, job, taken, name="snapshot-catalogs")
    side_objects = Background(_store_side_objects, job, taken, catalogs, name="side-objects")
    try:
        dumper = _TableDumper(job, taken, info["encoding"], stack)
        method = reason = ""
        if job.parent is None:
            dumper.dump_all()
        else:
            method, reason = dumper.dump_changed(job.parent)
    finally:
        side_objects.join()
        catalogs.join()
    side: _SideObjects = side_objects.result()
    read: _Catalogs = catalogs.result()
    return _assemble(job, info, taken, side, read, dumper.entries(), method, reason)


def _take_snapshot(job: _DumpJob, control: psycopg.Connection[Any], info: dict[str, Any], stack: ExitStack,
                   changes: ChangeSource | None, session: psycopg.Connection[Any] | None = None) -> _Snapshotted:
    """Export the snapshot every worker shares, lock the tables, record the WAL basis, start the
    WAL scan for an incremental, and read the large objects' summary in that snapshot.
    ``session``: the snapshot's connection, opened ahead (:func:`_open_source`)."""
    before = walbasis.before_snapshot(control)
    snap = Snapshot(job.conninfo, session=session)
    stack.callback(snap.close)
    tables = postgres.selected_tables(snap.list_tables(job.reporter.warning), job.only_tables)
    recorded = job.parent.options.get("row_writes") if job.parent is not None else None
    counting = Background(walbasis.row_writes, control, [t.oid for t in tables if t.has_data]
                          if recorded and changes is not None else [], name="row-writes")
    try:
        snap.lock_tables(tables, job.reporter.warning)
        basis = walbasis.after_snapshot(snap.conn, before, info["system_identifier"],
                                        [t.oid for t in tables if t.has_data])
    finally:
        counting.join()  # never left running on the session the backup closes
    touched = Touched(basis)
    writes = counting.result()
    wal_scan = _start_wal_scan(job.storage, control, job.parent, basis, changes,
                               sum(t.size for t in tables if t.has_data), job.policy, job.jobs, touched)
    if isinstance(wal_scan, Background) and job.parent is not None and job.parent.wal_basis is not None \
            and basis is not None:
        touched.hint(early_candidates(job.parent.wal_basis, basis, recorded, writes))
    return _Snapshotted(snap, tables, basis, wal_scan, touched if isinstance(wal_scan, Background) else None,
                        large_objects.summary(snap.conn))


def _read_catalogs(job: _DumpJob, taken: _Snapshotted) -> _Catalogs:
    """Sequences and the inventories validation compares, read in the backup's snapshot (on
    its session, which the data phase's own queries take turns on), with the locks of what
    they read released at once (:func:`backup_tool.postgres.connection.locks_released_after`)."""
    conn = taken.snap.conn
    with postgres.locks_released_after(conn):
        sequences = postgres.sequences(conn)
        inventory = cast(ManifestInventory, {
            **catalog_inventory.inventory(conn), "database": database_level.properties(conn),
            "matviews": matviews.inventory(conn, contents=job.only_tables is None),
            "large_objects": taken.large_objects, column_order.INVENTORY_KEY: column_order.record(conn),
            "extension_config": extension_config.inventory(conn)})
        document = extension_config.rows_document(conn, inventory["extension_config"])
        files = walbasis.snapshot_files(conn, schema_reuse.FIRST_NORMAL_OID) \
            if job.parent is not None and isinstance(taken.wal_scan, Background) else None
    rows = None if document is None else _store_compressed(
        job.storage, job.prefix + extension_config.ROWS_OBJECT, [document], job.level, 0)[0]
    return _Catalogs(sequences, inventory, rows, walbasis.dump_session(job.conninfo), files)


def _store_side_objects(job: _DumpJob, taken: _Snapshotted, catalogs: Background[_Catalogs]) -> _SideObjects:
    """The schema archive, the globals (roles: cluster-wide, no snapshot to share; dumped
    meanwhile) and the large objects (reused from the parent when the parent's are the same),
    all from the snapshot. The schema's dump starts once ``catalogs`` are read (see :func:`_dump`);
    its text for the fingerprint (pg_restore, then normalized) is made while the archive is
    compressed and stored. An incremental reading the WAL first waits for the reading's end:
    the parent's schema archive and roles dump are reused instead of dumped again where
    :func:`backup_tool.logical.schema_reuse.plan` shows them this snapshot's."""
    conninfo, major, snapshot_id, parent = job.conninfo, job.major, taken.snap.snapshot_id, job.parent
    reuse = None
    if parent is not None:
        reuse = SideReuse.dumped("the changed tables were not learnt from the WAL")
        if isinstance(taken.wal_scan, Background):
            catalogs.join()
            reuse = _side_reuse(job, parent, taken, catalogs.result())
        job.reporter.event("schema and roles", **_reuse_options(reuse))
    globals_dump = None
    if reuse is None or reuse.globals_from is None:
        globals_dump = Background(lambda: _store_compressed(job.storage, job.prefix + "globals.sql.zst",
                                                            [schema.dump_globals(conninfo, major)], job.level, 0)[0],
                                  name="globals")
    try:
        catalogs.join()
        if reuse is not None and reuse.schema_from is not None:
            assert parent is not None and parent.schema is not None
            schema_obj, fingerprint = parent.schema, parent.schema_fingerprint
        else:
            schema_obj, fingerprint = _dump_schema(job, snapshot_id)
    finally:
        if globals_dump is not None:
            globals_dump.join()
    if globals_dump is not None:
        globals_obj: StoredObject = globals_dump.result()
    else:
        assert parent is not None and parent.globals is not None
        globals_obj = parent.globals
    lo_obj = None
    lo_summary = taken.large_objects
    if (parent is not None and parent.large_objects is not None
            and parent.inventory.get("large_objects") == lo_summary):
        lo_obj = parent.large_objects
    elif lo_summary["count"]:
        proc = large_objects.dump_stream(conninfo, major, snapshot_id)
        try:
            lo_obj, _ = _store_compressed(job.storage, job.prefix + "large_objects.pgdump.zst",
                                          large_objects.chunks_of(proc), job.level, job.threads)
        except BaseException:
            proc.kill()
            raise
    return _SideObjects(schema_obj, globals_obj, lo_obj, fingerprint, reuse)


def _dump_schema(job: _DumpJob, snapshot_id: str) -> tuple[StoredObject, str]:
    """The schema archive dumped and stored, and its fingerprint."""
    archive = schema.dump_schema(job.conninfo, job.major, snapshot_id)
    texting = Background(lambda: schema.normalize(schema.schema_text(archive, job.major)), name="schema-text")
    try:
        schema_obj, _ = _store_compressed(job.storage, job.prefix + "schema.pgdump.zst", [archive], job.level, 0)
    finally:
        texting.join()
    normalized: str = texting.result()
    return schema_obj, schema.fingerprint(normalized)


def dump_context(info: dict[str, Any], tools: dict[str, str], written_as: ConnInfo,
                 search_path: str | None) -> dict[str, Any]:
    """What the schema and roles dumps' text depends on besides the catalogs, but what the
    snapshot's session tells (the role and the settings that shape values' text, added from
    :func:`backup_tool.postgres.walbasis.dump_session`): the server's version, the client
    programs' and this tool's (which chooses their options), and the sessions' options.
    Recorded, with those, as the manifest's ``dump_context``. Pure."""
    return {"server_version_num": info["server_version_num"], "server_version": info["server_version"],
            "tool_version": __version__, "client_tools": dict(tools),
            "schema_dump_options": list(schema.SCHEMA_DUMP_OPTIONS),
            "session_options": written_as.tool_env().get("PGOPTIONS", ""),
            "pinned": sorted(set(postgres.RECORDED_PINS) - written_as.unpinned), "search_path": search_path}


def _side_reuse(job: _DumpJob, parent: Manifest, taken: _Snapshotted, read: _Catalogs) -> SideReuse:
    """:func:`schema_reuse.plan` for this incremental, once its WAL reading has ended."""
    assert isinstance(taken.wal_scan, Background)
    try:
        found: WalChanges = taken.wal_scan.result()
    except Exception:  # noqa: BLE001 - the checksums decide (see _wal_verdicts): dump as before
        return SideReuse.dumped("the changed tables were not learnt from the WAL")
    if read.files is None or taken.basis is None or parent.schema is None or parent.globals is None:
        return SideReuse.dumped("the changed tables were not learnt from the WAL")
    return schema_reuse.plan(parent.id, parent.options.get("dump_context"), {**job.dump_context, **read.session},
                             found.evidence, taken.basis.database_oid, read.files,
                             schema_reuse.statistics_in_dump(job.major, schema.SCHEMA_DUMP_OPTIONS))


SlotKey = tuple[int, int]
"""(table oid, part index) of one slice of the data phase."""


class _TableDumper:
    """Streams tables' COPY output into objects and takes their content checksums, in parallel
    sessions that share the backup's snapshot. A table at least ``backup.split_table_mb`` big
    (in a full backup, only when its dump is more than a session's even share of the work) is
    worked on in slices, one per range of its heap blocks (see :mod:`backup_tool.logical.parts`):
    each slice is its own object and its own checksum query, and the table's checksum is the
    sum of its slices'.

    The data phase is measured in the tables' on-disk size (the only size known before COPY):
    each slice is credited as its COPY text flows, never past its share of the table's size,
    and in full when its object is stored, so the bar ends at exactly 100 %."""

    def __init__(self, job: _DumpJob, taken: _Snapshotted, encoding: str, stack: ExitStack) -> None:
        self.job = job
        self.taken = taken
        self.encoding = encoding
        self.sessions = _Sessions(job.conninfo, taken.snap.snapshot_id, stack, job.jobs, encoding)
        self.objects: dict[SlotKey, tuple[StoredObject, int]] = {}
        self.checksums: dict[int, tuple[int, str]] = {}
        self.reused: dict[int, TableEntry] = {}
        self._sums: dict[SlotKey, tuple[int, str]] = {}
        self._pending: set[SlotKey] = set()
        self._pending_lock = threading.Lock()
        self._credited: dict[SlotKey, int] = {}
        self._dumped: set[SlotKey] = set()
        self._early: dict[int, list[cf.Future[None]]] = {}
        self._progress: Task = NullReporter().task("")
        self._summed: Task = NullReporter().task("")
        threshold = job.policy.backup.split_table_mb
        share = parts.even_share(taken.data_tables, job.jobs) if job.parent is None else None
        big = [t.oid for t in parts.split_tables(taken.data_tables, threshold, job.jobs, job.major, share)]
        heap = postgres.heap_blocks(taken.snap.conn, big) if big else {}
        self._types = postgres.column_types_of(taken.snap.conn, {t.oid: t.columns for t in taken.data_tables}) \
            if job.checksum_method is not ChecksumMethod.ROW_TEXT and taken.data_tables else {}
        self.slices: dict[int, list[parts.Slice]] = {}
        for piece in parts.slices(taken.data_tables, heap, threshold, job.jobs, job.major, share):
            self.slices.setdefault(piece.table.oid, []).append(piece)

    def _of(self, tables: list[TableInfo]) -> list[parts.Slice]:
        return [piece for t in tables for piece in self.slices[t.oid]]

    def dump_all(self) -> None:
        data_tables = self.taken.data_tables
        self._start("data", data_tables)
        self._sum(data_tables, self._of(data_tables))
        self._progress.finish()

    def _sum(self, tables: list[TableInfo], dumps: list[parts.Slice], title: str = "table checksums") -> None:
        """Checksum ``tables`` (slice by slice) while dumping ``dumps``, longest task first
        (:func:`backup_tool.logical.parts.schedule`); then record each table's checksum as
        the sum of its slices'."""
        pieces = self._of(tables)
        self._summed = self.job.reporter.task(title, total=len(pieces), unit=Unit.ITEMS) if pieces or not dumps \
            else NullReporter().task("")
        tasks = parts.batched(parts.schedule(dumps, pieces), SMALL_COPY_BYTES, RENEW_EVERY)
        pipeline.run_parallel(self.job.jobs + (self.job.jobs if dumps else 0),
                              [(self._checksum, batch) if work is parts.Work.CHECKSUM else (self._dump, batch[0])
                               for work, batch in tasks])
        self._summed.finish()
        for t in tables:
            self.checksums[t.oid] = postgres.combine_checksums([self._sums[(t.oid, p.index)]
                                                                for p in self.slices[t.oid]])

    def dump_changed(self, parent: Manifest) -> tuple[str, str]:
        """Reuse the parent's object for every table shown unchanged (by the WAL, or by equal
        checksums), dump the rest; returns (method, reason for the checksum method or '').
        A table the WAL scan finds written is dumped and checksummed as soon as it is found,
        while the scan reads on (:class:`Touched`); should the scan then fail and the checksums show it
        unchanged after all, its new objects are deleted and the parent's reused. The
        parent's reused objects are listed while the changed tables are dumped; one missing
        fails the backup once the dump is over (nothing is committed)."""
        with cf.ThreadPoolExecutor(self.job.jobs, thread_name_prefix="early") as early:
            try:
                return self._dump_changed(parent, early)
            finally:
                for futures in self._early.values():
                    for fut in futures:
                        fut.cancel()

    def _dump_changed(self, parent: Manifest, early: cf.ThreadPoolExecutor) -> tuple[str, str]:
        job, reporter, data_tables = self.job, self.job.reporter, self.taken.data_tables
        self._dump_while_scanning(early)
        verdicts, method, reason = _wal_verdicts(self.taken.wal_scan, parent, self.taken.basis, reporter)
        to_check = [t for t in data_tables if verdicts.get(t.oid, TableVerdict.SCAN) is TableVerdict.SCAN]
        for t in data_tables:
            entry = parent.table(t.schema, t.name)
            if verdicts.get(t.oid) is TableVerdict.UNCHANGED and entry is not None and same_shape(entry, t):
                self.reused[t.oid] = entry
                self.checksums[t.oid] = (entry.rows, entry.checksum)
        self._sum(to_check, [], "comparing tables with the parent backup")
        for t in to_check:
            entry = parent.table(t.schema, t.name)
            if entry is not None and unchanged(entry, t, *self.checksums[t.oid]):
                self.reused[t.oid] = entry
        listing = Background(Catalog(job.storage).missing_keys,
                             [o.key for e in self.reused.values() for o in e.stored], name="parent-objects")
        changed = [t for t in data_tables if t.oid not in self.reused]
        reporter.event("change detection", changed=len(changed), unchanged=len(self.reused), method=method,
                       **({"reason" if method == "checksum" else "note": reason} if reason else {}))
        self._start("data (changed tables)", changed)
        unsummed = [t for t in changed if t.oid not in self.checksums and t.oid not in self._early]
        self._sum(unsummed, [p for p in self._of(changed) if p.table.oid not in self._early])
        for futures in self._early.values():
            for fut in futures:
                fut.result()
        self._progress.finish()
        for t in changed:
            if t.oid in self._early and t.oid not in self.checksums:
                self.checksums[t.oid] = postgres.combine_checksums([self._sums[(t.oid, p.index)]
                                                                    for p in self.slices[t.oid]])
        for oid in [oid for oid in self._early if oid in self.reused]:
            for piece in self.slices[oid]:
                obj, _ = self.objects.pop((oid, piece.index))
                job.storage.delete(obj.key)
        missing = listing.result()
        if missing:
            raise BackupToolError(f"parent backup {parent.id} lacks objects it lists ({missing[0]})",
                                  "run 'backup-tool verify all', then take a full backup")
        return method, reason

    def _dump_while_scanning(self, early: cf.ThreadPoolExecutor) -> None:
        """Start dumping and checksumming each table the WAL scan finds written, until the
        scan ends."""
        touched = self.taken.touched
        if touched is None:
            return
        known = 0
        while True:
            found, ended = touched.wait(known)
            known += len(found)
            for oid in found:
                if oid in self.slices and oid not in self._early:
                    self._early[oid] = [fut for piece in self.slices[oid]
                                        for fut in (early.submit(self._dump, piece),
                                                    early.submit(self._checksum, (piece,)))]
            if ended:
                return

    def entries(self) -> list[TableEntry]:
        """One entry per table, in the snapshot's order; refuses a COPY whose row count is not
        the snapshot's."""
        entries = []
        for t in self.taken.tables:
            rows, digest = self.checksums.get(t.oid, (0, "0" * 16))
            if t.oid in self.reused:
                entries.append(replace(self.reused[t.oid], rows=rows, checksum=digest))
                continue
            stored = [self.objects[(t.oid, p.index)] for p in self.slices.get(t.oid, ())
                      if (t.oid, p.index) in self.objects]
            lines = sum(n for _, n in stored)
            if stored and lines != rows:
                raise BackupToolError(f"COPY of {t.schema}.{t.name} produced {lines} rows but the "
                                      f"table has {rows} in the snapshot", "report this as a bug")
            objects = tuple(obj for obj, _ in stored)
            entries.append(TableEntry(t.schema, t.name, t.relkind, t.parent, t.columns, rows, digest,
                                      objects[0] if len(objects) == 1 else None,
                                      objects if len(objects) > 1 else ()))
        return entries

    def _start(self, title: str, tables: list[TableInfo]) -> None:
        """The data phase's progress over ``tables``, crediting what was dumped of them already."""
        keys = [(p.table.oid, p.index) for p in self._of(tables)]
        with self._pending_lock:
            self._pending = {k for k in keys if k not in self._dumped}
            self._progress = self.job.reporter.task(title, total=sum(t.size for t in tables))
            done = sum(self._credited.get(k, 0) for k in keys)
            if done:
                self._progress.advance(done)

    def _checksum(self, pieces: tuple[parts.Slice, ...]) -> None:
        """Checksum one slice, or several whole small tables in one statement
        (:func:`parts.batched`)."""
        method = self.job.checksum_method
        with self.sessions.snapshot_session(len(pieces)) as conn:
            if len(pieces) == 1:
                table = pieces[0].table
                sums = [postgres.table_checksum(conn, table.schema, table.name, table.columns, method,
                                                pieces[0].blocks, self._types.get(table.oid))]
            else:
                sums = postgres.table_checksums(conn, [(p.table.schema, p.table.name, p.table.columns,
                                                        self._types.get(p.table.oid)) for p in pieces], method)
        for piece, found in zip(pieces, sums, strict=True):
            self._sums[(piece.table.oid, piece.index)] = found
        self._summed.advance(len(pieces))

    def _dump(self, piece: parts.Slice) -> None:
        job, table = self.job, piece.table
        key = (table.oid, piece.index)

        def advance(n: int) -> None:
            with self._pending_lock:
                step = min(n, piece.size - self._credited.get(key, 0))
                if step > 0:
                    self._credited[key] = self._credited.get(key, 0) + step
                    self._progress.advance(step)

        self.objects[key] = _dump_table(
            job.storage, job.conninfo, job.major, self.taken.snap.snapshot_id, table,
            f"{job.prefix}data/{piece.object_name}", job.level, job.threads, self.encoding, advance, self.sessions,
            piece.blocks)
        advance(piece.size)
        with self._pending_lock:
            self._dumped.add(key)
            self._pending.discard(key)
            if not self._pending:
                self._progress.finish()
        testhooks.pause_point("backup:between-objects")


def _search_path_of(parent: Manifest | None) -> str | None:
    """The search_path a backup's names are written under (its parent's, None where that
    recorded none)."""
    return parent.options.get("search_path") if parent is not None else postgres.NAME_SEARCH_PATH


def _assemble(job: _DumpJob, info: dict[str, Any], taken: _Snapshotted, side: _SideObjects, read: _Catalogs,
              entries: list[TableEntry], method: str, reason: str) -> Manifest:
    parent, only_tables = job.parent, job.only_tables
    return Manifest(
        id=job.backup_id, kind=job.kind, parent_id=parent.id if parent else None, database=info["database"],
        server_version=info["server_version"], server_version_num=info["server_version_num"],
        encoding=info["encoding"], system_identifier=info["system_identifier"],
        started_at=job.started_at, finished_at=datetime.now(timezone.utc), expires_at=job.expires_at,
        policy={"name": job.policy.name, "source": job.policy.source,
                "retention_days": job.policy.retention_for(job.kind).days},
        snapshot_lsn=taken.snap.wal_lsn, schema=side.schema, globals=side.globals,
        schema_fingerprint=side.fingerprint,
        tables=tuple(entries), sequences=tuple(read.sequences), inventory=read.inventory,
        large_objects=side.large_objects,
        extra_objects=(read.extension_rows,) if read.extension_rows is not None else (),
        options={"jobs": job.jobs, "compression_level": job.level, "host": info["host"],
                 "inventory_read_with": dict(catalog_inventory.READ_WITH),
                 "pinned": sorted(set(postgres.RECORDED_PINS) - job.conninfo.unpinned),
                 **({"search_path": path} if (path := _search_path_of(job.parent)) is not None else {}),
                 "only_tables": sorted(f"{s}.{n}" for s, n in only_tables) if only_tables else None,
                 **({"changed_tables_method": method, "changed_tables_note": reason} if parent else {}),
                 "dump_context": {**job.dump_context, **read.session},
                 **(_reuse_options(side.reuse) if side.reuse is not None else {})},
        tool_version=__version__, wal_basis=taken.basis, checksum_method=job.checksum_method,
        format=manifest_format(entries, [side.schema, side.globals, side.large_objects], job.checksum_method),
    )


def _reuse_options(reuse: SideReuse) -> ManifestOptions:
    """The manifest options saying which of the parent's side objects were reused, and why
    the others were dumped."""
    found = ManifestOptions()
    if reuse.schema_from is not None:
        found["schema_reused_from"] = reuse.schema_from
    else:
        found["schema_dumped_because"] = reuse.schema_note
    if reuse.globals_from is not None:
        found["globals_reused_from"] = reuse.globals_from
    else:
        found["globals_dumped_because"] = reuse.globals_note
    return found


def manifest_format(entries: list[TableEntry], side_objects: list[StoredObject | None],
                    method: ChecksumMethod) -> int:
    """The lowest manifest format whose readers read this logical backup whole. Pure.

    An object whose raw size exceeds :data:`pipeline.FRAME` is stored in several zstd frames
    (or, written by an older version, in one): versions before
    :data:`FRAMED_BASE_FORMAT` decompress only an object's first frame, so they must refuse
    the manifest rather than restore part of a table. A split table needs
    :data:`SPLIT_TABLE_FORMAT`; the checksum method, the lowest format that knows it."""
    objects = [o for e in entries for o in (e.object, *e.parts) if o is not None]
    objects += [o for o in side_objects if o is not None]
    return max([1, CHECKSUM_METHOD_FORMATS[method]]
               + ([SPLIT_TABLE_FORMAT] if any(e.parts for e in entries) else [])
               + ([FRAMED_BASE_FORMAT] if any(o.raw_size > pipeline.FRAME for o in objects) else []))


def _wal_verdicts(wal_scan: Background[Any] | str, parent: Manifest, basis: WalBasis | None,
                  reporter: Reporter) -> tuple[dict[int, TableVerdict], str, str]:
    """(verdicts, method, reason for the checksum method or ''): the WAL scan's answer, or
    every table to be compared by checksum. Damaged finished WAL is also a warning: the
    incremental is still exact, but point-in-time recovery through that WAL would stop there."""
    if isinstance(wal_scan, str):
        return {}, "checksum", wal_scan
    try:
        found: WalChanges = wal_scan.result()
    except WalDamagedError as exc:
        reporter.warning(f"damaged WAL: {exc}; point-in-time recovery through it would stop there — "
                         "take a new base backup ('backup-tool backup base'): recovery to later times "
                         "does not read it")
        return {}, "checksum", f"the WAL could not be read for certain: {exc}"
    except Exception as exc:  # noqa: BLE001 - any doubt about the WAL means comparing checksums
        return {}, "checksum", f"the WAL could not be read for certain: {exc}"
    assert parent.wal_basis is not None and basis is not None
    return classify(parent.wal_basis, basis, found.touched), "wal", wal_note(found)


def wal_note(found: WalChanges) -> str:
    """Where the WAL method read its segments (the manifest's ``changed_tables_note``). Pure."""
    archived = found.segments - found.from_server
    return (f"read {found.segments} WAL segment(s): {archived} from the archive, "
            f"{found.from_server} from the server's pg_wal")
