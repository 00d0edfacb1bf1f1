"""``retention apply``: gather the repository's backups, WAL and stray objects, let
:mod:`backup_tool.governance.retention` decide, log the decision, then delete exactly that.

Every real run appends one record to ``retention-log/`` *before* deleting anything (what,
why, under which policy, when), and a second record if some deletion then failed; the
audit reads them. A dry run plans exactly as a real run (including the storage's locks)
and writes nothing. A deletion the storage refuses counts as "locked, deleted in a later run"
(not a failure) only when the store's own lock state proves a lock; any other refusal is a
missing permission, a failure naming the key and the IAM action to grant.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from backup_tool import __version__
from backup_tool.core.report import NullReporter
from backup_tool.core.timestamps import iso
from backup_tool.errors import BackupToolError
from backup_tool.governance.retention import (
    Decision,
    GarbageItem,
    RetentionPlan,
    doomed_segments,
    plan_garbage,
    plan_retention,
)
from backup_tool.repository.catalog import REFUSED, RUNNING_PREFIX, Catalog, manifest_key
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.retention_log import LOG_FORMAT, LOG_PREFIX
from backup_tool.repository.storage import open_repository
from backup_tool.repository.storage.base import (
    ObjectLock,
    ObjectLockedError,
)
from backup_tool.repository.walarchive import WalSegment, list_segments

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy
    from backup_tool.config.settings import Settings
    from backup_tool.core.report import Reporter
    from backup_tool.repository.storage import Storage


UTC = timezone.utc


@dataclass(frozen=True)
class RetentionResult:
    now: datetime
    dry_run: bool
    policy: str
    plan: RetentionPlan
    garbage: tuple[GarbageItem, ...]
    notes: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    failed_ids: tuple[str, ...] = ()
    log_key: str | None = None
    wal_deleted: int = 0
    wal_bytes: int = 0
    deleted_bytes: int = 0

    @property
    def deleted(self) -> list[str]:
        return [i for i in self.plan.deleted if i not in self.failed_ids]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "now": iso(self.now), "policy": self.policy,
            "deleted": self.deleted, "kept": self.plan.kept,
            "decisions": [d.to_dict() for d in self.plan.decisions],
            "deleted_bytes": self.deleted_bytes,
            "wal": None if self.plan.wal is None else {**self.plan.wal.to_dict(), "deleted": self.wal_deleted,
                                                       "deleted_bytes": self.wal_bytes},
            "garbage": [g.to_dict() for g in self.garbage],
            "notes": list(self.notes), "failed": list(self.failed), "log": self.log_key,
        }


def _storage_lock(storage: Storage, keys: Iterable[str], clock: datetime) -> ObjectLock | None:
    """The latest lock among ``keys`` still in force on the real clock."""
    found: ObjectLock | None = None
    for key in keys:
        try:
            lock = storage.lock_of(key)
        except BackupToolError:
            continue
        if lock and lock.retain_until > clock and (found is None or lock.retain_until > found.retain_until):
            found = lock
    return found


@dataclass
class _Outcome:
    """What went wrong while applying, gathered across the deletion steps."""

    notes: list[str]
    failed: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)


def apply_retention(settings: Settings, now: datetime | None = None, dry_run: bool = False,
                    reporter: Reporter | None = None) -> RetentionResult:
    """Plan retention at ``now`` (default: the current time) and, unless ``dry_run``, delete
    what the plan allows, log it in the repository, and sweep garbage.

    The steps, in order: gather and plan (including the storage's own locks), log the decision,
    delete backups newest first (sparing what a backup that could not go still needs), delete
    WAL, sweep garbage, refresh the catalog index, log the failures."""
    reporter = reporter or NullReporter()
    clock = datetime.now(UTC)
    now = now or clock
    policy = settings.policy
    storage = open_repository(settings.repo_url)
    catalog = Catalog(storage)
    records, problems = catalog.records()
    segments = list_segments(storage)
    plan = _plan_with_locks(storage, records, policy, now, clock, [s.name for s in segments])
    garbage, garbage_notes = _plan_garbage(storage, catalog, records, policy, now, clock)
    out = _Outcome([f"{'refused' if isinstance(p, REFUSED) else 'unreadable'} manifest ignored, "
                    f"its backup is left alone: {p.message}" for p in problems] + garbage_notes)
    to_delete = [plan.decision(i) for i in plan.deleted]
    by_id = {r.id: r for r in records}
    wal_doomed = [] if plan.wal is None else doomed_segments(segments, plan.wal)
    if dry_run:
        return RetentionResult(now, True, policy.name, plan, tuple(garbage), tuple(out.notes),
                               deleted_bytes=sum(d.size_bytes for d in to_delete),
                               wal_deleted=len(wal_doomed), wal_bytes=sum(s.size for s in wal_doomed))

    run_id = f"{clock.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(3)}"
    log_key = f"{LOG_PREFIX}{run_id}.json"
    storage.put_bytes(log_key, json.dumps(_log_record(run_id, clock, now, storage, policy, plan, to_delete,
                                                      by_id, garbage), indent=1).encode())
    deleted_bytes = _delete_backups(storage, to_delete, by_id, out, reporter)
    wal_deleted, wal_bytes = _delete_wal(storage, wal_doomed, out)
    _sweep(storage, garbage, out)
    try:
        catalog.entries(refresh=True)
    except BackupToolError:
        pass  # the catalog index is a cache: the next run (or status) rewrites it
    if out.failed or out.failed_ids:
        outcome = {"format": LOG_FORMAT, "run": run_id, "at": iso(datetime.now(UTC)), "outcome_of": log_key,
                   "failed": out.failed, "failed_ids": out.failed_ids}
        storage.put_bytes(f"{LOG_PREFIX}{run_id}-outcome.json", json.dumps(outcome, indent=1).encode())
    reporter.event("retention applied", deleted=len(to_delete) - len(out.failed_ids), kept=len(plan.kept),
                   wal_deleted=wal_deleted, garbage=len(garbage), log=log_key)
    return RetentionResult(now, False, policy.name, plan, tuple(garbage), tuple(out.notes), tuple(out.failed),
                           tuple(out.failed_ids), log_key, wal_deleted, wal_bytes, deleted_bytes)


def _plan_with_locks(storage: Storage, records: Sequence[BackupRecord], policy: Policy, now: datetime,
                     clock: datetime, wal_names: list[str]) -> RetentionPlan:
    """The plan, redone with the storage's own locks (legal holds included) when the bucket
    locks objects, so that a locked backup is never even attempted."""
    plan = plan_retention(records, policy, now, wal_segments=wal_names)
    if not storage.object_lock_enabled():
        return plan
    hard: dict[str, ObjectLock] = {}
    for backup_id in plan.deleted:
        keys = [manifest_key(backup_id)] + [o.key for o in storage.list(f"backups/{backup_id}/")]
        if (lock := _storage_lock(storage, keys, clock)) is not None:
            hard[backup_id] = lock
    return plan_retention(records, policy, now, hard_locks=hard, wal_segments=wal_names) if hard else plan


def _plan_garbage(storage: Storage, catalog: Catalog, records: Sequence[BackupRecord], policy: Policy,
                  now: datetime, clock: datetime) -> tuple[list[GarbageItem], list[str]]:
    """Objects of no listed backup, and unfinished uploads, old enough to be a crashed run's."""
    referenced = set().union(*(r.deps for r in records)) if records else set()
    listed = list(storage.list("backups/")) + list(storage.list("tmp/"))
    grace = timedelta(hours=policy.retention.garbage_grace_hours)
    garbage, notes = plan_garbage(listed, list(storage.list_partials()), set(catalog.ids()) | referenced, grace,
                                  min(now, clock), list(storage.list(RUNNING_PREFIX)))
    return list(garbage), list(notes)


def _log_record(run_id: str, clock: datetime, now: datetime, storage: Storage, policy: Policy,
                plan: RetentionPlan, to_delete: Sequence[Decision], by_id: Mapping[str, BackupRecord],
                garbage: Sequence[GarbageItem]) -> dict[str, Any]:
    """The ``retention-log/`` record written before anything is deleted."""
    return {
        "format": LOG_FORMAT, "run": run_id, "at": iso(clock), "evaluated_at": iso(now),
        "tool_version": __version__, "repository": storage.url,
        "policy": {"name": policy.name, "source": policy.source,
                   "retention": {"full_days": policy.retention.full_days,
                                 "incremental_days": policy.retention.incremental_days,
                                 "pitr_days": policy.retention.pitr_days,
                                 "min_fulls": policy.retention.min_fulls},
                   "object_lock": policy.object_lock.mode},
        "deleted": [{**d.to_dict(), "finished_at": iso(by_id[d.id].finished_at),
                     "recorded_expires_at": iso(by_id[d.id].expires_at), "objects": by_id[d.id].objects}
                    for d in to_delete],
        "kept": [{"id": d.id, "reasons": list(d.reasons)} for d in plan.decisions if not d.delete],
        "wal": None if plan.wal is None else {**plan.wal.to_dict(), "segments": list(plan.wal.delete)},
        "garbage": [g.to_dict() for g in garbage],
    }


def _delete_backups(storage: Storage, to_delete: Sequence[Decision], by_id: Mapping[str, BackupRecord],
                    out: _Outcome, reporter: Reporter) -> int:
    """Delete newest first; a backup that cannot go spares everything it needs. Returns bytes deleted."""
    spared: set[str] = set()
    deleted_bytes = 0
    for d in sorted(to_delete, key=lambda x: (x.started_at, x.id), reverse=True):
        if d.id in spared:
            out.failed.append(f"{d.id}: kept because a backup that needs it could not be deleted")
            out.failed_ids.append(d.id)
            spared |= by_id[d.id].deps
            continue
        try:
            storage.purge(manifest_key(d.id))
            for o in list(storage.list(f"backups/{d.id}/")):
                storage.purge(o.key)
            deleted_bytes += d.size_bytes
            reporter.event("retention: deleted", id=d.id, kind=d.kind, reason=d.reasons[0])
        except ObjectLockedError as exc:
            out.notes.append(f"{d.id} kept: {exc.message}; it goes in a later run")
            out.failed_ids.append(d.id)
            spared |= by_id[d.id].deps
        except BackupToolError as exc:
            out.failed.append(f"{d.id}: {exc.message}")
            out.failed_ids.append(d.id)
            spared |= by_id[d.id].deps
            reporter.warning(f"could not delete {d.id}: {exc.message}")
    return deleted_bytes


def _delete_wal(storage: Storage, doomed: Sequence[WalSegment], out: _Outcome) -> tuple[int, int]:
    """Delete the WAL segments the plan lets go; (count, bytes) deleted."""
    deleted = size = locked = 0
    for seg in doomed:
        try:
            storage.purge(seg.key)
            deleted += 1
            size += seg.size
        except ObjectLockedError:
            locked += 1
        except BackupToolError as exc:
            out.failed.append(f"WAL {seg.name}: {exc.message}")
    if locked:
        out.notes.append(f"{locked} WAL segments are still under Object Lock: they go in a later run")
    return deleted, size


def _sweep(storage: Storage, garbage: Sequence[GarbageItem], out: _Outcome) -> None:
    """Remove the garbage of crashed runs (objects and unfinished uploads)."""
    for g in garbage:
        try:
            for key in g.keys:
                storage.purge(key)
            for p in g.partials:
                storage.delete_partial(p)
        except ObjectLockedError:
            out.notes.append(f"garbage {g.what} is under Object Lock: removed in a later run")
        except BackupToolError as exc:
            out.failed.append(f"garbage {g.what}: {exc.message}")


def check_object_lock(storage: Storage, policy: Policy) -> tuple[bool, str]:
    """Whether the repository can honour the policy's Object Lock mode (for ``check``)."""
    mode = policy.object_lock.mode
    try:
        enabled = storage.object_lock_enabled()
    except BackupToolError as exc:
        return (mode == "none", f"cannot read the bucket's Object Lock configuration: {exc.message}")
    if mode == "none":
        state = {True: "the bucket supports it", False: "the bucket has it disabled",
                 None: "a local directory has none"}[enabled]
        return True, f"not requested by policy {policy.name!r} ({state})"
    if enabled is None:
        return False, (f"policy {policy.name!r} asks for Object Lock ({mode}) but {storage.url} is a local "
                       "directory, which cannot make objects immutable: use an S3 bucket with Object Lock")
    if not enabled:
        return False, (f"policy {policy.name!r} asks for Object Lock ({mode}) but bucket {storage.url} has "
                       "Object Lock disabled: create the bucket with Object Lock enabled (it cannot be "
                       "turned on for objects already written), or set object_lock.mode = \"none\"")
    return True, f"bucket supports Object Lock; new objects are locked in {mode} mode until their backup expires"
