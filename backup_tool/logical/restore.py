"""Restores from the repository into PostgreSQL, each ending with validation.

A full restore goes into an empty database and never overwrites: it refuses a target that
holds any user object. Order: roles (optional), schema pre-data (types, functions, tables)
in one transaction, table data in parallel, sequence values, then post-data (indexes,
constraints, triggers, policies) built in parallel by pg_restore, then validation against
the manifest. Each table's data is loaded in its own transaction that commits only after
the object's sha256 has matched, so a damaged object never leaves half a table behind.
As ``pg_restore --jobs`` does, each table's own indexes and primary key, unique and
exclusion constraints are built by the session that loaded it, right after its rows (and
its content checksum, when validating), followed by its ANALYZE; foreign keys, triggers,
policies and whatever spans tables wait for all the data (see
:func:`backup_tool.postgres.schema.per_table_post_data`). A
table stored in parts (see :mod:`backup_tool.logical.parts`) is loaded part after part in
one transaction with COPY FREEZE, like any other (see :func:`_load_data` for why not from
several sessions); then its checksum is read by ranges of its blocks in parallel and its
own post-data and ANALYZE follow on its loading session, as for any table, while the other
tables still load.

With ``schema_from_migrations`` the schema comes from the team's migrations instead of the
backup's archive (see :mod:`backup_tool.schema.rebuild`): the migrations replace pre-data and
post-data, the data loads with triggers silenced, and validation reports any drift.

An interrupted restore never looks complete: the target carries the marker of
:mod:`backup_tool.postgres.restore_marker` from before the first object is created until the last
step is done; ``restart_unfinished`` starts such a target over.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import psycopg
from psycopg import sql

from backup_tool.config.settings import Settings
from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.core.report import NullReporter, Reporter, Unit
from backup_tool.errors import (
    BackupToolError,
    DatabaseError,
    LockHeldError,
    RefusedError,
    ValidationFailed,
)
from backup_tool.logical.loading import BackupOrigin, TableKey, checksums_by_ranges, load_table
from backup_tool.postgres import (
    column_order,
    database_level,
    extension_config,
    extensions,
    large_objects,
    matviews,
    restore_marker,
    roles,
    schema,
)
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.catalog import Catalog, DatabaseHint
from backup_tool.repository.manifest import Manifest, SequenceRecord, TableEntry
from backup_tool.repository.storage import Storage, open_repository
from backup_tool.schema import rebuild
from backup_tool.streams import pipeline, testhooks
from backup_tool.validation.validate import ValidationReport, validate


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target: str
    tables: int
    rows: int
    bytes_read: int
    seconds: float
    validation: ValidationReport | None
    schema_from_migrations: dict[str, Any] | None = None
    source: BackupOrigin | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backup_id": self.backup_id,
            **(self.source.to_dict() if self.source else {}),
            "target": self.target,
            "tables": self.tables,
            "rows": self.rows,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "ok": self.validation.ok if self.validation else None,
            "validation": self.validation.to_dict() if self.validation else None,
            **({"schema_from_migrations": self.schema_from_migrations} if self.schema_from_migrations else {}),
        }


def create_database(conninfo: ConnInfo, encoding: str, properties: dict[str, Any] | None = None,
                    admin: psycopg.Connection[Any] | None = None) -> bool:
    """Create the target database if missing, with the backed-up encoding and locale
    (``properties``: the manifest's ``database`` record); return True if it was created (then
    the caller owns it: see :func:`dropped_unless_kept`). ``admin``: an open session on the
    server's ``postgres`` database to do it on (left open), else one of its own."""
    name = conninfo.dbname
    if not name:
        raise RefusedError("--create needs a database name in --target-dsn")
    with nullcontext(admin) if admin is not None else conninfo.with_database("postgres").connect() as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        if properties and properties.get("tablespace"):
            schema.refuse_missing_tablespaces(conn, frozenset({str(properties["tablespace"])}))
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 {}").format(
                sql.Identifier(name), database_level.create_options(properties, encoding)))
        except psycopg.errors.InvalidParameterValue as exc:
            raise RefusedError(f"cannot create database {name} as the backup's was: {str(exc).splitlines()[0]}",
                               "install the locale on the target server, or create the database yourself "
                               "and restore without --create (validation will report the difference)") from None
    return True


