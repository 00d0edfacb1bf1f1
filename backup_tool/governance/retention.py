"""Retention: which backups and WAL the policy lets go, and deleting exactly those.

The decision (:func:`plan_retention`) is a pure function of (backups, policy, now). A backup
is *expired* once ``now`` passes its expiry: the one recorded in its manifest when it was
taken, or the current policy's (taken + retention for its kind) if that is later, so a
policy edit can lengthen but never shorten what was promised. An expired backup is still
kept, and the plan says why, when any of these safety rules holds:

* it is the newest full of its database, or one of the ``retention.min_fulls`` newest;
* it is the newest backup of its database (the head the next incremental builds on);
* a kept backup needs it (its parent chain, or objects it references), transitively;
* it is a base backup inside the PITR window (``retention.pitr_days``), or the newest one
  taken before the window starts (recovery to the window's first moment replays from it),
  or the newest base of all;
* an Object Lock protects it (recorded in the manifest, or read from the storage at apply
  time, legal holds included: a locked object is never even attempted).

A deletion the storage refuses counts as "locked, deleted in a later run" (not a failure)
only when the store's own lock state proves a lock (the bucket's Object Lock configuration,
the object's retention or legal hold); any other refusal is a missing permission, a
failure (exit 1) naming the key and the IAM action to grant, and so is a refusal whose
lock state cannot be read (the read permission missing is named instead of guessing).

WAL is kept from the start segment of the oldest retained base backup onwards; without a
retained base, or with one whose start segment is unknown, no WAL is deleted. A backup in
progress has no manifest yet and is invisible to these rules; the garbage sweep leaves
every unlisted prefix alone until nothing under it has been written for
``retention.garbage_grace_hours`` (judged on the real clock, never on ``--now``), and
whatever the age of its objects while the backup's ``running/<id>.json`` marker is younger
than 48 hours (a backup can spend hours comparing checksums without writing anything).

Every real run appends one record to ``retention-log/`` *before* deleting anything (what,
why, under which policy, when), and a second record if some deletion then failed; the
audit reads them. A dry run plans exactly as a real run (including the storage's locks)
and writes nothing.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from backup_tool.repository.catalog import RUNNING_PREFIX, RUNNING_STALE_AFTER
from backup_tool.errors import BackupToolError
from backup_tool.repository.storage.base import (
    ObjectInfo,
    ObjectLock,
    ObjectLockedError,
    PartialUpload,
)
from backup_tool.core.timestamps import iso, parse_utc
from backup_tool.core.walnames import (  # noqa: F401  (segment_name re-exported for callers of this module)
    DEFAULT_SEGMENT_SIZE,
    is_segment,
    lsn_segment,
    parse_lsn,
    segment_name,
    segment_number,
    segment_prefix,
)

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings
    from backup_tool.repository.manifest import Manifest
    from backup_tool.config.policy import Policy
    from backup_tool.core.report import Reporter
    from backup_tool.repository.storage import Storage
    from backup_tool.physical.wal import WalSegment

UTC = timezone.utc
LOG_PREFIX = "retention-log/"
LOG_FORMAT = 1


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class BackupRecord:
    """What retention, scheduling, monitoring and the audit need to know about one backup."""

    id: str
    kind: str
    started_at: datetime
    expires_at: datetime
    parent_id: str | None = None
    database: str = ""
    finished_at: datetime | None = None
    needs: frozenset[str] = frozenset()
    lock_mode: str | None = None
    lock_until: datetime | None = None
    size_bytes: int = 0
    objects: int = 0
    start_wal: str | None = None
    wal_segment_size: int = DEFAULT_SEGMENT_SIZE
    policy_name: str = ""

    @property
    def deps(self) -> frozenset[str]:
        extra = {self.parent_id} if self.parent_id else set()
        return frozenset((self.needs | extra) - {self.id})

    @classmethod
    def from_manifest(cls, m: Manifest) -> BackupRecord:
        needs = {o.key.split("/")[1] for o in m.objects()
                 if o.key.startswith("backups/") and o.key.count("/") >= 2}
        lock = m.options.get("object_lock") or {}
        until = lock.get("retain_until")
        physical = getattr(m, "physical", None)
        return cls(
            id=m.id, kind=m.kind, parent_id=m.parent_id, database=m.database,
            started_at=m.started_at, finished_at=m.finished_at, expires_at=m.expires_at,
            needs=frozenset(needs - {m.id}),
            lock_mode=lock.get("mode") if until else None,
            lock_until=parse_utc(until) if isinstance(until, str) else None,
            size_bytes=m.size_bytes, objects=len(m.own_objects()),
            start_wal=base_start_segment(m), policy_name=str(m.policy.get("name", "")),
            wal_segment_size=getattr(physical, "wal_segment_size", None) or DEFAULT_SEGMENT_SIZE,
        )


    def to_index(self) -> dict[str, Any]:
        """The record as the catalog index stores it (:mod:`backup_tool.repository.catalog_index`)."""
        return {"id": self.id, "kind": self.kind, "started_at": iso(self.started_at),
                "expires_at": iso(self.expires_at), "parent_id": self.parent_id, "database": self.database,
                "finished_at": iso(self.finished_at), "needs": sorted(self.needs), "lock_mode": self.lock_mode,
                "lock_until": iso(self.lock_until), "size_bytes": self.size_bytes, "objects": self.objects,
                "start_wal": self.start_wal, "wal_segment_size": self.wal_segment_size,
                "policy_name": self.policy_name}

    @classmethod
    def from_index(cls, body: Mapping[str, Any]) -> BackupRecord:
        """Inverse of :meth:`to_index`; KeyError/TypeError/ValueError for a malformed entry."""
        def when(name: str) -> datetime | None:
            value = body[name]
            return None if value is None else parse_utc(str(value))

        started, expires = when("started_at"), when("expires_at")
        if started is None or expires is None:
            raise ValueError("started_at and expires_at are required")
        return cls(id=str(body["id"]), kind=str(body["kind"]), started_at=started, expires_at=expires,
                   parent_id=body["parent_id"], database=str(body["database"]), finished_at=when("finished_at"),
                   needs=frozenset(str(n) for n in body["needs"]), lock_mode=body["lock_mode"],
                   lock_until=when("lock_until"), size_bytes=int(body["size_bytes"]),
                   objects=int(body["objects"]), start_wal=body["start_wal"],
                   wal_segment_size=int(body["wal_segment_size"]), policy_name=str(body["policy_name"]))


def base_start_segment(m: Manifest) -> str | None:
    """The WAL segment a base backup's recovery starts from, however the manifest records it."""
    if m.kind != "base":
        return None
    physical = getattr(m, "physical", None)
    if physical is not None and (found := segment_prefix(getattr(physical, "start_wal", "") or "")):
        return found
    for name in ("start_wal", "start_wal_file", "wal_start_file", "start_segment"):
        value = getattr(m, name, None) or m.options.get(name)
        if isinstance(value, str) and (found := segment_prefix(value)):
            return found
    lsn = getattr(m, "start_lsn", None) or m.options.get("start_lsn")
    timeline = getattr(m, "timeline", None) or m.options.get("timeline") or m.options.get("start_timeline")
    if isinstance(lsn, str) and "/" in lsn and timeline:
        seg_size = getattr(physical, "wal_segment_size", None) or DEFAULT_SEGMENT_SIZE
        return segment_name(int(timeline), lsn_segment(parse_lsn(lsn), seg_size), seg_size)
    return None


