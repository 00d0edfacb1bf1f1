"""What the schedule asks for: which backup meets a slot, and what is due now (pure).

Which backup meets a slot is decided in one place, :func:`meet_slot`, used by ``run-due``
(what is due) and ``audit`` (every slot met, late, missed or pending): a slot of a schedule is
met by the earliest backup of an accepted kind (a full or an incremental for an incremental
slot) started in [slot, next slot) and at or before ``now``; on time within ``grace_minutes``,
late after. So every backup belongs to at most one slot of a schedule, the newest slot at or
before its start, and a backup is judged by when it really started, never by the time a
command claimed (``schedule-log/`` records written by older versions for ``run-due --now`` are
not read).

What is due is a pure function of (backups, policy, now): a full is due when the newest full
slot at or before ``now`` is not met (or there is no full at all, or the chain has reached
``retention.max_chain_length``); an incremental when the newest incremental slot is not met.
Only the newest slot matters, so a missed slot is taken at the next run, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Mapping, Protocol, Sequence, TypeVar

from backup_tool.core.cron import next_slot, previous_slot
from backup_tool.core.kinds import LOGICAL_KINDS, BackupKind
from backup_tool.core.timestamps import iso

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy
    from backup_tool.repository.records import BackupRecord

LOGICAL = LOGICAL_KINDS
ACCEPTS: Mapping[str, tuple[str, ...]] = {BackupKind.FULL: (BackupKind.FULL,), BackupKind.INCREMENTAL: LOGICAL_KINDS,
                                          BackupKind.BASE: (BackupKind.BASE,)}


# ----------------------------------------------------------------------------- which backup meets a slot


class Taken(Protocol):
    """Anything that can meet a slot: a backup record, or a deleted backup from the log."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def started_at(self) -> datetime: ...


T = TypeVar("T", bound=Taken)


class SlotStatus(str, Enum):
    MET = "met"
    LATE = "late"
    MISSED = "missed"
    PENDING = "pending"


@dataclass(frozen=True)
class SlotVerdict(Generic[T]):
    """How one slot stands at ``now``; ``backup`` is the one meeting it (None when missed or pending)."""

    status: SlotStatus
    backup: T | None = None


def meet_slot(schedule: str, slot: datetime, following: datetime | None, grace: timedelta,
              now: datetime, backups: Sequence[T]) -> SlotVerdict[T]:
    """Which backup meets ``slot`` of ``schedule`` (full, incremental or base), as seen at ``now``
    (pure). ``following`` is the schedule's next slot (None: unbounded).

    The earliest backup of a kind in :data:`ACCEPTS` started in [slot, following) and at or
    before ``now`` meets it: MET when it started within ``grace`` of the slot, LATE after.
    Without one the slot is PENDING while its grace runs, MISSED once it has passed.
    """
    accepted = ACCEPTS[schedule]
    meeting = [b for b in backups if b.kind in accepted and slot <= b.started_at <= now
               and (following is None or b.started_at < following)]
    if meeting:
        first = min(meeting, key=lambda b: (b.started_at, b.id))
        return SlotVerdict(SlotStatus.MET if first.started_at <= slot + grace else SlotStatus.LATE, first)
    return SlotVerdict(SlotStatus.PENDING if now < slot + grace else SlotStatus.MISSED)


def newest_slot_verdict(schedule: str, expr: str, tz: str, grace: timedelta, now: datetime,
                        backups: Sequence[T]) -> tuple[datetime | None, SlotVerdict[T] | None]:
    """The newest slot of ``expr`` at or before ``now`` and its verdict (None, None: never fired)."""
    slot = previous_slot(expr, tz, now)
    if slot is None:
        return None, None
    return slot, meet_slot(schedule, slot, next_slot(expr, tz, slot), grace, now, backups)


# ----------------------------------------------------------------------------- what is due


@dataclass(frozen=True)
class DueItem:
    kind: str
    slot: datetime | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "slot": iso(self.slot), "reason": self.reason}


