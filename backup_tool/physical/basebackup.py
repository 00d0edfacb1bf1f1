"""Physical base backups (``backup base``): the starting point of point-in-time recovery.

``pg_basebackup -D - -Ft -X none`` streams the whole cluster as one tar on stdout, or, when
the tool runs on the database host and can read the data directory, the tool writes the
same tar itself, reading files in parallel (:mod:`backup_tool.physical.basedirect`,
``--method auto|direct|pg_basebackup``, recorded as the manifest's ``options.method``); the tar
flows through zstd into the repository (``backups/<id>/base.tar.zst``) without a local
copy, in independent frames cut at member boundaries, with an index of frames, members and
each database's relation files beside it (``base.index.json.zst``, see
:mod:`backup_tool.physical.basetar`) so that table PITR can read just what it needs. ``-X none``: the WAL that makes the copy consistent is *not* in the tar but in the
WAL archive. Before committing the manifest the tool waits until every segment from the
backup's start to its stop is in *this* repository (failing at once if the server's
archiver went past one that is not there: it pushes elsewhere), so a listed base backup is
always restorable from the repository alone. The direct method ends backup mode without
waiting for the archiver, so that wait overlaps the tar's upload.

While the tar streams past, its ``backup_label`` and ``backup_manifest`` members are read
(never written to disk): the manifest records start and stop LSN, timeline, the label,
the checkpoint mode used (fast, as pgBackRest's ``start-fast``, or PostgreSQL's spread
default, per policy ``backup.fast_checkpoint``) and the server's clock at the end, which is
the earliest moment a recovery from this backup can target.

pg_basebackup needs a replication connection: a role with the REPLICATION attribute (or
a superuser) and a ``replication`` line in pg_hba.conf; both are checked or translated
into an error that says what to grant.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any, Generator, Iterable

import psycopg

from backup_tool import __version__
from backup_tool.config.settings import Settings
from backup_tool.core import walnames
from backup_tool.core.kinds import BackupKind
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.errors import (
    BackupToolError,
    DatabaseError,
    LockHeldError,
    PageChecksumError,
    RefusedError,
)
from backup_tool.physical import basedirect, basetar, partial, wal
from backup_tool.physical.basedirect import BaseMethod
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import ConnInfo, scalar
from backup_tool.repository import walarchive
from backup_tool.repository.catalog import Catalog, data_prefix, manifest_key, new_backup_id
from backup_tool.repository.keyguard import guard_writes
from backup_tool.repository.manifest import FRAMED_BASE_FORMAT, Manifest, PhysicalInfo, StoredObject, utc_iso
from backup_tool.repository.storage import Storage, open_storage
from backup_tool.repository.storage.base import ObjectLock
from backup_tool.repository.walidentity import ClusterIdentity, verify_archive_identity
from backup_tool.streams import pipeline, testhooks

TAR_KEY = "base.tar.zst"
CAPTURED = ("backup_label", "backup_manifest", "tablespace_map")


@dataclass(frozen=True)
class BackupLabel:
    start_lsn: str
    start_wal: str
    checkpoint_lsn: str
    start_time: str
    label: str
    timeline: int
    method: str
    raw: str = field(repr=False, default="")


LABEL_LINE = re.compile(r"^(?P<key>[A-Z ]+): (?P<value>.*)$")


def parse_backup_label(text: str) -> BackupLabel:
    values = {}
    for line in text.splitlines():
        m = LABEL_LINE.match(line)
        if m:
            values[m["key"]] = m["value"]
    start = values.get("START WAL LOCATION", "")
    m = re.match(r"^(\S+) \(file ([0-9A-F]{24})\)", start)
    if not m:
        raise BackupToolError("pg_basebackup produced a backup_label without a START WAL LOCATION",
                              "report this as a bug")
    return BackupLabel(m.group(1), m.group(2), values.get("CHECKPOINT LOCATION", ""),
                       values.get("START TIME", ""), values.get("LABEL", ""),
                       int(values.get("START TIMELINE", "1")), values.get("BACKUP METHOD", ""), text)


def stop_lsn_from_manifest(raw: bytes) -> tuple[str, int] | None:
    """(end LSN, timeline) of the last WAL range in a backup_manifest, if present."""
    try:
        ranges = json.loads(raw).get("WAL-Ranges") or []
    except ValueError:
        return None
    if not ranges:
        return None
    last = ranges[-1]
    return last["End-LSN"], int(last["Timeline"])


def explain_basebackup_error(text: str, user: str) -> DatabaseError:
    if "no pg_hba.conf entry for replication connection" in text or (
            "pg_hba.conf rejects replication connection" in text):
        return DatabaseError(
            f"the server refuses replication connections for role {user}: {text}",
            f"add a pg_hba.conf line such as 'host replication {user} <this host>/32 scram-sha-256' "
            "and reload the server (SELECT pg_reload_conf())")
    if "must be superuser or replication role" in text or "permission denied to start WAL sender" in text:
        return DatabaseError(f"role {user} may not take base backups: {text}",
                             f"ALTER ROLE {user} REPLICATION (and allow it in pg_hba.conf)")
    if "max_wal_senders" in text or "too many" in text.lower() and "wal sender" in text.lower():
        return DatabaseError(f"no WAL sender slot is free: {text}",
                             "raise max_wal_senders on the server (restart needed) or retry later")
    if "checksum verification failure during base backup" in text:
        return PageChecksumError(f"pg_basebackup failed: {text}",
                                 "the cluster's data files are damaged (its warnings above name the files and "
                                 "blocks): check the storage, then repair or restore the affected relations first")
    if "can only write single tablespace to stdout" in text:
        return DatabaseError("the cluster has extra tablespaces, which backup base does not support yet",
                             "move the objects to pg_default or use pg_basebackup directly")
    return DatabaseError(f"pg_basebackup failed: {text}")


USER_DATABASES = "datname NOT IN ('template0', 'template1')"
"""The databases a base backup names as held (what ``restore pitr --database`` and table PITR
look for): every database but the two system templates, a user's own template databases
included; those that take no connections are held but not mapped for partial lay-outs."""


def _server_facts(conn: Any) -> dict[str, Any]:
    row = conn.execute(
        "SELECT current_user, (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),"
        " current_setting('archive_mode'), current_setting('archive_command'),"
        " pg_size_bytes(current_setting('wal_segment_size')),"
        " (SELECT rolname FROM pg_roles WHERE oid = 10),"
        f" ARRAY(SELECT datname FROM pg_database WHERE {USER_DATABASES} ORDER BY 1),"
        f" ARRAY(SELECT datname FROM pg_database WHERE {USER_DATABASES} AND datallowconn ORDER BY 1),"
        " current_setting('data_checksums') = 'on',"
        " (SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),"
        " (SELECT sum(pg_database_size(oid)) FROM pg_database)::bigint").fetchone()
    assert row is not None
    keys = ("user", "can_replicate", "archive_mode", "archive_command", "wal_segment_size", "superuser",
            "databases", "connectable", "data_checksums", "tablespaces", "size")
    return dict(zip(keys, row, strict=True))


def _check_prerequisites(facts: dict[str, Any], where: str, method: BaseMethod) -> None:
    user = facts["user"]
    if method is BaseMethod.PG_BASEBACKUP and not facts["can_replicate"]:
        raise RefusedError(
            f"role {user} at {where} lacks the REPLICATION attribute needed by pg_basebackup",
            f"as a superuser: ALTER ROLE {user} REPLICATION; and allow it in pg_hba.conf with "
            f"'host replication {user} <this host>/32 scram-sha-256', then SELECT pg_reload_conf()")
    if facts["archive_mode"] not in ("on", "always"):
        raise RefusedError(
            f"WAL archiving is off at {where} (archive_mode = {facts['archive_mode']}): a base backup "
            "cannot be restored without the WAL archive",
            "set archive_mode = on and archive_command = 'backup-tool wal push %p' (restart needed)")
    if facts["tablespaces"]:
        raise RefusedError(f"the cluster at {where} has {facts['tablespaces']} extra tablespace(s), "
                           "which backup base does not support yet",
                           "move their objects to pg_default or use pg_basebackup directly")


def _wal_complete(storage: Storage, timeline: int, start: int, stop: int, seg_size: int) -> list[str]:
    """Names of segments between start and stop (inclusive) missing from the archive."""
    present = {s.name for s in walarchive.list_segments(storage) if s.timeline == timeline}
    wanted = [wal.segment_name(timeline, n, seg_size)
              for n in range(wal.lsn_segment(start, seg_size), wal.lsn_segment(stop - 1, seg_size) + 1)]
    return [n for n in wanted if n not in present]


class WalWait(StrEnum):
    """Where a base backup's WAL range stands (:func:`wal_wait_verdict`)."""

    COMPLETE = "complete"
    ELSEWHERE = "elsewhere"
    WAITING = "waiting"


