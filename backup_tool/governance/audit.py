"""The compliance audit: the document an auditor files, built from the repository alone.

It states the policy in force and, over the audit window (``audit.window_days`` back from
``now``, but not before the repository's first backup), gives evidence for each promise:

* **schedule adherence** — every slot the policy's cron expressions expected, and the backup
  that met it, by :func:`backup_tool.governance.due.meet_slot` (the rule run-due decides by): a
  full slot by a full started in [slot, next slot), an incremental slot by an incremental or
  a full; *met* within the grace, *late* after it; one with no backup is *missed*; one whose
  grace has not ended is *pending*. Backups since deleted by retention still count (from the
  deletion log).
* **retention adherence** — backups kept past expiry with the rule that kept them, backups
  overdue for deletion with no such rule, and any deletion before expiry (from the
  append-only ``retention-log/``).
* **immutability** — each backup's Object Lock mode and retain-until date against the policy.
* **verification** — when each backup's checksums were last re-read and last restore-tested
  (from ``verifications/``).
* **PITR coverage** — base backups, the WAL range and its gaps, against the PITR window.
* **health checks** — the seed's table (check, frequency, last status, last run, next check)
  from ``health-log/``, and every failed run in the window; a check whose newest run failed or
  that is overdue is a warning (:func:`backup_tool.governance.health.status_checks`).

Findings are *critical* (a promise broken) or *warnings*; the verdict is NON-COMPLIANT with
any critical finding, COMPLIANT WITH WARNINGS with warnings only, COMPLIANT otherwise.
:func:`build_report` is pure; :mod:`backup_tool.jobs.audit` reads the repository;
:mod:`backup_tool.render.audit` produces JSON, Markdown, or one self-contained HTML page
(inline CSS and SVG, no external assets).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Sequence

from backup_tool.core.cron import next_slot, slots_between
from backup_tool.core.kinds import ALL_KINDS, BackupKind
from backup_tool.core.timestamps import iso
from backup_tool.core.walnames import DEFAULT_SEGMENT_SIZE, segment_number
from backup_tool.governance.due import meet_slot
from backup_tool.governance.retention import BackupRecord, effective_expiry, plan_retention
from backup_tool.governance.status import Verification, WalState, wal_gap_ranges
from backup_tool.repository.retention_log import LogEntry

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy

UTC = timezone.utc


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Candidate:
    """A backup that can meet a slot: present in the repository or recorded as deleted."""

    id: str
    kind: str
    started_at: datetime
    deleted: bool = False


@dataclass(frozen=True)
class SlotResult:
    schedule: str
    slot: datetime
    status: str
    backup_id: str | None = None
    backup_at: datetime | None = None
    backup_deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "slot": iso(self.slot), "status": self.status,
                "backup": self.backup_id, "backup_started_at": iso(self.backup_at),
                "backup_deleted": self.backup_deleted}


@dataclass(frozen=True)
class Finding:
    severity: str
    area: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "area": self.area, "message": self.message}


@dataclass(frozen=True)
class BackupRow:
    id: str
    kind: str
    database: str
    parent_id: str | None
    started_at: datetime
    finished_at: datetime | None
    size_bytes: int
    expires_at: datetime
    lock_mode: str | None
    lock_until: datetime | None
    last_verified: datetime | None
    last_verified_ok: bool | None
    last_restore_test: datetime | None
    last_restore_test_ok: bool | None
    retention: str
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "database": self.database, "parent_id": self.parent_id,
                "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                "size_bytes": self.size_bytes, "expires_at": iso(self.expires_at),
                "lock_mode": self.lock_mode, "lock_until": iso(self.lock_until),
                "last_verified_at": iso(self.last_verified), "last_verified_ok": self.last_verified_ok,
                "last_restore_test_at": iso(self.last_restore_test),
                "last_restore_test_ok": self.last_restore_test_ok,
                "retention": self.retention, "retention_reasons": list(self.reasons)}


@dataclass(frozen=True)
class Pitr:
    in_use: bool
    window_start: datetime
    bases: tuple[str, ...]
    wal_first: str | None
    wal_last: str | None
    wal_segments: int
    newest_wal_at: datetime | None
    gaps: tuple[tuple[str, str], ...]
    recoverable_from: datetime | None
    recoverable_to: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {"in_use": self.in_use, "window_start": iso(self.window_start), "base_backups": list(self.bases),
                "wal_first": self.wal_first, "wal_last": self.wal_last, "wal_segments": self.wal_segments,
                "newest_wal_at": iso(self.newest_wal_at), "gaps": [list(g) for g in self.gaps],
                "recoverable_from": iso(self.recoverable_from), "recoverable_to": iso(self.recoverable_to)}


@dataclass(frozen=True)
class AuditReport:
    now: datetime
    repository: str
    policy: dict[str, Any]
    window_start: datetime
    window_end: datetime
    backups: tuple[BackupRow, ...]
    slots: tuple[SlotResult, ...]
    deletions: tuple[LogEntry, ...]
    verifications: tuple[Verification, ...]
    pitr: Pitr
    findings: tuple[Finding, ...]
    facts: tuple[str, ...] = ()
    retention_runs: int = 0
    last_retention_run: datetime | None = None
    generated_at: datetime | None = None
    schema_drift: dict[str, Any] | None = None
    health: dict[str, Any] | None = None

    @property
    def verdict(self) -> str:
        severities = {f.severity for f in self.findings}
        if "critical" in severities:
            return "NON-COMPLIANT"
        if "warning" in severities:
            return "COMPLIANT WITH WARNINGS"
        return "COMPLIANT"

    def slot_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for s in self.slots:
            per = counts.setdefault(s.schedule, {"met": 0, "late": 0, "missed": 0, "pending": 0})
            per[s.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "now": iso(self.now), "generated_at": iso(self.generated_at),
            "repository": self.repository, "policy": self.policy,
            "window": {"start": iso(self.window_start), "end": iso(self.window_end)},
            "findings": [f.to_dict() for f in self.findings], "facts": list(self.facts),
            "schedule": {"counts": self.slot_counts(), "slots": [s.to_dict() for s in self.slots]},
            "backups": [b.to_dict() for b in self.backups],
            "deletions": [{"id": d.id, "kind": d.kind, "started_at": iso(d.started_at), "deleted_at": iso(d.at),
                           "expires_at": iso(d.expires_at), "reasons": list(d.reasons), "policy": d.policy,
                           "completed": d.completed, "run": d.run} for d in self.deletions],
            "retention_runs": self.retention_runs, "last_retention_run": iso(self.last_retention_run),
            "verifications": [{"at": iso(v.at), "ok": v.ok, "backups": list(v.backups),
                               "restore_test": v.restore_test} for v in self.verifications],
            "pitr": self.pitr.to_dict(),
            "schema_drift": self.schema_drift,
            "health": self.health,
        }


# ----------------------------------------------------------------------------- pure parts


def schedule_adherence(candidates: Sequence[Candidate], policy: Policy, start: datetime,
                       now: datetime) -> list[SlotResult]:
    """Every slot in [start, now] with the backup that met it, or why not (pure); each slot is
    judged by :func:`backup_tool.governance.due.meet_slot`, the rule run-due decides by."""
    s = policy.schedule
    grace = timedelta(minutes=s.grace_minutes)
    results: list[SlotResult] = []
    for schedule, expr in ((BackupKind.FULL, s.full), (BackupKind.INCREMENTAL, s.incremental), (BackupKind.BASE, s.base)):
        if not expr:
            continue
        slots = slots_between(expr, s.timezone, start, now + timedelta(seconds=1))
        for i, slot in enumerate(slots):
            following = slots[i + 1] if i + 1 < len(slots) else next_slot(expr, s.timezone, slot)
            verdict = meet_slot(schedule, slot, following, grace, now, candidates)
            b = verdict.backup
            results.append(SlotResult(schedule, slot, verdict.status.value, b.id if b else None,
                                      b.started_at if b else None, b.deleted if b else False))
    return sorted(results, key=lambda r: (r.slot, r.schedule))


def _verification_index(verifications: Sequence[Verification], now: datetime
                        ) -> tuple[dict[str, tuple[datetime, bool]], dict[str, tuple[datetime, bool]]]:
    checked: dict[str, tuple[datetime, bool]] = {}
    restored: dict[str, tuple[datetime, bool]] = {}
    for v in sorted(verifications, key=lambda v: v.at):
        if v.at > now:
            continue
        for c in v.checks:
            name = str(c.get("name", ""))
            kind, _, backup_id = name.partition(" ")
            if kind == "objects" and backup_id:
                checked[backup_id] = (v.at, bool(c.get("ok")))
            elif kind == "restore_test" and backup_id:
                restored[backup_id] = (v.at, bool(c.get("ok")))
    return checked, restored


def build_report(backups: Sequence[BackupRecord], deletions: Sequence[LogEntry],
                 verifications: Sequence[Verification], wal: WalState | None, policy: Policy,
                 now: datetime, repository: str = "", facts: Sequence[str] = (),
                 retention_runs: Sequence[datetime] = (), lock_supported: bool | None = None) -> AuditReport:
    """The audit at ``now`` (pure)."""
    findings: list[Finding] = []
    present = [b for b in backups if b.started_at <= now]
    gone = [d for d in deletions if d.started_at is None or d.started_at <= now]
    evidence = [b.started_at for b in present] + [d.started_at for d in gone if d.started_at]
    window_start = now - timedelta(days=policy.audit.window_days)
    facts = list(facts)
    if evidence and min(evidence) > window_start:
        facts.append(f"the audit window starts at the repository's first backup ({iso(min(evidence))}), "
                     f"not {policy.audit.window_days} days back")
        window_start = min(evidence)

    candidates = [Candidate(b.id, b.kind, b.started_at) for b in present]
    present_ids = {b.id for b in present}
    candidates += [Candidate(d.id, d.kind, d.started_at, True) for d in gone
                   if d.started_at and d.completed and d.id not in present_ids]
    slots = schedule_adherence(candidates, policy, window_start, now)
    for sched in ALL_KINDS:
        missed = [s for s in slots if s.schedule == sched and s.status == "missed"]
        late = [s for s in slots if s.schedule == sched and s.status == "late"]
        if missed:
            shown = ", ".join(iso(s.slot) or "" for s in missed[:5])
            findings.append(Finding("critical", "schedule", f"{len(missed)} {sched} slot(s) missed: {shown}"
                                    + (" ..." if len(missed) > 5 else "")))
        if late:
            shown = ", ".join(f"{iso(s.slot)} by {s.backup_id}" for s in late[:3])
            findings.append(Finding("warning", "schedule", f"{len(late)} {sched} slot(s) taken late: {shown}"
                                    + (" ..." if len(late) > 3 else "")))

    plan = plan_retention(present, policy, now)
    checked, restored = _verification_index(verifications, now)
    rows: list[BackupRow] = []
    overdue: list[tuple[str, datetime]] = []
    for b in sorted(present, key=lambda b: (b.started_at, b.id)):
        d = plan.decision(b.id)
        expiry = effective_expiry(b, policy)
        if d.delete:
            state = "overdue"
            if now - expiry > timedelta(days=1):
                overdue.append((b.id, expiry))
        elif expiry <= now:
            state = "kept past expiry"
        else:
            state = "retained"
        chk, rst = checked.get(b.id), restored.get(b.id)
        rows.append(BackupRow(b.id, b.kind, b.database, b.parent_id, b.started_at, b.finished_at, b.size_bytes,
                              expiry, b.lock_mode, b.lock_until, chk[0] if chk else None,
                              chk[1] if chk else None, rst[0] if rst else None, rst[1] if rst else None,
                              state, d.reasons))
        missing = sorted(dep for dep in b.deps if dep not in present_ids)
        if missing:
            findings.append(Finding("critical", "integrity", f"{b.id} needs {', '.join(missing)}, "
                                                             "which is not in the repository: it cannot be restored"))
        if policy.object_lock.mode != "none" and expiry > now:
            if not b.lock_until:
                findings.append(Finding("critical", "immutability",
                                        f"{b.id} is not under Object Lock although the policy requires "
                                        f"{policy.object_lock.mode} mode"))
            elif b.lock_until < b.expires_at - timedelta(minutes=1):
                findings.append(Finding("warning", "immutability",
                                        f"{b.id} is locked only until {iso(b.lock_until)}, before its expiry "
                                        f"{iso(b.expires_at)}"))
        if chk is not None and not chk[1]:
            findings.append(Finding("critical", "verification",
                                    f"{b.id}: its last checksum verification ({iso(chk[0])}) failed"))
    if overdue:
        oldest_id, oldest = min(overdue, key=lambda o: o[1])
        findings.append(Finding("warning", "retention",
                                f"{len(overdue)} backup(s) kept more than a day past expiry without a rule "
                                f"requiring it (longest: {oldest_id}, expired {iso(oldest)}): retention is not "
                                "being applied; run 'backup-tool retention apply'"))
    if policy.object_lock.mode != "none" and lock_supported is False:
        findings.append(Finding("critical", "immutability", f"the policy requires Object Lock "
                                f"({policy.object_lock.mode}) but the repository does not support it"))

    for entry in gone:
        if entry.expires_at and entry.at < entry.expires_at:
            findings.append(Finding("critical", "retention", f"{entry.id} ({entry.kind}) was deleted at "
                                                             f"{iso(entry.at)}, before its expiry {iso(entry.expires_at)}"))
        if entry.id in present_ids and entry.completed:
            findings.append(Finding("warning", "retention", f"{entry.id} is logged as deleted at {iso(entry.at)} "
                                                            "but is still listed: the deletion was interrupted"))

    logical_full = [r for r in rows if r.kind == BackupKind.FULL]
    if logical_full and logical_full[-1].last_verified is None:
        findings.append(Finding("warning", "verification", f"the newest full {logical_full[-1].id} has never "
                                                           "been verified ('backup-tool verify latest')"))
    window_tests = [v for v in verifications if v.restore_test and window_start <= v.at <= now]
    if present and not any(v.ok for v in window_tests):
        findings.append(Finding("warning", "verification", "no successful restore test in the audit window "
                                                           "('backup-tool verify latest --restore-test')"))
    done = [v for v in verifications if v.at <= now]
    if done and not done[-1].ok:
        findings.append(Finding("critical", "verification", f"the last verification run ({iso(done[-1].at)}) failed"))

    pitr = _pitr(present, wal, policy, now)
    if pitr.in_use:
        if pitr.gaps:
            first, last = pitr.gaps[0]
            findings.append(Finding("critical", "pitr", f"{len(pitr.gaps)} gap(s) in the WAL archive, first "
                                                        f"{first}..{last}: recovery cannot cross them"))
        if pitr.recoverable_from is None or pitr.recoverable_from > pitr.window_start:
            findings.append(Finding("critical" if policy.schedule.base else "warning", "pitr",
                                    f"the PITR window ({policy.retention.pitr_days} days, from "
                                    f"{iso(pitr.window_start)}) is covered only from {iso(pitr.recoverable_from)}"))
    elif policy.schedule.base:
        findings.append(Finding("critical", "pitr", "base backups are scheduled but there is none: "
                                                    "point-in-time recovery is impossible"))

    runs = sorted(retention_runs)
    return AuditReport(now, repository, policy.to_dict(), window_start, now, tuple(rows), tuple(slots),
                       tuple(gone), tuple(v for v in verifications if v.at <= now), pitr,
                       tuple(sorted(findings, key=lambda f: (f.severity != "critical", f.area))),
                       tuple(facts), len(runs), runs[-1] if runs else None)


def _pitr(present: Sequence[BackupRecord], wal: WalState | None, policy: Policy, now: datetime) -> Pitr:
    window_start = now - timedelta(days=policy.retention.pitr_days)
    bases = sorted((b for b in present if b.kind == BackupKind.BASE), key=lambda b: b.started_at)
    names = sorted(n for n in (wal.names if wal else ()) if len(n) == 24)
    in_use = bool(bases or names)
    if not in_use:
        return Pitr(False, window_start, (), None, None, 0, None, (), None, None)
    seg_size = bases[-1].wal_segment_size if bases else DEFAULT_SEGMENT_SIZE

    def pos(name: str | None) -> int:
        return segment_number(name, seg_size) if name else -1

    names = sorted(names, key=pos)
    gaps = tuple(wal_gap_ranges(present, wal)) if wal else ()
    recoverable_from = None
    if bases and names:
        first = pos(names[0])
        after_gaps = max((pos(g[1]) for g in gaps), default=-1)
        usable = [b for b in bases
                  if (b.start_wal and first <= pos(b.start_wal) and pos(b.start_wal) > after_gaps)
                  or (not b.start_wal and not gaps)]
        if usable:
            recoverable_from = usable[0].finished_at or usable[0].started_at
    newest = wal.newest_modified if wal else None
    return Pitr(True, window_start, tuple(b.id for b in bases), names[0] if names else None,
                names[-1] if names else None, len(names), newest, gaps, recoverable_from,
                newest if recoverable_from else None)