def effective_expiry(b: BackupRecord, policy: Policy) -> datetime:
    return max(b.expires_at, b.started_at + policy.retention_for(b.kind))


# ----------------------------------------------------------------------------- WAL helpers


@dataclass(frozen=True)
class WalPlan:
    keep_from: str | None
    delete: tuple[str, ...]
    kept: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"keep_from": self.keep_from, "delete": len(self.delete), "kept": self.kept,
                "first_deleted": self.delete[0] if self.delete else None,
                "last_deleted": self.delete[-1] if self.delete else None, "reason": self.reason}


def plan_wal(names: Sequence[str], retained_bases: Sequence[BackupRecord]) -> WalPlan:
    """Segments older than the start of the oldest retained base backup, on any timeline
    (pure; O(n log n) in the number of names)."""
    if not retained_bases:
        return WalPlan(None, (), len(names), "no base backup is retained: all WAL kept")
    unknown = [b.id for b in retained_bases if not b.start_wal]
    if unknown:
        return WalPlan(None, (), len(names), f"base backup {unknown[0]} records no start segment: all WAL kept")
    seg_size = retained_bases[0].wal_segment_size
    oldest = min(retained_bases, key=lambda b: (segment_number(b.start_wal or "", seg_size), b.id))
    cut = segment_number(oldest.start_wal or "", seg_size)
    delete = sorted(n for n in names if is_segment(n) and segment_number(n, seg_size) < cut)
    return WalPlan(oldest.start_wal, tuple(delete), len(names) - len(delete),
                   f"kept from {oldest.start_wal}, the start of the oldest retained base backup {oldest.id}")


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    id: str
    kind: str
    database: str
    started_at: datetime
    expires_at: datetime
    delete: bool
    reasons: tuple[str, ...]
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "database": self.database,
                "started_at": iso(self.started_at), "expires_at": iso(self.expires_at),
                "action": "delete" if self.delete else "keep", "reasons": list(self.reasons),
                "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class RetentionPlan:
    now: datetime
    decisions: tuple[Decision, ...]
    wal: WalPlan | None = None

    @property
    def deleted(self) -> list[str]:
        return [d.id for d in self.decisions if d.delete]

    @property
    def kept(self) -> list[str]:
        return [d.id for d in self.decisions if not d.delete]

    def decision(self, backup_id: str) -> Decision:
        return next(d for d in self.decisions if d.id == backup_id)