def wal_wait_verdict(missing: list[str], last_archived: str | None) -> WalWait:
    """Whether a base backup's WAL range is all in the repository, can no longer arrive there
    (the server's archiver already went past the last missing segment: its archive_command
    put it somewhere else), or is still on its way. ``missing``: segment names in order;
    ``last_archived``: ``pg_stat_archiver.last_archived_wal`` read *before* the repository
    was looked at (the archiver works through segments in name order and a segment counts
    as archived only once its archive_command has returned)."""
    if not missing:
        return WalWait.COMPLETE
    if last_archived and walnames.segment_prefix(last_archived) and last_archived >= missing[-1]:
        return WalWait.ELSEWHERE
    return WalWait.WAITING


WAL_POLL_FIRST, WAL_POLL_MAX, WAL_WARN_EVERY = 0.05, 2.0, 60.0


def _await_wal(control: psycopg.Connection[Any], storage: Storage, physical: PhysicalInfo,
               reporter: Reporter, wait: bool) -> list[str]:
    """The segments of the backup's WAL range missing from the repository (empty: all there).
    With ``wait`` (the direct method, which ends backup mode on a primary without waiting for
    its archiver, as pgBackRest does, so the stop segment is pushed while the tar's upload
    completes), as ``pg_backup_stop(true)`` would, it waits as long as the archiver has not
    reached the range, warning every minute; pg_basebackup has waited already (on a standby,
    whose own archiver never advances, waiting could never end)."""
    seg_size = physical.wal_segment_size
    begun = time.monotonic()
    pause, warned = WAL_POLL_FIRST, 0
    missing: list[str] | None = None
    while True:
        control.execute("SELECT pg_stat_clear_snapshot()")
        last = scalar(control, "SELECT last_archived_wal FROM pg_stat_archiver")
        if missing is None:
            missing = _wal_complete(storage, physical.timeline, walnames.parse_lsn(physical.start_lsn),
                                    walnames.parse_lsn(physical.stop_lsn), seg_size)
        else:
            missing = [n for n in missing if not walarchive.find_archived(storage, n)]
        verdict = wal_wait_verdict(missing, last)
        if verdict is not WalWait.WAITING or not wait:
            return missing
        waited = time.monotonic() - begun
        if waited >= (warned + 1) * WAL_WARN_EVERY:
            warned += 1
            reporter.warning(f"still waiting for the server to archive {missing[0]} ({int(waited)} s); "
                             "check that archive_command succeeds (pg_stat_archiver, the server log)")
        time.sleep(pause)
        pause = min(pause * 1.5, WAL_POLL_MAX)


