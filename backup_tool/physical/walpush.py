"""``wal push``: archiving WAL files, one synchronously or ahead of PostgreSQL.

Keys and layout are :mod:`backup_tool.physical.wal`'s. This module holds the writing side so
the push-ahead process loads the repository client and zstandard but not the recovery,
validation or PostgreSQL client code.

Guarantees:

- :func:`push_file` returns only once the file's object is durable in the repository. The
  same name with the same content again succeeds without writing; the same name with
  different content is refused (:class:`WalConflictError`) and nothing is overwritten; a
  segment whose own header names a cluster other than the archive's is refused.
- Push-ahead (:func:`run_pusher`, pgBackRest's asynchronous archive-push is the model): one
  detached process per spool (:mod:`backup_tool.physical.walack` starts it and holds its
  lock for it) pushes the files PostgreSQL marked ready (``archive_status/*.ready``), oldest
  first, ``workers`` at a time and at most ``batch`` ahead of PostgreSQL's
  acknowledgements, and writes each one's marker only after its object is durable and only
  if the file stayed the very same file while it was read. A failure is reported in the
  spool for the waiting call (which then pushes the file itself) and retried once that
  call took the report. The process exits after ``linger`` seconds with nothing to do, or
  when the directory goes away; killed at any moment, it leaves no marker for a file that
  is not stored.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from backup_tool.config.settings import Settings
from backup_tool.errors import BackupToolError, NotFoundError, StorageError, UsageError
from backup_tool.physical import walack
from backup_tool.physical.walprepare import EarlyStart, Prepared, archive_order, prepare
from backup_tool.physical.walspool import PushResult, spool_dir
from backup_tool.repository import walidentity
from backup_tool.repository.keyguard import guard_writes
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.base import ObjectExistsError, ObjectLock, Storage
from backup_tool.repository.walarchive import find_archived, object_key, wal_file_kind
from backup_tool.streams import testhooks

DEFAULT_BATCH = 16
PUSH_WORKERS = 2
LINGER_SECONDS = 5.0
SCAN_SECONDS = 0.02
IDLE_SCAN_SECONDS = 0.1


class WalConflictError(BackupToolError):
    """A file of that name is already archived with different content."""


def _read_error(path: Path, exc: OSError) -> BackupToolError:
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"WAL file {path} does not exist",
                             "archive_command must be 'backup-tool wal push %p' (%p, not %f)")
    return StorageError(f"cannot read WAL file {path}: {exc.strerror}")


def _push(storage: Storage, path: Path, level: int, archive: walidentity.ClusterIdentity | None,
          prepared: Prepared | None = None) -> tuple[PushResult, str | None]:
    """Push ``path`` (or what :func:`prepare` made of it); the result and the file's
    identity (None if the file changed while it was read, so what was pushed may not be what
    the file holds now)."""
    name = path.name
    kind = wal_file_kind(name)
    try:
        if archive is not None and kind in ("segment", "partial"):
            own = walidentity.segment_identity(path)
            if own is not None and own.system_identifier != archive.system_identifier:
                raise walidentity.refusal(archive, own, storage.url, f"archiving {name}")
        if prepared is None:
            try:
                prepared = prepare(path, level)
            except OSError as exc:
                raise _read_error(path, exc) from None
        sha, size = prepared.sha256, prepared.raw_size
        existing = find_archived(storage, name)
        for obj in existing:
            if obj.sha256 == sha:
                return PushResult(name, obj.key, size, obj.size, sha, True), prepared.identity
        if existing:
            raise WalConflictError(
                f"{name} is already archived with different content ({existing[0].key}); nothing was overwritten",
                "two clusters may be archiving into the same repository: give each its own --repo")
        key = object_key(name, sha)
        try:
            result = storage.put(key, testhooks.paused_stream("wal:upload", prepared.chunks()))
        except ObjectExistsError:
            return PushResult(name, key, size, 0, sha, True), prepared.identity
        return PushResult(name, key, size, result.size, sha, False), prepared.identity
    finally:
        if prepared is not None:
            prepared.close()


def push_file(storage: Storage, path: Path, level: int = 3,
              archive: walidentity.ClusterIdentity | None = None) -> PushResult:
    """Archive one WAL file; idempotent for identical content, refuses different content,
    and refuses a segment whose own header names a cluster other than ``archive``'s.

    The file is read once, hashed and compressed (:func:`prepare`), and uploaded under the
    content's sha256 only if no object of that name exists yet.
    """
    return _push(storage, path, level, archive)[0]


def ready_names(pg_wal: Path) -> list[str]:
    """The files PostgreSQL marked ready for archiving, in the order it archives them
    (history files first, then by name)."""
    names = []
    for entry in os.scandir(pg_wal / "archive_status"):
        if entry.name.endswith(".ready"):
            name = entry.name[:-len(".ready")]
            try:
                wal_file_kind(name)
            except UsageError:
                continue
            names.append(name)
    names.sort(key=archive_order)
    return names


def sweep_spool(pg_wal: Path) -> None:
    """Drop markers of files that are gone and any read-ahead left by a recovery."""
    spool = pg_wal / walack.SPOOL_DIR
    if not spool.is_dir():
        return
    if (spool / "prefetch").is_dir():
        shutil.rmtree(spool / "prefetch", ignore_errors=True)
    for entry in os.scandir(spool):
        if entry.name.endswith(".pushed") and not (pg_wal / entry.name[:-len(".pushed")]).exists():
            Path(entry.path).unlink(missing_ok=True)


def archive_identity(storage: Storage, path: Path, repo_url: str) -> walidentity.ClusterIdentity | None:
    """The pushing cluster, verified against (or recorded as) the archive's owner; from the
    spool's cache when this repository was verified before. None: the cluster is unknown."""
    local = walidentity.wal_file_identity(path)
    if local is None:
        return None
    repo_id, spool = walack.repo_identity(repo_url), spool_dir(path)
    if not walidentity.cached(spool, repo_id, local):
        walidentity.claim_archive(storage, local, f"archiving {path.name}")
        walidentity.remember(spool, repo_id, local)
    return local