class _Created:
    """The database this run created, until the restore is committed to it."""

    def __init__(self, admin: psycopg.Connection[Any] | None = None) -> None:
        self.kept = False
        self.admin = admin

    def keep(self) -> None:
        self.kept = True
        self.release()

    def release(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None


@contextmanager
def dropped_unless_kept(conninfo: ConnInfo, created: bool, reporter: Reporter,
                        admin: psycopg.Connection[Any] | None = None) -> Iterator[_Created]:
    """Drop the database this run created if the block fails before calling ``keep()``: a
    refused or failed ``--create`` restore leaves the server as it found it. A database that
    already existed is never dropped. The block's own error is the one raised; a drop that
    fails too is a warning naming the database. ``admin``: the session on ``postgres`` that
    created it, held (and closed here) until ``keep()``, so that the drop needs no new
    connection: on a server out of connection slots the first connection to the new
    database failed, and so did the one to drop it, leaving it behind."""
    guard = _Created(admin)
    try:
        yield guard
    except BaseException:
        if created and not guard.kept:
            assert conninfo.dbname
            try:
                with nullcontext(guard.admin) if guard.admin is not None \
                        else conninfo.with_database("postgres").connect() as conn:
                    database_level.drop_database(conn, conninfo.dbname)
            except (BackupToolError, psycopg.Error) as exc:
                reporter.warning(f"could not drop database {conninfo.dbname}, created by this restore: "
                                 f"{str(exc).splitlines()[0]}")
        raise
    finally:
        guard.release()


def set_sequences(conn: psycopg.Connection[Any], sequences: Iterable[SequenceRecord]) -> None:
    with conn.transaction():
        for seq in sequences:
            name = postgres.quoted_table(seq["schema"], seq["name"])
            conn.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)",
                         (name, seq["last_value"], seq["is_called"]))