def backup_base(settings: Settings, reporter: Reporter | None = None,
                fast_checkpoint: bool | None = None, method: BaseMethod = BaseMethod.AUTO,
                data_directory: Path | None = None) -> Manifest:
    """Take a physical base backup of the cluster behind ``settings.dsn``; return its manifest.

    ``method`` (see :mod:`backup_tool.physical.basedirect`): ``auto`` reads the data directory
    directly when it is provably the cluster's (``data_directory``, or the server's own
    setting, seen from here), else runs pg_basebackup; the manifest's ``options.method``
    says which was used."""
    reporter = reporter or NullReporter()
    storage = open_storage(settings.repo_url)
    catalog = Catalog(storage)
    conninfo = ConnInfo(settings.dsn)
    policy = settings.policy
    guard_writes(storage, policy.backup.encryption_key_id, policy.name, "take a base backup",
                 catalog.key_ids)
    fast = policy.backup.fast_checkpoint if fast_checkpoint is None else fast_checkpoint
    level = policy.backup.compression_level

    with conninfo.connect() as control:
        info = postgres.server_info(control)
        facts = _server_facts(control)
        major = info["server_version_num"] // 10000
        tools = postgres.tool_versions(major, ("pg_basebackup",))
        found = (basedirect.Probe(None, "requested") if method is BaseMethod.PG_BASEBACKUP
                 else basedirect.probe(control, data_directory))
        used, why = basedirect.choose_method(method, found)
        _check_prerequisites(facts, conninfo.redacted(), used)
        verify_archive_identity(storage, ClusterIdentity(int(info["system_identifier"]), major), "backup base")
        catalog.ids()
        lock_name = f"backup-tool:base:{storage.url}:{info['system_identifier']}"
        if not postgres.try_advisory_lock(control, lock_name):
            raise LockHeldError(f"another base backup of this cluster into {storage.url} is running",
                                "wait for it to finish (or let cron retry later)")
        started_at = datetime.now(timezone.utc)
        backup_id = new_backup_id(BackupKind.BASE, started_at)
        expires_at = policy.expires_at(BackupKind.BASE, started_at)
        if policy.object_lock.mode != "none":
            storage.lock_new_objects(ObjectLock(policy.object_lock.mode, expires_at))
        reporter.event("base backup started", id=backup_id, repository=storage.url,
                       checkpoint="fast" if fast else "spread", method=str(used), why=why)
        if not fast:
            reporter.event("waiting for a spread checkpoint (up to checkpoint_timeout x "
                           "checkpoint_completion_target; use --fast-checkpoint to hurry)")
        direct: basedirect.DirectBackup | None = None
        proc: pipeline.Process | None = None
        source: Iterable[bytes]
        if used is BaseMethod.DIRECT:
            assert found.data_directory is not None
            direct = basedirect.DirectBackup(conninfo, found.data_directory, major, int(info["system_identifier"]),
                                             f"backup-tool {backup_id}", fast, policy.backup.jobs, reporter.warning,
                                             verify_checksums=found.page_checksums)
            source = direct.stream()
        else:
            argv = [postgres.find_tool("pg_basebackup", major), "-d", conninfo.tool_conninfo(),
                    "-D", "-", "-Ft", "-X", "none", "-c", "fast" if fast else "spread",
                    "-l", f"backup-tool {backup_id}", "--no-password"]
            proc = pipeline.Process(argv, conninfo.tool_env(), "pg_basebackup")
            source = pipeline.read_ahead(proc.chunks())
        progress = reporter.task("streaming base backup", total=int(facts["size"] or 0) or None)
        stats = pipeline.StreamStats()
        key = data_prefix(backup_id) + TAR_KEY
        try:
            try:
                framer = basetar.FramedCompressor(level, stats, progress.advance, workers=policy.backup.jobs,
                                                  capture=CAPTURED)
                result = storage.put(key, testhooks.paused_stream("base:upload", framer.compress(source)))
                if proc is not None:
                    proc.finish()
            except DatabaseError as exc:
                if proc is None:
                    raise
                raise explain_basebackup_error(proc.error_text(), facts["user"]) from exc
            except BaseException:
                if proc is not None:
                    proc.kill()
                raise
            finally:
                if isinstance(source, Generator):
                    source.close()
            progress.finish()
            stop_time = scalar(control, "SELECT clock_timestamp()")
            index_obj = _store_index(storage, data_prefix(backup_id) + basetar.INDEX_KEY, framer.index(
                partial.relations_to_json(_relation_maps(conninfo, facts["connectable"], reporter))), level)
            physical = _physical(framer.walker.found, facts, fast, stop_time, str(used))
            missing = _await_wal(control, storage, physical, reporter, wait=used is BaseMethod.DIRECT)
            if missing:
                raise BackupToolError(
                    f"the WAL of this base backup ({missing[0]}{' ...' if len(missing) > 1 else ''}) "
                    f"is not in {storage.url}: the server's archive_command pushes elsewhere",
                    f"set archive_command = 'backup-tool wal push %p --repo {storage.url}'")
        except BaseException:
            _discard(storage, key, backup_id)
            raise
        finished_at = datetime.now(timezone.utc)
        manifest = Manifest(
            id=backup_id, kind=BackupKind.BASE, parent_id=None, database=info["database"],
            server_version=info["server_version"], server_version_num=info["server_version_num"],
            encoding=info["encoding"], system_identifier=info["system_identifier"],
            started_at=started_at, finished_at=finished_at, expires_at=expires_at,
            policy={"name": policy.name, "source": policy.source,
                    "retention_days": policy.retention.pitr_days},
            snapshot_lsn=physical.stop_lsn, schema=None, globals=None, schema_fingerprint="",
            tables=(), sequences=(), inventory={},
            options={"checkpoint": physical.checkpoint, "compression_level": level, "host": info["host"],
                     "tar_members": len(framer.walker.members), "method": str(used), "method_note": why,
                     **({"copy_changes": direct.changes.as_dict()} if direct is not None else {}),
                     **({"pages_verified": direct.pages_verified} if direct is not None and direct.verifier else {}),
                     **({"object_lock": {"mode": policy.object_lock.mode, "retain_until": utc_iso(expires_at)}}
                        if policy.object_lock.mode != "none" else {})},
            extra_objects=(StoredObject(key, result.size, result.sha256, stats.raw_size), index_obj),
            tool_version=__version__, physical=physical, client_tools=tools, format=FRAMED_BASE_FORMAT,
        )
        try:
            testhooks.pause_point("base:before-manifest")
            manifest = catalog.commit(manifest)
        except BaseException:
            _discard(storage, key, backup_id)
            raise
        reporter.event("base backup finished", id=backup_id, size_bytes=manifest.size_bytes,
                       start_lsn=physical.start_lsn, stop_lsn=physical.stop_lsn, timeline=physical.timeline,
                       method=str(used),
                       seconds=round((finished_at - started_at).total_seconds(), 2))
        return manifest