def _order(b: BackupRecord) -> tuple[datetime, str]:
    return (b.started_at, b.id)


def plan_retention(backups: Sequence[BackupRecord], policy: Policy, now: datetime,
                   hard_locks: Mapping[str, ObjectLock] | None = None,
                   wal_segments: Sequence[str] | None = None) -> RetentionPlan:
    """Decide, for every backup, keep or delete and why (pure: no clock, no I/O)."""
    hard_locks = hard_locks or {}
    by_id = {b.id: b for b in backups}
    reasons: dict[str, list[str]] = {b.id: [] for b in backups}
    window_start = now - timedelta(days=policy.retention.pitr_days)

    for b in backups:
        expiry = effective_expiry(b, policy)
        if b.kind == "base" and b.started_at >= window_start:
            reasons[b.id].append(f"inside the PITR window (since {iso(window_start)})")
        elif expiry > now:
            reasons[b.id].append(f"retained until {iso(expiry)}")
        if b.lock_until and b.lock_until > now:
            reasons[b.id].append(f"Object Lock ({b.lock_mode}) until {iso(b.lock_until)}")
        if (lock := hard_locks.get(b.id)) is not None:
            reasons[b.id].append("objects under a legal hold: the storage refuses to delete them until it is "
                                 "removed" if lock.legal_hold else
                                 f"objects locked ({lock.mode}) until {iso(lock.retain_until)}: "
                                 "the storage refuses to delete them before then")

    groups: dict[str, list[BackupRecord]] = defaultdict(list)
    for b in backups:
        groups[b.database].append(b)
    n_min = policy.retention.min_fulls
    for group in groups.values():
        fulls = sorted((b for b in group if b.kind == "full"), key=_order)
        for rank, f in enumerate(reversed(fulls[-n_min:])):
            reasons[f.id].append("newest full" if rank == 0 else
                                 f"one of the {n_min} newest fulls (retention.min_fulls)")
        logical = sorted((b for b in group if b.kind in ("full", "incremental")), key=_order)
        if logical and logical[-1].kind == "incremental":
            reasons[logical[-1].id].append("newest backup: the next incremental builds on it")

    bases = sorted((b for b in backups if b.kind == "base"), key=_order)
    before_window = [b for b in bases if b.started_at <= window_start]
    if before_window:
        reasons[before_window[-1].id].append(
            f"newest base backup before the PITR window starts ({iso(window_start)}): "
            "recovery to the window's first moment replays from it")
    if bases:
        reasons[bases[-1].id].append("newest base backup")

    kept = {i for i, r in reasons.items() if r}
    work = list(kept)
    while work:
        for dep in by_id[work.pop()].deps:
            if dep in by_id and dep not in kept:
                kept.add(dep)
                work.append(dep)
    needed_by: dict[str, list[str]] = defaultdict(list)
    for child in sorted(kept):
        for dep in by_id[child].deps:
            if dep in by_id:
                needed_by[dep].append(child)
    for dep, children in needed_by.items():
        shown = ", ".join(children[:3]) + (f" (+{len(children) - 3} more)" if len(children) > 3 else "")
        reasons[dep].append(f"needed by retained {shown}")

    decisions = []
    for b in sorted(backups, key=_order):
        expiry = effective_expiry(b, policy)
        if b.id in kept:
            decisions.append(Decision(b.id, b.kind, b.database, b.started_at, expiry, False,
                                      tuple(reasons[b.id]), b.size_bytes))
            continue
        days = {"full": policy.retention.full_days, "incremental": policy.retention.incremental_days,
                "base": policy.retention.pitr_days}.get(b.kind, 0)
        why = (f"older than the PITR window ({policy.retention.pitr_days} days) and not needed to start it"
               if b.kind == "base" else f"expired {iso(expiry)} ({b.kind} retention {days} days)")
        decisions.append(Decision(b.id, b.kind, b.database, b.started_at, expiry, True, (why,), b.size_bytes))

    wal = None
    if wal_segments is not None:
        retained_bases = [by_id[d.id] for d in decisions if not d.delete and d.kind == "base"]
        wal = plan_wal(wal_segments, retained_bases)
    return RetentionPlan(now, tuple(decisions), wal)