def push(storage: Storage, wal_path: str | Path, repo_url: str, level: int = 3,
         lock: ObjectLock | None = None) -> PushResult:
    """``archive_command`` done synchronously: archive ``wal_path``, return once it is durable."""
    path = Path(wal_path)
    if lock is not None:
        storage.lock_new_objects(lock)
    archive = archive_identity(storage, path, repo_url)
    sweep_spool(path.parent)
    result = push_file(storage, path, level, archive)
    testhooks.pause_point("wal:before-ack")
    return result


def wal_lock(mode: str, pitr_days: int, now: datetime | None = None) -> ObjectLock | None:
    """Object Lock for newly archived WAL: kept immutable as long as the PITR window needs it."""
    if mode == "none":
        return None
    return ObjectLock(mode, (now or datetime.now(timezone.utc)) + timedelta(days=pitr_days))


@dataclass(frozen=True)
class PushTarget:
    """Where and how WAL is pushed: the repository (writes guarded as for any command, new
    objects under the policy's Object Lock) and the compression level."""

    storage: Storage
    repo_url: str
    level: int


def open_push_target(settings: Settings) -> PushTarget:
    policy = settings.policy
    storage = open_storage(settings.repo_url)
    guard_writes(storage, policy.backup.encryption_key_id, policy.name, "archive WAL")
    lock = wal_lock(policy.object_lock.mode, policy.retention.pitr_days)
    if lock is not None:
        storage.lock_new_objects(lock)
    return PushTarget(storage, settings.repo_url, policy.backup.compression_level)


def result_from_marker(name: str, marker: dict[str, str], ahead: tuple[str, ...] = ()) -> PushResult:
    return PushResult(name, marker["key"], int(marker["raw_size"]), int(marker["stored_size"]),
                      marker["sha256"], marker["already_archived"] == "1", ahead, from_spool=True)


def pushed_ahead(pg_wal: Path, repo_url: str, besides: str) -> tuple[str, ...]:
    """Ready files other than ``besides`` already durable ahead of PostgreSQL's calls."""
    try:
        names = ready_names(pg_wal)
    except OSError:
        return ()
    return tuple(n for n in names if n != besides and walack.acknowledged(str(pg_wal / n), repo_url))