def _physical(found: dict[str, bytes], facts: dict[str, Any], fast: bool, stop_time: datetime,
              method: str) -> PhysicalInfo:
    if "backup_label" not in found:
        raise BackupToolError(f"the {method} tar has no backup_label", "report this as a bug")
    label = parse_backup_label(found["backup_label"].decode("utf-8", "replace"))
    seg_size = int(facts["wal_segment_size"])
    stop = stop_lsn_from_manifest(found.get("backup_manifest", b""))
    if stop is None:
        raise BackupToolError(f"the {method} tar has no backup_manifest with the stop LSN",
                              "do not disable backup manifests on the server")
    stop_lsn, stop_tli = stop
    return PhysicalInfo(
        start_lsn=label.start_lsn, stop_lsn=stop_lsn, timeline=label.timeline,
        start_wal=label.start_wal,
        stop_wal=wal.segment_name(stop_tli, wal.lsn_segment(walnames.parse_lsn(stop_lsn) - 1, seg_size), seg_size),
        stop_time=stop_time.astimezone(timezone.utc), wal_segment_size=seg_size,
        checkpoint="fast" if fast else "spread", backup_label=label.raw,
        superuser=facts["superuser"], databases=tuple(facts["databases"]),
        archive_command=facts["archive_command"], data_checksums=bool(facts["data_checksums"]))