# ----------------------------------------------------------------------------- garbage


@dataclass(frozen=True)
class GarbageItem:
    what: str
    reason: str
    keys: tuple[str, ...] = ()
    partials: tuple[PartialUpload, ...] = ()
    size: int = 0
    last_written: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "reason": self.reason, "objects": len(self.keys),
                "unfinished_uploads": len(self.partials), "bytes": self.size,
                "last_written": iso(self.last_written)}


def plan_garbage(objects: Sequence[ObjectInfo], partials: Sequence[PartialUpload],
                 protected_ids: set[str], grace: timedelta, clock: datetime,
                 running: Sequence[ObjectInfo] = ()) -> tuple[list[GarbageItem], list[str]]:
    """Leftovers of crashed runs older than ``grace`` (pure). ``objects`` are those under
    ``backups/`` and ``tmp/``; ``protected_ids`` are backups with a manifest or referenced by one.
    ``running`` are the ``running/<id>.json`` markers of backups in progress: a backup whose
    marker is younger than ``RUNNING_STALE_AFTER`` is left alone however old its objects are;
    a stale marker, or one left behind by a committed backup, is itself garbage."""
    cutoff = clock - grace
    in_progress: set[str] = set()
    markers: list[GarbageItem] = []
    for m in running:
        backup_id = m.key[len(RUNNING_PREFIX):].removesuffix(".json")
        if backup_id in protected_ids or clock - m.modified > RUNNING_STALE_AFTER:
            markers.append(GarbageItem(m.key, "marker of a backup that is no longer running",
                                       (m.key,), (), m.size, m.modified))
        else:
            in_progress.add(backup_id)
    protected_ids = protected_ids | in_progress
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    loose: list[ObjectInfo] = []
    for o in objects:
        parts = o.key.split("/")
        if parts[0] == "backups" and len(parts) >= 3:
            groups[parts[1]].append(o)
        elif parts[0] == "tmp":
            loose.append(o)
    group_partials: dict[str, list[PartialUpload]] = defaultdict(list)
    other_partials: list[PartialUpload] = []
    for p in partials:
        parts = p.key.split("/")
        if parts[0] == "backups" and len(parts) >= 3 and parts[1] in in_progress:
            continue
        if parts[0] == "backups" and len(parts) >= 3 and parts[1] not in protected_ids:
            group_partials[parts[1]].append(p)
        else:
            other_partials.append(p)
    items: list[GarbageItem] = []
    notes: list[str] = []
    for backup_id in sorted(set(groups) | set(group_partials)):
        if backup_id in protected_ids:
            continue
        objs, ups = groups.get(backup_id, []), group_partials.get(backup_id, [])
        last = max([o.modified for o in objs] + [p.modified for p in ups])
        if last > cutoff:
            notes.append(f"backups/{backup_id}/ has no manifest but was written {iso(last)} "
                         f"(within {_hours(grace)}): possibly in progress, left alone")
            continue
        items.append(GarbageItem(f"backups/{backup_id}/",
                                 f"no manifest and nothing written since {iso(last)}: left by an interrupted backup",
                                 tuple(o.key for o in objs), tuple(ups),
                                 sum(o.size for o in objs) + sum(p.size for p in ups), last))
    for o in loose:
        if o.modified <= cutoff:
            items.append(GarbageItem(o.key, "stale probe/temporary object", (o.key,), (), o.size, o.modified))
    for p in other_partials:
        if p.modified <= cutoff:
            items.append(GarbageItem(p.key, "unfinished write abandoned since " + (iso(p.modified) or ""),
                                     (), (p,), p.size, p.modified))
        else:
            notes.append(f"unfinished write {p.key} active at {iso(p.modified)}: left alone")
    notes += [f"backups/{i}/ belongs to a backup in progress (running/{i}.json): left alone"
              for i in sorted(in_progress)]
    return items + markers, notes


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