def _report(spool: Path, entry: str, message: str) -> None:
    tmp = spool / f".{entry}.tmp{os.getpid()}"
    tmp.write_text(message + "\n")
    os.replace(tmp, spool / entry)


class _Pusher:
    def __init__(self, pg_wal: Path, target: PushTarget, batch: int, workers: int,
                 early: EarlyStart | None) -> None:
        self.pg_wal = pg_wal
        self.early = early
        self.spool = pg_wal / walack.SPOOL_DIR
        self.target = target
        self.batch = max(1, batch)
        self.workers = max(1, workers)
        self._identity_lock = threading.Lock()

    def push_one(self, name: str) -> None:
        path = self.pg_wal / name
        with self._identity_lock:
            archive = archive_identity(self.target.storage, path, self.target.repo_url)
        prepared = self.early.take(name, self.target.level) if self.early is not None else None
        result, identity = _push(self.target.storage, path, self.target.level, archive, prepared)
        if identity is None:
            raise StorageError(f"WAL file {path} changed while it was being archived")
        testhooks.pause_point("wal:before-ack")
        walack.write_marker(str(path), walack.marker_line(
            self.target.repo_url, result.key, result.sha256, result.raw_size, result.stored_size,
            result.already_archived, identity))

    def scan(self, in_flight: dict[str, cf.Future[None]]) -> list[str]:
        """Drop markers PostgreSQL no longer needs; the ready files to push now, in order
        (only the first ``batch`` not yet acknowledged are looked at)."""
        markers = [e.name[:-len(".pushed")] for e in os.scandir(self.spool) if e.name.endswith(".pushed")]
        ready = ready_names(self.pg_wal)
        waiting = set(ready)
        for name in markers:
            if name not in waiting and name not in in_flight:
                (self.spool / f"{name}.pushed").unlink(missing_ok=True)
        todo: list[str] = []
        ahead = len(in_flight)
        for name in ready:
            if len(in_flight) + len(todo) >= self.workers or ahead >= self.batch:
                break
            if name in in_flight:
                continue
            ahead += 1
            if walack.acknowledged(str(self.pg_wal / name), self.target.repo_url) is None \
                    and not (self.spool / f"{name}.error").exists():
                todo.append(name)
        return todo

    def run(self, linger: float) -> None:
        in_flight: dict[str, cf.Future[None]] = {}
        idle_since = time.monotonic()
        with cf.ThreadPoolExecutor(self.workers, thread_name_prefix="wal-push-ahead") as pool:
            while True:
                try:
                    todo = self.scan(in_flight)
                except OSError:
                    if not in_flight:
                        return
                    todo = []
                for name in todo:
                    in_flight[name] = pool.submit(self.push_one, name)
                if not in_flight:
                    if time.monotonic() - idle_since > linger:
                        return
                    time.sleep(IDLE_SCAN_SECONDS)
                    continue
                full = len(in_flight) >= self.workers  # nothing to start before one finishes
                cf.wait(list(in_flight.values()), timeout=IDLE_SCAN_SECONDS if full else SCAN_SECONDS,
                        return_when=cf.FIRST_COMPLETED)
                for name, fut in list(in_flight.items()):
                    if not fut.done():
                        continue
                    del in_flight[name]
                    exc = fut.exception()
                    if exc is not None:
                        try:
                            _report(self.spool, f"{name}.error", str(exc))
                        except OSError:
                            pass
                idle_since = time.monotonic()


def run_pusher(pg_wal: Path, target: Callable[[], PushTarget], batch: int = DEFAULT_BATCH,
               workers: int = PUSH_WORKERS, linger: float = LINGER_SECONDS,
               early: EarlyStart | None = None) -> None:
    """The push-ahead process's body (see the module docstring); ``target`` is opened here,
    and a failure to open it is reported for the waiting calls. ``early`` holds files
    already prepared while the process was loading."""
    spool = pg_wal / walack.SPOOL_DIR
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
        opened = target()
        sweep_spool(pg_wal)
    except BaseException as exc:  # noqa: BLE001 - reported to the waiting call, which pushes itself
        _report(spool, walack.PUSHER_ERROR, str(exc))
        if early is not None:
            early.close()
        return
    try:
        _Pusher(pg_wal, opened, batch, workers, early).run(linger)
    finally:
        if early is not None:
            early.close()
