"""Logical backups: a consistent, streamed, per-table copy of one database.

A full backup exports one snapshot and lets every worker import it, so the schema archive
(pg_dump --snapshot), every table's COPY stream and every checksum describe the same
instant. Each ordinary table (and each leaf partition) becomes one zstd object streamed
from ``psql``'s COPY output straight into the repository: no local copy of the data is
made, and a table can later be restored alone. Content checksums are computed in the same
snapshot by parallel sessions. Objects go under ``backups/<id>/``; the manifest is written
last, after every object is durable, so an interrupted backup is never listed.

Only one backup of a database into a repository runs at a time: a PostgreSQL advisory
lock on the source database (visible to every machine that backs it up) guards the run.
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import psycopg

from backup_tool import __version__, pipeline, postgres, schema
from backup_tool.catalog import Catalog, data_prefix, new_backup_id
from backup_tool.config import Settings
from backup_tool.errors import BackupToolError, LockHeldError
from backup_tool.manifest import Manifest, StoredObject, TableEntry
from backup_tool.postgres import ConnInfo, Snapshot, TableInfo
from backup_tool.report import NullReporter, Reporter
from backup_tool.storage import Storage, open_storage


def compression_threads(jobs: int) -> int:
    cores = os.cpu_count() or 1
    return 0 if jobs >= cores else cores // jobs


def lock_name(repo_url: str, database: str) -> str:
    return f"backup-tool:backup:{repo_url}:{database}"


@dataclass
class _Workers:
    """Per-thread sessions importing the backup's snapshot, for checksum queries."""

    conninfo: ConnInfo
    snapshot_id: str
    stack: ExitStack

    def __post_init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()

    def conn(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                conn = self.stack.enter_context(
                    postgres.snapshot_session(self.conninfo, self.snapshot_id))
            self._local.conn = conn
        return conn


def _store_compressed(storage: Storage, key: str, chunks: Any, level: int, threads: int,
                      on_raw: Callable[[int], None] | None = None) -> tuple[StoredObject, pipeline.StreamStats]:
    stats = pipeline.StreamStats()
    result = storage.put(key, pipeline.compress(chunks, level, threads, stats, on_raw))
    return StoredObject(key, result.size, result.sha256, stats.raw_size), stats


def _dump_table(storage: Storage, conninfo: ConnInfo, major: int, snapshot_id: str,
                table: TableInfo, key: str, level: int, threads: int, encoding: str,
                advance: Callable[[int], None]) -> tuple[StoredObject, int]:
    argv = postgres.copy_out_command(conninfo, major, snapshot_id, table)
    env = conninfo.tool_env(settings={})
    env["PGCLIENTENCODING"] = encoding
    proc = pipeline.Process(argv, env, f"COPY of {table.schema}.{table.name}")
    try:
        obj, stats = _store_compressed(storage, key, proc.chunks(), level, threads, advance)
        proc.finish()
    except BaseException:
        proc.kill()
        raise
    return obj, stats.lines


def backup_full(settings: Settings, reporter: Reporter | None = None,
                jobs: int | None = None) -> Manifest:
    """Take a full logical backup of the settings' database; return its committed manifest."""
    reporter = reporter or NullReporter()
    storage = open_storage(settings.repo_url)
    catalog = Catalog(storage)
    conninfo = ConnInfo(settings.dsn)
    policy = settings.policy
    jobs = jobs or policy.backup.jobs
    level = policy.backup.compression_level
    threads = compression_threads(jobs)

    with ExitStack() as stack:
        control = conninfo.connect()
        stack.callback(control.close)
        info = postgres.server_info(control)
        major = info["server_version_num"] // 10000
        catalog.ids()
        if not postgres.try_advisory_lock(control, lock_name(storage.url, info["database"])):
            raise LockHeldError(f"another backup of {info['database']} into {storage.url} is running",
                                "wait for it to finish (or let cron retry later)")
        started_at = datetime.now(timezone.utc)
        backup_id = new_backup_id("full", started_at)
        prefix = data_prefix(backup_id)
        reporter.event("backup started", id=backup_id, kind="full", database=info["database"],
                       repository=storage.url)

        snap = Snapshot(conninfo)
        stack.callback(snap.close)
        tables = postgres.list_tables(snap.conn)
        snap.lock_tables(tables)
        sequences = postgres.sequences(snap.conn)
        inventory = postgres.inventory(snap.conn)

        archive = schema.dump_schema(conninfo, major, snap.snapshot_id)
        normalized = schema.normalize(schema.schema_text(archive, major))
        schema_obj, _ = _store_compressed(storage, prefix + "schema.pgdump.zst", [archive], level, 0)
        globals_obj, _ = _store_compressed(storage, prefix + "globals.sql.zst",
                                           [schema.dump_globals(conninfo, major)], level, 0)

        data_tables = [t for t in tables if t.has_data]
        progress = reporter.task("dumping tables", total=sum(t.size for t in data_tables))
        workers = _Workers(conninfo, snap.snapshot_id, stack)
        objects: dict[int, tuple[StoredObject, int]] = {}
        checksums: dict[int, tuple[int, str]] = {}

        def dump(table: TableInfo) -> None:
            objects[table.oid] = _dump_table(storage, conninfo, major, snap.snapshot_id, table,
                                             f"{prefix}data/{table.oid}.copy.zst", level, threads,
                                             info["encoding"], progress.advance)

        def checksum(table: TableInfo) -> None:
            checksums[table.oid] = postgres.table_checksum(workers.conn(), table.schema, table.name)

        pipeline.run_parallel(jobs, [(dump, t) for t in data_tables] + [(checksum, t) for t in data_tables])
        progress.finish()

        entries = []
        for t in tables:
            obj, lines = objects.get(t.oid, (None, 0))
            rows, digest = checksums.get(t.oid, (0, "0" * 16))
            if obj is not None and lines != rows:
                raise BackupToolError(f"COPY of {t.schema}.{t.name} produced {lines} rows but the "
                                      f"table has {rows} in the snapshot", "report this as a bug")
            entries.append(TableEntry(t.schema, t.name, t.relkind, t.parent, t.columns, rows,
                                      digest, obj))
        finished_at = datetime.now(timezone.utc)
        manifest = Manifest(
            id=backup_id, kind="full", parent_id=None, database=info["database"],
            server_version=info["server_version"], server_version_num=info["server_version_num"],
            encoding=info["encoding"], system_identifier=info["system_identifier"],
            started_at=started_at, finished_at=finished_at,
            expires_at=policy.expires_at("full", started_at),
            policy={"name": policy.name, "source": policy.source,
                    "retention_days": policy.retention.full_days},
            snapshot_lsn=snap.wal_lsn, schema=schema_obj, globals=globals_obj,
            schema_fingerprint=schema.fingerprint(normalized),
            tables=tuple(entries), sequences=tuple(sequences), inventory=inventory,
            options={"jobs": jobs, "compression_level": level}, tool_version=__version__,
        )
        catalog.commit(manifest)
        reporter.event("backup finished", id=backup_id, size_bytes=manifest.size_bytes,
                       seconds=round((finished_at - started_at).total_seconds(), 2))
        return manifest