@dataclass(frozen=True)
class DuePlan:
    """What run-due takes at ``now``: at most one logical backup (full or incremental) and
    at most one base backup, each with the reason; ``notes`` say why the rest is not due."""

    now: datetime
    items: tuple[DueItem, ...]
    notes: tuple[str, ...]
    next_full: datetime | None = None
    next_incremental: datetime | None = None

    @property
    def kinds(self) -> list[str]:
        return [i.kind for i in self.items]

    def to_dict(self) -> dict[str, Any]:
        return {"now": iso(self.now), "due": [i.to_dict() for i in self.items], "notes": list(self.notes),
                "next_full": iso(self.next_full), "next_incremental": iso(self.next_incremental)}


def chain_length(backups: Sequence[BackupRecord], head: BackupRecord) -> int:
    """Incrementals between ``head`` and its full (0 for a full)."""
    by_id = {b.id: b for b in backups}
    n, cur, seen = 0, head, set()
    while cur.kind == BackupKind.INCREMENTAL and cur.parent_id and cur.id not in seen:
        seen.add(cur.id)
        n += 1
        parent = by_id.get(cur.parent_id)
        if parent is None:
            break
        cur = parent
    return n


def decide_due(backups: Sequence[BackupRecord], policy: Policy, now: datetime) -> DuePlan:
    """What is due at ``now`` (pure: no clock, no I/O); a slot is covered exactly when
    :func:`meet_slot` finds a backup meeting it, as the audit does."""
    s, tz = policy.schedule, policy.schedule.timezone
    grace = timedelta(minutes=s.grace_minutes)
    present = [b for b in backups if b.started_at <= now]
    logical = sorted((b for b in present if b.kind in LOGICAL), key=lambda b: (b.started_at, b.id))
    fulls = [b for b in logical if b.kind == BackupKind.FULL]
    items: list[DueItem] = []
    notes: list[str] = []

    def not_taken(schedule: str, slot: datetime, verdict: SlotVerdict[BackupRecord]) -> str:
        missed = " (missed, taking it now)" if verdict.status is SlotStatus.MISSED else ""
        return f"{schedule} slot {iso(slot)} not taken yet{missed}"

    def covered(schedule: str, slot: datetime, verdict: SlotVerdict[BackupRecord]) -> str:
        assert verdict.backup is not None
        return f"{schedule}: {verdict.backup.id} covers slot {iso(slot)} ({verdict.status.value})"

    full_slot, full_v = newest_slot_verdict(BackupKind.FULL, s.full, tz, grace, now, present)
    if not fulls:
        items.append(DueItem(BackupKind.FULL, full_slot, "no full backup yet"))
    elif full_slot and full_v and full_v.backup is None:
        items.append(DueItem(BackupKind.FULL, full_slot, not_taken("full", full_slot, full_v)))
    else:
        notes.append(covered("full", full_slot, full_v) if full_slot and full_v
                     else f"full: newest {fulls[-1].id}; the full schedule has not fired")
    if not items and s.incremental:
        incr_slot, incr_v = newest_slot_verdict(BackupKind.INCREMENTAL, s.incremental, tz, grace, now, present)
        if incr_slot and incr_v and incr_v.backup is None:
            head = logical[-1]
            length = chain_length(logical, head)
            if length >= policy.retention.max_chain_length:
                items.append(DueItem(BackupKind.FULL, incr_slot,
                                     f"incremental slot {iso(incr_slot)} due but the chain already has "
                                     f"{length} incrementals (max_chain_length {policy.retention.max_chain_length}): "
                                     f"taking a full"))
            else:
                items.append(DueItem(BackupKind.INCREMENTAL, incr_slot, not_taken("incremental", incr_slot, incr_v)))
        elif incr_slot and incr_v:
            notes.append(covered("incremental", incr_slot, incr_v))
    if s.base:
        bases = [b for b in present if b.kind == BackupKind.BASE]
        base_slot, base_v = newest_slot_verdict(BackupKind.BASE, s.base, tz, grace, now, present)
        if not bases:
            items.append(DueItem(BackupKind.BASE, base_slot, "no base backup yet"))
        elif base_slot and base_v and base_v.backup is None:
            items.append(DueItem(BackupKind.BASE, base_slot, not_taken("base", base_slot, base_v)))
        elif base_slot and base_v:
            notes.append(covered("base", base_slot, base_v))
    return DuePlan(now, tuple(items), tuple(notes), next_slot(s.full, tz, now),
                   next_slot(s.incremental, tz, now) if s.incremental else None)