def restore_full(settings: Settings, target_dsn: str | ConnInfo, backup_ref: str | None = "latest",
                 create: bool = False, with_roles: bool = False, jobs: int | None = None,
                 run_validation: bool | None = None, reporter: Reporter | None = None,
                 schema_from_migrations: str | Path | None = None,
                 restart_unfinished: bool = False, analyze: bool = True,
                 database: DatabaseHint | None = None) -> RestoreResult:
    """Restore a whole backup (full or incremental) into an empty database, then validate.

    ``schema_from_migrations``: build the schema by replaying this migrations folder instead
    of from the backup's schema archive (refused if it cannot hold the backup's data).
    ``restart_unfinished``: if the target holds an interrupted restore (see
    :mod:`backup_tool.postgres.restore_marker`), drop what it created and restore again.
    ``analyze``: gather planner statistics once everything is loaded (a restored database
    has none, and plans production queries badly until autovacuum gets to it).
    ``database``: which database ``latest`` means (see :func:`backup_tool.repository.catalog.choose_latest`).
    With ``create``, a database this call created is dropped again if the restore is refused
    or fails before the restore marker is in place.
    """
    reporter = reporter or NullReporter()
    started = time.monotonic()
    storage = open_repository(settings.repo_url)
    manifest = Catalog(storage).resolve_logical(backup_ref, database)
    target = (target_dsn if isinstance(target_dsn, ConnInfo) else ConnInfo(target_dsn)).as_written(manifest.options)
    run = _Run(storage, manifest, target, jobs or settings.policy.backup.jobs,
               run_validation if run_validation is not None else settings.policy.validation.after_restore,
               reporter)
    admin = target.with_database("postgres").connect() if create else None
    try:
        created = create and create_database(target, manifest.encoding, manifest.inventory.get("database"), admin)
    except BaseException:
        if admin is not None:
            admin.close()
        raise
    if created:
        reporter.event("database created", database=target.dbname)
    elif admin is not None:
        admin.close()
        admin = None
    reporter.event("restore started", id=manifest.id, database=manifest.database, target=target.redacted())

    with dropped_unless_kept(target, created, reporter, admin) as new_database, target.connect() as control:
        postgres.refuse_unchecked_bytes(control, manifest.encoding, manifest.id, target.redacted())
        fixed = [] if created else database_level.fixed_differences(manifest.inventory.get("database"),
                                                                    database_level.properties(control))
        if fixed:
            reporter.warning(f"the target database keeps its own {'; '.join(fixed)}: a database keeps what it "
                             "was created with, so validation will fail database_properties (and content_checksums "
                             "of text the encodings write differently); restore with --create for the backup's",
                             differences=fixed)
        major = postgres.tools_major(control, manifest.server_version_num // 10000)
        if schema_from_migrations is None:
            extensions.refuse_missing_extensions(control, manifest.inventory.get("extensions", []))
        database_level.refuse_unloadable_libraries(
            target, database_level.preloaded_libraries(manifest.inventory.get("database")), "database settings")
        archive = _schema_archive(run, control) if schema_from_migrations is None else None
        created_roles = _claim_target(control, run, major, with_roles, restart_unfinished)
        new_database.keep()
        with tempfile.TemporaryDirectory(prefix="backup-tool-") as tmp:
            archive_path = Path(tmp) / "schema.pgdump"
            rebuilt = None
            early = _EarlyPostData()
            if schema_from_migrations is None:
                assert archive is not None
                archive_path.write_bytes(archive)
                _create_schema(run, archive_path, major)
                early = _early_post_data(run, archive_path, major, analyze,
                                         analyze and postgres.can_force_stats_flush(control))
            else:
                rebuilt = rebuild.rebuild_schema(schema_from_migrations, target, storage, manifest, archive_path,
                                                 major, reporter, run.count)
            if manifest.inventory.get("extension_config"):
                rows = next((pipeline.read_object(storage, o, run.count) for o in manifest.extra_objects
                             if o.key.endswith("/" + extension_config.ROWS_OBJECT)), None)
                with (rebuilt.loader if rebuilt else target).connect() as loader:
                    written = extension_config.restore(loader, manifest.inventory["extension_config"], rows)
                if written:
                    reporter.event("extension configuration restored", relations=written)
            checksums = _load_data(run, rebuilt.loader if rebuilt else target, fresh=rebuilt is None, early=early)
            set_sequences(control, manifest.sequences)
            if manifest.large_objects is not None:
                lo = manifest.large_objects
                large_objects.restore(rebuilt.loader if rebuilt else target, major, storage, lo.key, lo.sha256,
                                      lo.size, Path(tmp), run.count)
                reporter.event("large objects restored", count=manifest.inventory["large_objects"]["count"])
            reporter.event("data loaded", tables=len(_stored(manifest)), bytes=run.bytes_read)
            if rebuilt is None:
                _build_post_data(run, archive_path, major, early.ids)
            else:
                rebuild.finish(target, run.validating, rebuilt)
        finish_database(target, manifest, run.jobs, analyze, created, reporter, analyzed=early.analyze)
        restore_marker.clear(control)

    report = None
    if run.validating:
        report = validate(target, manifest, storage if rebuilt is None or rebuilt.archive_usable else None,
                          jobs=run.jobs, reporter=reporter, checksums=checksums, created_roles=created_roles,
                          keys_created_after_data=rebuilt is None)
    result = RestoreResult(manifest.id, target.redacted(),
                           len([t for t in manifest.tables if t.relkind == "r"]),
                           sum(t.rows for t in manifest.tables), run.bytes_read,
                           time.monotonic() - started, report, rebuilt.to_dict() if rebuilt else None,
                           BackupOrigin.of(manifest))
    if report is not None and not report.ok:
        raise ValidationFailed(f"restore of {manifest.id} finished but validation failed: "
                               + "; ".join(f"{c.name}: {c.detail}" for c in report.failed)[:400],
                               report=result)
    reporter.event("restore finished", id=manifest.id, seconds=round(result.seconds, 2))
    return result


@dataclass
class _Run:
    """What every step of one full restore shares; ``bytes_read`` counts what came from the
    repository (the result's ``bytes_read``)."""

    storage: Storage
    manifest: Manifest
    target: ConnInfo
    jobs: int
    validating: bool
    reporter: Reporter
    bytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n


def _stored(manifest: Manifest) -> list[TableEntry]:
    return [t for t in manifest.tables if t.stored]


def _claim_target(control: psycopg.Connection[Any], run: _Run, major: int, with_roles: bool,
                  restart_unfinished: bool) -> frozenset[str]:
    """Make the target this run's: the restore lock, an empty database (or an unfinished restore
    started over), the roles the backup needs, then the restore marker. Returns the roles this
    run created (validation holds them to the backup's definitions)."""
    target = run.target
    if not postgres.try_advisory_lock(control, f"backup-tool:restore:{target.redacted()}"):
        raise LockHeldError(f"another restore into {target.redacted()} is running", "wait for it to finish")
    _start_over_if_unfinished(control, target, restart_unfinished, run.reporter)
    existing = postgres.user_objects(control)
    if existing:
        raise RefusedError(f"target database {target.redacted()} is not empty ({', '.join(existing[:3])}"
                           f"{' ...' if len(existing) > 3 else ''})",
                           "restore into a new database (--create with a new name) or drop the objects first")
    created_roles = roles.ensure_roles(control, target, run.storage, run.manifest, major, with_roles, run.reporter)
    restore_marker.mark(control, run.manifest.id)
    return created_roles


def _schema_archive(run: _Run, control: psycopg.Connection[Any]) -> bytes:
    """The backup's schema archive, once the target is known to have every tablespace its
    tables and indexes are created in and the role restoring may give every object back to
    its owner (refused before anything is created otherwise)."""
    assert run.manifest.schema is not None
    archive = pipeline.read_object(run.storage, run.manifest.schema, run.count)
    try:
        toc = schema.read_toc(archive)
    except schema.UnreadableToc:
        return archive
    needed = schema.tablespaces(toc)
    schema.refuse_missing_tablespaces(control, needed)
    schema.refuse_unsettable_owners(control, schema.owners(toc))
    return archive


def _create_schema(run: _Run, archive_path: Path, major: int) -> None:
    """Replay the pre-data (types, functions, tables) of the schema archive at ``archive_path``
    into the target, with the backed-up column order and extension versions."""
    manifest, reporter = run.manifest, run.reporter
    objects = schema.section_items(archive_path, major, "pre-data")
    phase = reporter.task("schema", total=objects, unit=Unit.ITEMS)
    replay = extensions.PreDataReplay(archive_path, run.target, major, manifest.inventory.get("extensions"))
    column_order.restore_pre_data(archive_path, run.target, major, manifest, reporter, replay)
    for fallback in replay.fallbacks:
        reporter.warning(f"extension {fallback}: installed the target server's default version")
    phase.advance(objects)
    phase.finish()
    reporter.event("schema created", id=manifest.id)


@dataclass(frozen=True)
class _EarlyPostData:
    """What the loading sessions build right after a table's rows: per table, the SQL of
    its own post-data entries (``statements``); the tables they then ANALYZE (``analyze``);
    the dump ids of those entries, left out of the final post-data replay (``ids``);
    whether they can have the server count the table's new rows before its ANALYZE
    (``flush_stats``, see :func:`_build_early`)."""

    statements: dict[TableKey, str] = field(default_factory=dict)
    analyze: frozenset[TableKey] = frozenset()
    ids: frozenset[int] = frozenset()
    flush_stats: bool = False


def _early_post_data(run: _Run, archive_path: Path, major: int, analyze: bool,
                     flush_stats: bool = False) -> _EarlyPostData:
    """Plan the per-table post-data of every loaded table (each, split or not, is loaded
    whole by one session); nothing early when the archive's table of contents or pg_restore's
    script of it cannot be read with certainty."""
    tables = {(t.schema, t.name) for t in _stored(run.manifest) if t.relkind == "r"}
    try:
        toc = schema.read_toc(archive_path.read_bytes())
    except schema.UnreadableToc:
        return _EarlyPostData()
    plan = schema.per_table_post_data(toc, tables)
    ids = [i for p in plan.values() for i in p.ids]
    statements = schema.post_data_statements(archive_path, toc, ids, major)
    if statements is None:
        return _EarlyPostData()
    return _EarlyPostData({key: "\n".join(statements[i] for i in p.ids) for key, p in plan.items() if p.ids},
                          frozenset(key for key, p in plan.items() if p.analyze_early and analyze),
                          frozenset(ids), flush_stats)


def _build_early(conn: psycopg.Connection[Any], entry: TableEntry, statements: str | None, analyze: bool,
                 flush_stats: bool = False, sessions: postgres.SessionPool | None = None) -> None:
    """Build ``entry``'s own post-data entries and gather its statistics, on the session that
    loaded it (the archive's SQL sets its own search path and settings).

    ``flush_stats``: the server is first made to count the rows the loading transaction
    committed (:data:`~backup_tool.postgres.connection.FORCE_STATS_FLUSH`, sent with the
    post-data SQL, so at no extra round trip). A session writes its counts to the shared
    statistics at most once a second, so a table loaded within a second of the session's
    last write had its rows counted only after its ANALYZE had reset the count of rows
    changed since: autovacuum then saw the whole table as changed and analyzed it again
    (16 tables of 75,000 rows: 1.6 s of server CPU, during or just after the restore).

    ``sessions``: the pool ``conn`` goes back to; the ANALYZE, last, then also resets the
    session's settings, sparing the pool's ``RESET ALL`` round trip (one per table)."""
    flush = f"{postgres.FORCE_STATS_FLUSH};\n" if analyze and flush_stats else ""
    try:
        if statements or flush:
            conn.execute((flush + (statements or "")).encode("utf-8", "surrogateescape"))
        if analyze:
            query = sql.SQL("ANALYZE {}").format(postgres.qualified(entry.schema, entry.name))
            if sessions is None:
                conn.execute(query)
            else:
                conn.execute(sql.SQL("{}; {}").format(query, sql.SQL(sessions.RESET_ALL)))
                sessions.was_reset(conn)
    except psycopg.Error as exc:
        raise DatabaseError(f"building the indexes and constraints of {entry.full_name} failed: "
                            f"{str(exc).splitlines()[0]}", _inlined_function_hint(exc)) from None


def _inlined_function_hint(exc: psycopg.Error) -> str | None:
    """A hint when an index expression failed inside a SQL function's body: pg_restore (and
    so any restore of a pg_dump) runs with an empty search_path, and a function whose body
    names objects unqualified (earthdistance's ll_to_earth on PostgreSQL 15) fails there."""
    context = (exc.diag.context or "") if isinstance(exc, psycopg.errors.Error) else ""
    found = re.search(r'SQL function "([^"]+)"', context)
    if found is None:
        return None
    return (f"the SQL function {found.group(1)} names objects without their schema, and restores run with an "
            "empty search_path (pg_restore of this backup fails the same way); drop that index in the source "
            "or use a function that qualifies its names (see README 'What is restored')")


FREEZE_MIN_BYTES = 1 << 20
"""Rows (COPY text) below which a table the restore created is loaded without COPY FREEZE:
the TRUNCATE that freezing needs scans the server's whole buffer pool twice (when it runs and
at commit), which costs a small table more than its few pages' later rewrite (3,000 tables
of 50 rows under 512 MB of shared_buffers: about a third of the restore)."""

PREFETCH_MAX_BYTES = 1 << 20
"""Stored objects up to this size are downloaded ahead of their loading session (see
:class:`backup_tool.streams.pipeline.Prefetch`), 16 at most at a time."""

LOAD_SETTINGS = {"synchronous_commit": "off"}
"""Settings of the loading sessions. Their commits need not wait for the WAL flush: WAL
reaches disk in order, so after a crash the restore marker (see
:mod:`backup_tool.postgres.restore_marker`) is gone only if every commit before its removal
survived too, and a target that lost any still reads as an unfinished restore."""

PARALLEL_WORKER_SETTINGS = ("max_parallel_workers_per_gather", "max_parallel_maintenance_workers")
"""What lets the server add parallel workers to a loading session's checksum query and index
builds (see :func:`parallel_workers_wanted`)."""


def parallel_workers_wanted(busy_sessions: int, jobs: int) -> bool:
    """Whether a loading session's next checksum query and index builds may take the server's
    parallel workers: not while all ``jobs`` sessions (two or more) are working, since their
    cores are then spoken for and parallel workers only add their start-up, tuple hand-over
    and sort merging (restoring pgbench at scale 15 plus 16 wide tables with ``--jobs 2`` on 2
    cores: 5-8 % less server CPU); yes once a session is idle (the big table's tail then keeps
    the other cores busy) or with one job (the other cores are free). The results are the
    same either way. Pure."""
    return jobs < 2 or busy_sessions < jobs


class _Busy:
    """How many loading sessions are working on a table now."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    @contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1


PARALLEL_MIN_BYTES = 1 << 20
"""Rows (COPY text) below which a loading session leaves its parallel workers as they are for
the table: the planner gives no parallel workers to a scan or index build of a table under
``min_parallel_table_scan_size`` (8 MB by default), so the ``SET``/``RESET`` before its
checksum and before its post-data were two round trips per table for nothing (3,000 small
tables: 6,000 of the restore's statements). Only where the workers go changes, never a result."""


def parallel_workers_matter(raw_size: int) -> bool:
    """Whether a table of ``raw_size`` bytes of COPY text is worth setting a loading session's
    parallel workers for (see :data:`PARALLEL_MIN_BYTES`). Pure."""
    return raw_size >= PARALLEL_MIN_BYTES


class _Workers:
    """One loading task's session's parallel workers, set only when they change: the task
    starts on a session with the server's own settings (new, or ``RESET ALL`` by the pool)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._allowed = True

    def allow(self, allowed: bool) -> None:
        if allowed != self._allowed:
            allow_parallel_workers(self._conn, allowed)
            self._allowed = allowed


def allow_parallel_workers(conn: psycopg.Connection[Any], allowed: bool) -> None:
    """The session's parallel workers: the server's own settings, or none."""
    conn.execute(sql.SQL("; ").join(
        sql.SQL("RESET {}").format(sql.Identifier(name)) if allowed else sql.SQL("SET {} = 0").format(sql.Identifier(name))
        for name in PARALLEL_WORKER_SETTINGS))


def _load_data(run: _Run, loader: ConnInfo, fresh: bool,
               early: _EarlyPostData = _EarlyPostData()) -> dict[tuple[str, str], tuple[int, str]]:
    """Load every stored table in parallel sessions, each in its own transaction with COPY
    FREEZE when it holds at least :data:`FREEZE_MIN_BYTES` (a split table's parts in order in one session: freezing needs the table to one
    transaction, and a table loaded unfrozen has every page rewritten later, by the first scan
    that sets hint bits and again by the VACUUM that freezes it; on 2 cores that cost more than
    loading the parts in parallel saved: 28.3 s against 24.5 s for a 3 GB table). When
    validating, each table's content checksum is taken as soon as its transaction committed:
    by the session that loaded it, or for a split table by block ranges on ``run.jobs``
    sessions at once (one large table would otherwise keep one core busy while the others wait)
    while the other tables still load; then the loading session builds the table's ``early``
    post-data and ANALYZE, without parallel workers while every session is busy (see
    :func:`parallel_workers_wanted`; a small table's are left alone, see
    :data:`PARALLEL_MIN_BYTES`). Returns the checksums for validation."""
    manifest = run.manifest
    data = _stored(manifest)
    checksums: dict[tuple[str, str], tuple[int, str]] = {}
    progress = run.reporter.task("data", total=sum(t.raw_size for t in data))
    busy = _Busy()
    sessions = postgres.SessionPool(loader, {"client_encoding": manifest.encoding, **LOAD_SETTINGS})
    summed = {(t.schema, t.name): t.columns for t in data if run.validating and t.relkind == "r" and not t.parts}
    types: dict[tuple[str, str], list[postgres.ColumnType]] = {}
    if summed and manifest.checksum_method is not ChecksumMethod.ROW_TEXT:
        with sessions.session() as conn:
            types = postgres.column_types_named(conn, summed)

    def load(t: TableEntry) -> None:
        key = (t.schema, t.name)
        with busy.working(), sessions.session() as conn:
            load_table(loader, run.storage, t, manifest.encoding, run.count, conn=conn,
                       fresh=fresh and t.raw_size >= FREEZE_MIN_BYTES, prefetch=prefetch,
                       on_raw=progress.advance)
            testhooks.pause_point("restore:loaded")
            workers = _Workers(conn)
            sized = parallel_workers_matter(t.raw_size)
            if run.validating and t.relkind == "r":
                if t.parts:
                    checksums[key] = checksums_by_ranges(loader, {key: t.columns}, run.jobs,
                                                         manifest.checksum_method)[key]
                else:
                    if sized:
                        workers.allow(parallel_workers_wanted(busy.count, run.jobs))
                    checksums[key] = postgres.table_checksum(conn, t.schema, t.name, t.columns,
                                                             manifest.checksum_method, types=types.get(key))
            if key in early.statements or key in early.analyze:
                if sized:
                    workers.allow(parallel_workers_wanted(busy.count, run.jobs))
                _build_early(conn, t, early.statements.get(key), key in early.analyze, early.flush_stats,
                             sessions)
        testhooks.pause_point("restore:loading")

    largest_first = sorted(data, key=lambda t: t.raw_size, reverse=True)
    prefetch = pipeline.Prefetch(run.storage, [t.stored[0] for t in largest_first
                                               if len(t.stored) == 1 and t.stored[0].size <= PREFETCH_MAX_BYTES])
    try:
        pipeline.run_parallel(run.jobs, [(load, t) for t in largest_first])
    finally:
        prefetch.close()
        sessions.close()
    progress.finish()
    return checksums


def _build_post_data(run: _Run, archive_path: Path, major: int, built_early: frozenset[int] = frozenset()) -> None:
    """Replay the archive's post-data (indexes, constraints, triggers, policies) with
    ``run.jobs`` pg_restore workers, but for the entries ``built_early`` by the loading sessions."""
    ids = schema.section_ids(archive_path, major, "post-data")
    built = run.reporter.task("indexes and constraints", total=len(ids), unit=Unit.ITEMS)
    built.advance(len(built_early))
    if any(int(i) not in built_early for i in ids):
        schema.restore_section(archive_path, run.target, major, "post-data", jobs=run.jobs,
                               on_item=lambda: built.advance(1), skip=built_early, lock_bounded=True)
    built.finish()
    run.reporter.event("indexes and constraints built", id=run.manifest.id)


def finish_database(target: ConnInfo, manifest: Manifest, jobs: int, analyze: bool, created: bool,
                    reporter: Reporter, analyzed: frozenset[TableKey] = frozenset()) -> None:
    """The steps after the data and post-data: refresh the materialized views that were
    populated, gather statistics (but for the tables ``analyzed`` already), then apply the
    database's own properties (last, so that a backed-up setting such as
    ``default_transaction_read_only`` cannot break the restore)."""
    populated = {(m["schema"], m["name"]) for m in manifest.inventory.get("matviews", []) if m["populated"]}
    refreshed = matviews.refresh(target, populated, jobs)
    if refreshed:
        reporter.event("materialized views refreshed", count=refreshed)
    if analyze:
        analyze_all(target, jobs, skip=analyzed)
        reporter.event("statistics gathered")
    wanted = manifest.inventory.get("database")
    if wanted is not None:
        try:
            with target.connect() as conn:
                unapplied = database_level.apply(conn, wanted, created)
        except psycopg.Error as exc:
            reporter.warning(f"database properties not restored: {str(exc).splitlines()[0]} "
                             "(restore as the database owner or a superuser)")
            unapplied = []
        for item in unapplied:
            reporter.warning(f"not restored: {item.describe()}", **({"role": item.role} if item.role else {}))


def analyze_all(target: ConnInfo, jobs: int, skip: frozenset[TableKey] = frozenset()) -> None:
    """ANALYZE every user table, partitioned table and materialized view but the ordinary
    tables ``skip``, in parallel, on ``jobs`` sessions reused from one relation to the next
    (a new backend per table cost ~5 server CPU-ms each with 3,000 partitions, 15 s in all,
    and 0.3 CPU-s of ours). Not partitions: ANALYZE of their partitioned root analyzes each
    of them too (on PostgreSQL 15 it cannot be told not to), so a partition analyzed on its
    own was analyzed twice. The sessions' commits do not wait for the WAL flush, as the
    loading sessions' (see :data:`LOAD_SETTINGS`)."""
    with target.connect() as conn:
        rels = conn.execute(f"""
            SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'm') AND {postgres.SYSTEM_SCHEMA_FILTER}
               AND (c.relkind <> 'm' OR c.relispopulated) AND NOT c.relispartition
             ORDER BY CASE WHEN c.relkind = 'p' THEN (SELECT sum(pg_table_size(t.relid))
                                                       FROM pg_partition_tree(c.oid) t)
                           ELSE pg_table_size(c.oid) END DESC NULLS LAST""").fetchall()
    rels = [(schema_name, name) for schema_name, name in rels if (schema_name, name) not in skip]
    sessions = postgres.SessionPool(target, LOAD_SETTINGS, reset=False)

    def one(rel: tuple[str, str]) -> None:
        try:
            with sessions.session() as conn:
                conn.execute(sql.SQL("ANALYZE {}").format(postgres.qualified(*rel)))
        except psycopg.Error as exc:
            raise DatabaseError(f"ANALYZE of {rel[0]}.{rel[1]} failed: {str(exc).splitlines()[0]}") from None

    try:
        pipeline.run_parallel(max(1, jobs), [(one, r) for r in rels])
    finally:
        sessions.close()


def _start_over_if_unfinished(control: psycopg.Connection[Any], target: ConnInfo, restart: bool,
                              reporter: Reporter) -> None:
    """Refuse a target holding an interrupted restore, or (``restart``) empty it first."""
    marker = restore_marker.read(control)
    if marker is None:
        return
    previous = restore_marker.backup_id_of(marker)
    if not restart:
        raise RefusedError(f"target database {target.redacted()} holds an unfinished restore of {previous} "
                           "(it was interrupted)",
                           f"rerun with {restore_marker.RESTART_FLAG} to drop what it created and restore again")
    dropped = restore_marker.discard_unfinished(control)
    reporter.event("unfinished restore discarded", previous=previous, dropped=len(dropped))