# ----------------------------------------------------------------------------- applying


def doomed_segments(segments: Iterable[WalSegment], plan: WalPlan) -> list[WalSegment]:
    """The archived segments ``plan`` deletes, in archive order (linear: one set, built once)."""
    doomed = frozenset(plan.delete)
    return [s for s in segments if s.name in doomed]


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


def _wal_segments(storage: Storage) -> list[Any] | None:
    try:
        from backup_tool.physical import wal
    except ImportError:
        return None
    lister = getattr(wal, "list_segments", None)
    return None if lister is None else list(lister(storage))


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


def apply_retention(settings: Settings, now: datetime | None = None, dry_run: bool = False,
                    reporter: Reporter | None = None) -> RetentionResult:
    """Plan retention at ``now`` (default: the current time) and, unless ``dry_run``, delete
    what the plan allows, log it in the repository, and sweep garbage."""
    from backup_tool import __version__
    from backup_tool.repository.catalog import REFUSED, Catalog, manifest_key
    from backup_tool.core.report import NullReporter
    from backup_tool.repository.storage import open_repository

    reporter = reporter or NullReporter()
    clock = datetime.now(UTC)
    now = now or clock
    policy = settings.policy
    storage = open_repository(settings.repo_url)
    catalog = Catalog(storage)
    all_ids = set(catalog.ids())
    records, problems = catalog.records()
    notes = [f"{'refused' if isinstance(p, REFUSED) else 'unreadable'} manifest ignored, "
             f"its backup is left alone: {p.message}" for p in problems]
    segments = _wal_segments(storage)
    names = None if segments is None else [s.name for s in segments]
    if segments is None:
        notes.append("WAL retention skipped: this build has no WAL archive support")

    plan = plan_retention(records, policy, now, wal_segments=names)
    locking = storage.object_lock_enabled()
    hard: dict[str, ObjectLock] = {}
    if locking:
        for backup_id in plan.deleted:
            keys = [manifest_key(backup_id)] + [o.key for o in storage.list(f"backups/{backup_id}/")]
            if (lock := _storage_lock(storage, keys, clock)) is not None:
                hard[backup_id] = lock
        if hard:
            plan = plan_retention(records, policy, now, hard_locks=hard, wal_segments=names)

    referenced = set().union(*(r.deps for r in records)) if records else set()
    listed = list(storage.list("backups/")) + list(storage.list("tmp/"))
    partials = list(storage.list_partials())
    grace = timedelta(hours=policy.retention.garbage_grace_hours)
    garbage, garbage_notes = plan_garbage(listed, partials, all_ids | referenced, grace, min(now, clock),
                                          list(storage.list(RUNNING_PREFIX)))
    notes += garbage_notes

    to_delete = [plan.decision(i) for i in plan.deleted]
    by_id = {r.id: r for r in records}
    wal_doomed = [] if plan.wal is None or segments is None else doomed_segments(segments, plan.wal)
    if dry_run:
        return RetentionResult(now, True, policy.name, plan, tuple(garbage), tuple(notes),
                               deleted_bytes=sum(d.size_bytes for d in to_delete),
                               wal_deleted=len(wal_doomed), wal_bytes=sum(s.size for s in wal_doomed))

    run_id = f"{clock.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(3)}"
    log_key = f"{LOG_PREFIX}{run_id}.json"
    record = {
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
    storage.put_bytes(log_key, json.dumps(record, indent=1).encode())

    failed: list[str] = []
    failed_ids: list[str] = []
    spared: set[str] = set()
    deleted_bytes = 0
    for d in sorted(to_delete, key=lambda x: (x.started_at, x.id), reverse=True):
        if d.id in spared:
            failed.append(f"{d.id}: kept because a backup that needs it could not be deleted")
            failed_ids.append(d.id)
            spared |= by_id[d.id].deps
            continue
        try:
            storage.purge(manifest_key(d.id))
            for o in list(storage.list(f"backups/{d.id}/")):
                storage.purge(o.key)
            deleted_bytes += d.size_bytes
            reporter.event("retention: deleted", id=d.id, kind=d.kind, reason=d.reasons[0])
        except ObjectLockedError as exc:
            notes.append(f"{d.id} kept: {exc.message}; it goes in a later run")
            failed_ids.append(d.id)
            spared |= by_id[d.id].deps
        except BackupToolError as exc:
            failed.append(f"{d.id}: {exc.message}")
            failed_ids.append(d.id)
            spared |= by_id[d.id].deps
            reporter.warning(f"could not delete {d.id}: {exc.message}")

    wal_deleted = wal_bytes = 0
    wal_locked = 0
    for seg in wal_doomed:
        try:
            storage.purge(seg.key)
            wal_deleted += 1
            wal_bytes += seg.size
        except ObjectLockedError:
            wal_locked += 1
        except BackupToolError as exc:
            failed.append(f"WAL {seg.name}: {exc.message}")
    if wal_locked:
        notes.append(f"{wal_locked} WAL segments are still under Object Lock: they go in a later run")

    for g in garbage:
        try:
            for key in g.keys:
                storage.purge(key)
            for p in g.partials:
                storage.delete_partial(p)
        except ObjectLockedError:
            notes.append(f"garbage {g.what} is under Object Lock: removed in a later run")
        except BackupToolError as exc:
            failed.append(f"garbage {g.what}: {exc.message}")

    try:
        catalog.entries(refresh=True)
    except BackupToolError:
        pass  # the catalog index is a cache: the next run (or status) rewrites it
    if failed or failed_ids:
        outcome = {"format": LOG_FORMAT, "run": run_id, "at": iso(datetime.now(UTC)), "outcome_of": log_key,
                   "failed": failed, "failed_ids": failed_ids}
        storage.put_bytes(f"{LOG_PREFIX}{run_id}-outcome.json", json.dumps(outcome, indent=1).encode())
    reporter.event("retention applied", deleted=len(to_delete) - len(failed_ids), kept=len(plan.kept),
                   wal_deleted=wal_deleted, garbage=len(garbage), log=log_key)
    return RetentionResult(now, False, policy.name, plan, tuple(garbage), tuple(notes), tuple(failed),
                           tuple(failed_ids), log_key, wal_deleted, wal_bytes, deleted_bytes)


# ----------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class LogEntry:
    """One deletion recorded in ``retention-log/``."""

    run: str
    at: datetime
    id: str
    kind: str
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    reasons: tuple[str, ...]
    policy: str
    completed: bool = True
    database: str = ""
    size_bytes: int = 0


def read_log(storage: Storage) -> tuple[list[dict[str, Any]], list[LogEntry], list[str]]:
    """(run records, deletions, problems) from the append-only retention log, oldest first."""
    runs: list[dict[str, Any]] = []
    outcomes: dict[str, set[str]] = defaultdict(set)
    problems: list[str] = []
    for info in storage.list(LOG_PREFIX):
        try:
            body = json.loads(storage.get_bytes(info.key))
        except (BackupToolError, ValueError) as exc:
            problems.append(f"{info.key}: unreadable ({exc})")
            continue
        if "outcome_of" in body:
            outcomes[body.get("run", "")] |= set(body.get("failed_ids", []))
        else:
            runs.append(body)
    entries: list[LogEntry] = []
    for run in runs:
        for d in run.get("deleted", []):
            entries.append(LogEntry(
                run=run.get("run", ""), at=parse_utc(run["at"]), id=d["id"], kind=d.get("kind", "?"),
                started_at=parse_utc(d["started_at"]) if d.get("started_at") else None,
                finished_at=parse_utc(d["finished_at"]) if d.get("finished_at") else None,
                expires_at=parse_utc(d["expires_at"]) if d.get("expires_at") else None,
                reasons=tuple(d.get("reasons", [])), policy=str(run.get("policy", {}).get("name", "")),
                completed=d["id"] not in outcomes.get(run.get("run", ""), set()),
                database=d.get("database", ""), size_bytes=int(d.get("size_bytes", 0))))
    runs.sort(key=lambda r: r.get("at", ""))
    entries.sort(key=lambda e: (e.at, e.id))
    return runs, entries, problems


# ----------------------------------------------------------------------------- Object Lock support


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