def _relation_maps(conninfo: ConnInfo, databases: list[str],
                   reporter: Reporter) -> list[partial.DatabaseRelations]:
    """Each database's relations and their files, read right after the tar was taken (for
    the partial lay-out of table PITR; a database that cannot be read is simply not mapped,
    so its files are always laid out in full)."""
    found = []
    for name in databases:
        try:
            with conninfo.with_database(name).connect() as conn:
                found.append(partial.capture(conn))
        except (BackupToolError, psycopg.Error) as exc:
            reporter.warning(f"database {name} not mapped for partial table recovery: {exc}")
    return found


def _store_index(storage: Storage, key: str, index: basetar.TarIndex, level: int) -> StoredObject:
    stats = pipeline.StreamStats()
    result = storage.put(key, pipeline.compress([index.to_json()], level, 0, stats))
    return StoredObject(key, result.size, result.sha256, stats.raw_size)


def _discard(storage: Storage, key: str, backup_id: str) -> None:
    """Best-effort removal of the unfinished tar and index, unless its manifest made it after all."""
    try:
        if not storage.exists(manifest_key(backup_id)):
            storage.delete(key)
            storage.delete(key.rsplit("/", 1)[0] + "/" + basetar.INDEX_KEY)
    except Exception:  # noqa: BLE001 - cleanup on a failure path: the caller reports the failure itself
        pass
