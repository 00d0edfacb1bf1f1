"""Retention: which backups and WAL the policy lets go (pure; :mod:`backup_tool.jobs.expire` deletes them).

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

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from backup_tool.core.kinds import LOGICAL_KINDS, BackupKind
from backup_tool.core.timestamps import iso
from backup_tool.core.walnames import (
    is_segment,
    segment_number,
)
from backup_tool.repository.catalog import RUNNING_PREFIX, RUNNING_STALE_AFTER
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage.base import (
    ObjectInfo,
    ObjectLock,
    PartialUpload,
)

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy
    from backup_tool.repository.walarchive import WalSegment

UTC = timezone.utc



def effective_expiry(b: BackupRecord, policy: Policy) -> datetime:
    """When ``b`` may go: its recorded expiry, or the current policy's if that is later."""
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

    @cached_property
    def _by_id(self) -> dict[str, Decision]:
        return {d.id: d for d in self.decisions}

    def decision(self, backup_id: str) -> Decision:
        """The decision about one backup (constant time: planners ask once per backup)."""
        return self._by_id[backup_id]


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
        if b.kind == BackupKind.BASE and b.started_at >= window_start:
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
        fulls = sorted((b for b in group if b.kind == BackupKind.FULL), key=_order)
        for rank, f in enumerate(reversed(fulls[-n_min:])):
            reasons[f.id].append("newest full" if rank == 0 else
                                 f"one of the {n_min} newest fulls (retention.min_fulls)")
        logical = sorted((b for b in group if b.kind in LOGICAL_KINDS), key=_order)
        if logical and logical[-1].kind == BackupKind.INCREMENTAL:
            reasons[logical[-1].id].append("newest backup: the next incremental builds on it")

    bases = sorted((b for b in backups if b.kind == BackupKind.BASE), key=_order)
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
        days = policy.retention_days(b.kind)
        why = (f"older than the PITR window ({policy.retention.pitr_days} days) and not needed to start it"
               if b.kind == BackupKind.BASE else f"expired {iso(expiry)} ({b.kind} retention {days} days)")
        decisions.append(Decision(b.id, b.kind, b.database, b.started_at, expiry, True, (why,), b.size_bytes))

    wal = None
    if wal_segments is not None:
        retained_bases = [by_id[d.id] for d in decisions if not d.delete and d.kind == BackupKind.BASE]
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

