"""The compliance audit: the document an auditor files, built from the repository alone.

It states the policy in force and, over the audit window (``audit.window_days`` back from
``now``, but not before the repository's first backup), gives evidence for each promise:

* **schedule adherence** — every slot the policy's cron expressions expected, and the backup
  that met it, by :func:`backup_tool.jobs.schedule.meet_slot` (the rule run-due decides by): a
  full slot by a full started in [slot, next slot), an incremental slot by an incremental or
  a full; *met* within the grace, *late* after it; one with no backup is *missed*; one whose
  grace has not ended is *pending*. Backups since deleted by retention still count (from the
  deletion log).
* **retention adherence** — backups kept past expiry with the rule that kept them, backups
  overdue for deletion with no such rule, and any deletion before expiry (from the
  append-only ``retention-log/``).
* **immutability** — each backup's Object Lock mode and retain-until date against the policy.
* **verification** — when each backup's checksums were last re-read and last restore-tested,
  how long that restore and its validation took, and which backups each run covered (from
  ``verifications/``; a duration a record predates says "not recorded").
* **scope and protection** — the tool version; each database, ``host:port`` and cluster (system
  identifier) the backups come from; per backup its client-side key id and the server-side
  encryption and Object Lock the store reports for its manifest now (a recorded lock the store
  does not hold is critical); a digest of the repository state read (:class:`RepositoryState`).
* **PITR coverage** — base backups, the WAL range and its gaps, against the PITR window.
* **health checks** — the seed's table (check, frequency, last status, last run, next check)
  from ``health-log/``, and every failed run in the window; a check whose newest run failed or
  that is overdue is a warning (:func:`backup_tool.jobs.health.status_checks`).

Findings are *critical* (a promise broken) or *warnings*; the verdict is NON-COMPLIANT with
any critical finding, COMPLIANT WITH WARNINGS with warnings only, COMPLIANT otherwise.
:func:`build_report` is pure; :func:`collect` reads the repository; the renderers produce
JSON, Markdown, or one self-contained HTML page (inline CSS and SVG, no external assets), the
last two from the same :func:`sections`, where an empty section says "none". Every time in
every format is ``2026-11-25T02:00:00Z`` (UTC, to the second). :func:`run_audit` writes the
report with its SHA-256 beside it (``FILE.sha256``, ``sha256sum -c`` format).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from backup_tool import __version__
from backup_tool.errors import BackupToolError, UsageError
from backup_tool.governance.status import Verification, WalState, wal_gap_ranges
from backup_tool.repository.storage.base import AtRest
from backup_tool.core.walnames import DEFAULT_SEGMENT_SIZE, segment_number
from backup_tool.governance.retention import (
    BackupRecord,
    LogEntry,
    effective_expiry,
    plan_retention,
)
from backup_tool.jobs.schedule import meet_slot, next_slot, slots_between
from backup_tool.core.timestamps import iso_seconds as iso
from backup_tool.core.timestamps import parse_utc, seconds_in

if TYPE_CHECKING:
    from backup_tool.repository.catalog_index import IndexEntry
    from backup_tool.repository.storage import Storage
    from backup_tool.config.settings import Settings
    from backup_tool.config.policy import Policy

UTC = timezone.utc
FORMATS = ("json", "markdown", "html")


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


NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class BackupEvidence:
    """What the audit shows of one backup beyond its retention record: where it was taken
    (None: not recorded, a backup older than the field) and how the store keeps it at rest
    (``at_rest`` None: not read)."""

    host: str | None = None
    system_identifier: str | None = None
    tool_version: str | None = None
    encryption_key_id: str | None = None
    at_rest: AtRest | None = None


@dataclass(frozen=True)
class Scope:
    """One source the audited backups come from: a database on a host, in a cluster (the
    server's system identifier); None where the backups do not record it."""

    database: str
    host: str | None
    system_identifier: str | None
    backups: int
    first: datetime
    last: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database, "host": self.host, "system_identifier": self.system_identifier,
                "backups": self.backups, "first": iso(self.first), "last": iso(self.last)}


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
    evidence: BackupEvidence = BackupEvidence()
    last_restore_test_seconds: float | None = None

    def encryption_text(self) -> str:
        """Encryption at rest in words: the client-side key id and the store's SSE."""
        e = self.evidence
        client = f"client-side key {e.encryption_key_id}" if e.encryption_key_id else "no client-side encryption"
        rest = e.at_rest
        if rest is None:
            sse = "SSE not read"
        elif not rest.applicable:
            sse = "no SSE (local directory)"
        elif rest.sse:
            sse = f"SSE {rest.sse}" + (f" (KMS key {rest.sse_kms_key_id})" if rest.sse_kms_key_id else "")
        else:
            sse = "no SSE reported by the store"
        return f"{client}; {sse}"

    def lock_text(self) -> str:
        """Object Lock as the backup records it and as the store reports it on its manifest."""
        recorded = f"{self.lock_mode} until {iso(self.lock_until)}" if self.lock_until else "none"
        rest = self.evidence.at_rest
        if rest is None or not rest.applicable:
            return f"{recorded} (recorded)" if self.lock_until else "none"
        lock = rest.lock
        store = ("legal hold" if lock and lock.legal_hold else
                 f"{lock.mode} until {iso(lock.retain_until)}" if lock else "none")
        return f"{store} (store); {recorded} (recorded)"

    def to_dict(self) -> dict[str, Any]:
        e, rest = self.evidence, self.evidence.at_rest
        store_lock = None
        if rest is not None and rest.applicable:
            store_lock = {"mode": rest.lock.mode if rest.lock else None,
                          "retain_until": iso(rest.lock.retain_until) if rest.lock and not rest.lock.legal_hold
                          else None, "legal_hold": bool(rest.lock and rest.lock.legal_hold)}
        return {"id": self.id, "kind": self.kind, "database": self.database, "parent_id": self.parent_id,
                "host": e.host, "system_identifier": e.system_identifier, "tool_version": e.tool_version,
                "started_at": iso(self.started_at), "finished_at": iso(self.finished_at),
                "size_bytes": self.size_bytes, "expires_at": iso(self.expires_at),
                "lock_mode": self.lock_mode, "lock_until": iso(self.lock_until), "store_lock": store_lock,
                "encryption": {"client_side_key_id": e.encryption_key_id,
                               "sse": None if rest is None or not rest.applicable else rest.sse,
                               "sse_kms_key_id": None if rest is None else rest.sse_kms_key_id,
                               "text": self.encryption_text()},
                "last_verified_at": iso(self.last_verified), "last_verified_ok": self.last_verified_ok,
                "last_restore_test_at": iso(self.last_restore_test),
                "last_restore_test_ok": self.last_restore_test_ok,
                "last_restore_test_seconds": self.last_restore_test_seconds,
                "retention": self.retention, "retention_reasons": [seconds_in(r) for r in self.reasons]}


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
class RepositoryState:
    """A digest of the repository state the report was built from: sha256 of the lines
    ``manifests/<id>.json <manifest_sha256>`` (one per backup, sorted, each ending in a
    newline), the manifest's own canonical sha256 being the one it records. Recomputable
    from a copy of ``manifests/`` alone (README, Audit)."""

    sha256: str
    manifests: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "manifests": self.manifests,
                "covers": "sha256 of the sorted lines 'manifests/<id>.json <manifest_sha256>\\n'"}


def repository_state(manifests: Sequence[tuple[str, str]]) -> RepositoryState:
    """The :class:`RepositoryState` of (manifest key, manifest sha256) pairs (pure)."""
    lines = "".join(f"{key} {sha}\n" for key, sha in sorted(manifests))
    return RepositoryState(hashlib.sha256(lines.encode()).hexdigest(), len(manifests))


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
    tool_version: str = ""
    repository_state: RepositoryState | None = None

    @property
    def scope(self) -> tuple[Scope, ...]:
        """Each database/host/cluster the backups in the report come from, oldest first."""
        groups: dict[tuple[str, str | None, str | None], list[BackupRow]] = {}
        for b in self.backups:
            groups.setdefault((b.database, b.evidence.host, b.evidence.system_identifier), []).append(b)
        found = [Scope(db, host, sysid, len(rows), min(r.started_at for r in rows), max(r.started_at for r in rows))
                 for (db, host, sysid), rows in groups.items()]
        return tuple(sorted(found, key=lambda s: (s.first, s.database)))

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
            "tool_version": self.tool_version,
            "repository": self.repository, "policy": self.policy,
            "repository_state": self.repository_state.to_dict() if self.repository_state else None,
            "scope": [s.to_dict() for s in self.scope],
            "window": {"start": iso(self.window_start), "end": iso(self.window_end)},
            "findings": [f.to_dict() for f in self.findings], "facts": [seconds_in(f) for f in self.facts],
            "schedule": {"counts": self.slot_counts(), "slots": [s.to_dict() for s in self.slots]},
            "backups": [b.to_dict() for b in self.backups],
            "deletions": [{"id": d.id, "kind": d.kind, "started_at": iso(d.started_at), "deleted_at": iso(d.at),
                           "expires_at": iso(d.expires_at), "reasons": [seconds_in(r) for r in d.reasons],
                           "policy": d.policy,
                           "completed": d.completed, "run": d.run} for d in self.deletions],
            "retention_runs": self.retention_runs, "last_retention_run": iso(self.last_retention_run),
            "verifications": [{"at": iso(v.at), "ok": v.ok, "backups": list(v.backups),
                               "restore_test": v.restore_test,
                               "restore_tests": [{"backup": t.backup, "ok": t.ok, "seconds": t.seconds}
                                                 for t in v.restore_tests] if v.restore_tests is not None else None}
                              for v in self.verifications],
            "pitr": self.pitr.to_dict(),
            "schema_drift": self.schema_drift,
            "health": self.health,
        }


# ----------------------------------------------------------------------------- pure parts


def schedule_adherence(candidates: Sequence[Candidate], policy: Policy, start: datetime,
                       now: datetime) -> list[SlotResult]:
    """Every slot in [start, now] with the backup that met it, or why not (pure); each slot is
    judged by :func:`backup_tool.jobs.schedule.meet_slot`, the rule run-due decides by."""
    s = policy.schedule
    grace = timedelta(minutes=s.grace_minutes)
    results: list[SlotResult] = []
    for schedule, expr in (("full", s.full), ("incremental", s.incremental), ("base", s.base)):
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
                        ) -> tuple[dict[str, tuple[datetime, bool]], dict[str, tuple[datetime, bool, float | None]]]:
    """Per backup, the newest checksum verification (at, ok) and restore test (at, ok, seconds;
    seconds None in a record from before durations were kept)."""
    checked: dict[str, tuple[datetime, bool]] = {}
    restored: dict[str, tuple[datetime, bool, float | None]] = {}
    for v in sorted(verifications, key=lambda v: v.at):
        if v.at > now:
            continue
        seconds = {t.backup: t.seconds for t in v.restore_tests or ()}
        for c in v.checks:
            name = str(c.get("name", ""))
            kind, _, backup_id = name.partition(" ")
            if kind == "objects" and backup_id:
                checked[backup_id] = (v.at, bool(c.get("ok")))
            elif kind == "restore_test" and backup_id:
                restored[backup_id] = (v.at, bool(c.get("ok")), seconds.get(backup_id))
    return checked, restored


def build_report(backups: Sequence[BackupRecord], deletions: Sequence[LogEntry],
                 verifications: Sequence[Verification], wal: WalState | None, policy: Policy,
                 now: datetime, repository: str = "", facts: Sequence[str] = (),
                 retention_runs: Sequence[datetime] = (), lock_supported: bool | None = None,
                 backup_evidence: Mapping[str, BackupEvidence] | None = None, tool_version: str = "",
                 repo_state: RepositoryState | None = None) -> AuditReport:
    """The audit at ``now`` (pure). ``backup_evidence`` (by backup id) says where each backup was
    taken and how the store keeps it; ``repo_state`` is the digest of the repository state read."""
    by_id = backup_evidence or {}
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
    for sched in ("full", "incremental", "base"):
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
        ev = by_id.get(b.id, BackupEvidence())
        rows.append(BackupRow(b.id, b.kind, b.database, b.parent_id, b.started_at, b.finished_at, b.size_bytes,
                              expiry, b.lock_mode, b.lock_until, chk[0] if chk else None,
                              chk[1] if chk else None, rst[0] if rst else None, rst[1] if rst else None,
                              state, tuple(seconds_in(r) for r in d.reasons), ev, rst[2] if rst else None))
        store_lock = ev.at_rest.lock if ev.at_rest is not None and ev.at_rest.applicable else None
        if ev.at_rest is not None and ev.at_rest.applicable and b.lock_until and b.lock_until > now and (
                store_lock is None or (not store_lock.legal_hold
                                       and store_lock.retain_until < b.lock_until - timedelta(minutes=1))):
            findings.append(Finding("critical", "immutability",
                                    f"{b.id} records Object Lock until {iso(b.lock_until)} but the store holds "
                                    + (f"its manifest only until {iso(store_lock.retain_until)}" if store_lock
                                       else "no lock on its manifest")))
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

    logical_full = [r for r in rows if r.kind == "full"]
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
                       tuple(seconds_in(f) for f in facts), len(runs), runs[-1] if runs else None,
                       tool_version=tool_version, repository_state=repo_state)


def _pitr(present: Sequence[BackupRecord], wal: WalState | None, policy: Policy, now: datetime) -> Pitr:
    window_start = now - timedelta(days=policy.retention.pitr_days)
    bases = sorted((b for b in present if b.kind == "base"), key=lambda b: b.started_at)
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


# ----------------------------------------------------------------------------- reading the repository


def collect(settings: Settings, now: datetime | None = None) -> AuditReport:
    """Read the repository (manifests, deletion log, verifications, WAL) and build the audit."""
    from backup_tool.repository.catalog import REFUSED, Catalog, manifest_key
    from backup_tool.governance.status import read_verifications, read_wal_state
    from backup_tool.governance.retention import read_log
    from backup_tool.repository.storage import open_repository

    generated = datetime.now(UTC)
    now = now or generated
    storage = open_repository(settings.repo_url)
    entries, problems = Catalog(storage).entries()
    records = [e.backup_record() for e in entries]
    runs, deletions, log_problems = read_log(storage)
    facts = [f"{'refused' if isinstance(p, REFUSED) else 'unreadable'} manifest: {p.message}"
             for p in problems] + log_problems
    evidence, unread = _evidence(storage, entries, manifest_key)
    if unread:
        facts.append(f"server-side encryption and Object Lock not read for {len(unread)} backup(s) "
                     f"({unread[0]})")
    state = repository_state([(manifest_key(e.id), e.manifest_sha256) for e in entries])
    try:
        lock_supported = storage.object_lock_enabled()
    except BackupToolError:
        lock_supported = None
    wal = read_wal_state(storage)
    if wal is None:
        facts.append("this build has no WAL archive support: PITR coverage not assessed")
    report = build_report(records, deletions,
                          read_verifications(storage), wal, settings.policy, now, storage.url, facts,
                          [parse_utc(r["at"]) for r in runs if r.get("at")],
                          lock_supported, evidence, __version__, state)
    if problems:
        report = replace(report, findings=report.findings + (
            Finding("critical", "integrity", f"{len(problems)} manifest(s) cannot be read or are not "
                    "authenticated"),))
    if settings.policy.schema.migrations:
        from backup_tool.schema.drift import summary_for_audit

        drift = summary_for_audit(settings)
        if drift.get("ok") is False:
            report = replace(report, findings=report.findings + (Finding("warning", "schema", drift["line"]),))
        elif drift.get("ok") is None:
            report = replace(report, facts=report.facts + (drift["line"],))
        report = replace(report, schema_drift=drift)
    report = _with_health(report, storage, settings, now)
    return replace(report, generated_at=generated)


def _evidence(storage: Storage, entries: Sequence[IndexEntry], key_of: Callable[[str], str]
              ) -> tuple[dict[str, BackupEvidence], list[str]]:
    """Each backup's source and at-rest evidence: the manifest's summary, and one HEAD of its
    manifest object (in parallel: one request per backup); ids whose HEAD failed are returned."""
    from concurrent.futures import ThreadPoolExecutor

    def head(entry: IndexEntry) -> AtRest | None:
        try:
            return storage.at_rest(key_of(entry.id))
        except BackupToolError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        at_rest = list(pool.map(head, entries))
    found: dict[str, BackupEvidence] = {}
    for entry, rest in zip(entries, at_rest):
        summary = entry.summary
        found[entry.id] = BackupEvidence(summary.get("host") or None, summary.get("system_identifier") or None,
                                         summary.get("tool_version") or None,
                                         summary.get("encryption_key_id") or entry.key_id, rest)
    return found, [e.id for e, rest in zip(entries, at_rest) if rest is None]


def _with_health(report: AuditReport, storage: Any, settings: Settings, now: datetime) -> AuditReport:
    from backup_tool.jobs.health import audit_table, read_records, records_for, status_checks

    found, problems = read_records(storage)
    records = records_for(settings, found)
    findings = tuple(Finding("warning", "health", s.detail)
                     for s in status_checks(records, settings.policy, now) if s.severity)
    return replace(report, health=audit_table(records, settings.policy, now, report.window_start),
                   findings=report.findings + findings, facts=report.facts + tuple(problems))


def _ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


SIDECAR_SUFFIX = ".sha256"


@dataclass(frozen=True)
class WrittenAudit:
    """A rendered report; with ``output`` it was written there, and its SHA-256 beside it in
    ``<output>.sha256`` in ``sha256sum`` format (``sha256sum -c`` verifies it)."""

    report: AuditReport
    text: str
    sha256: str
    output: str | None = None

    @property
    def sidecar(self) -> str | None:
        return self.output + SIDECAR_SUFFIX if self.output else None


def run_audit(settings: Settings, now: datetime | None = None, fmt: str = "json",
              output: str | None = None) -> WrittenAudit:
    """Build the audit, render it, and write it to ``output`` with its ``.sha256`` sidecar;
    either both files are replaced or neither."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown audit format {fmt!r}", "use json, markdown or html")
    report = collect(settings, now)
    text = render(report, fmt, Path(output).name if output else None)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if output:
        path = Path(output)
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        tmp, tmp_sum = path.with_name(f".{path.name}.tmp"), path.with_name(f".{sidecar.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            tmp_sum.write_text(f"{digest}  {path.name}\n", encoding="utf-8")
            tmp.replace(path)
            tmp_sum.replace(sidecar)
        except OSError as exc:
            for leftover in (tmp, tmp_sum):
                leftover.unlink(missing_ok=True)
            raise BackupToolError(f"cannot write the audit to {path}: {exc.strerror}",
                                  "choose a writable --output path") from None
    return WrittenAudit(report, text, digest, output)


def render(report: AuditReport, fmt: str, output_name: str | None = None) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return render_markdown(report, output_name)
    return render_html(report, output_name)


# ----------------------------------------------------------------------------- Markdown


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _d(ts: datetime | None) -> str:
    return iso(ts) or "—"


def _ok(flag: bool | None, ts: datetime | None) -> str:
    if ts is None:
        return "never"
    return f"{_d(ts)} {'ok' if flag else 'FAILED'}"


def _policy_lines(report: AuditReport) -> list[tuple[str, str]]:
    p = report.policy
    s, r, lock = p["schedule"], p["retention"], p["object_lock"]
    return [
        ("policy", f"{p['name']} ({p['source']})"),
        ("full backups", f"cron `{s['full']}` ({s['timezone']}), kept {r['full_days']} days, at least {r['min_fulls']}"),
        ("incremental backups", f"cron `{s['incremental']}`, kept {r['incremental_days']} days, chains of at most "
                                f"{r['max_chain_length']}" if s["incremental"] else "not scheduled"),
        ("base backups / PITR", (f"cron `{s['base']}`, " if s.get("base") else "") + f"PITR window {r['pitr_days']} days"),
        ("grace", f"{s['grace_minutes']} minutes"),
        ("object lock", lock["mode"]),
    ]


@dataclass(frozen=True)
class Table:
    """A table of a report section; without rows it renders as "none"."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Items:
    """A bulleted list; empty, it renders as "none"."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Section:
    """One section, the same in Markdown and HTML: both renderers draw :func:`sections`."""

    title: str
    blocks: tuple[Table | Items | Para, ...]


NONE = "none"


def _restore_test_text(at: datetime | None, ok: bool | None, seconds: float | None) -> str:
    if at is None:
        return "never"
    took = f" in {seconds:.1f} s" if seconds is not None else " (duration not recorded)"
    return f"{_d(at)} {'ok' if ok else 'FAILED'}{took}"


def _drills(report: AuditReport) -> list[tuple[str, str, str, str]]:
    """Every restore test in the report's verification runs: backup, when, result, duration."""
    rows = []
    for v in report.verifications:
        seconds = {t.backup: t for t in v.restore_tests or ()}
        for c in v.checks:
            kind, _, backup_id = str(c.get("name", "")).partition(" ")
            if kind != "restore_test" or not backup_id:
                continue
            t = seconds.get(backup_id)
            rows.append((backup_id, _d(v.at), "ok" if c.get("ok") else "FAILED",
                         f"{t.seconds:.1f} s" if t else NOT_RECORDED))
    return rows


def sections(report: AuditReport, output_name: str | None = None) -> list[Section]:
    """The report's sections in order; ``output_name`` is the file the report is written to
    (its hash is then in ``<output_name>.sha256``)."""
    state = report.repository_state
    meta = Items((
        f"Repository: {report.repository}",
        f"Evaluated at: {_d(report.now)} (generated {_d(report.generated_at)})",
        f"Audit window: {_d(report.window_start)} → {_d(report.window_end)}",
        f"Tool: backup-tool {report.tool_version or NOT_RECORDED}",
        (f"Repository state read: sha256 {state.sha256} of {state.manifests} manifest(s) (the sorted lines "
         "'manifests/<id>.json <manifest_sha256>')") if state else "Repository state read: not computed",
        (f"Report SHA-256: in {output_name}{SIDECAR_SUFFIX} beside this file ('sha256sum -c "
         f"{output_name}{SIDECAR_SUFFIX}' checks it)") if output_name else
        f"Report SHA-256: not kept (written to standard output; --output FILE keeps it in FILE{SIDECAR_SUFFIX})",
    ))
    out = [Section("Report", (meta,))]
    out.append(Section("Scope", (Table(
        ("database", "host", "cluster (system identifier)", "backups", "first", "last"),
        tuple((s.database, s.host or NOT_RECORDED, s.system_identifier or NOT_RECORDED, str(s.backups),
               _d(s.first), _d(s.last)) for s in report.scope)),)))
    findings: list[Table | Items | Para] = [Table(
        ("severity", "area", "finding"),
        tuple((f.severity.upper(), f.area, f.message) for f in report.findings),
        tuple("crit" if f.severity == "critical" else "warn" for f in report.findings))]
    if report.facts:
        findings += [Para("Notes:"), Items(report.facts)]
    if report.schema_drift:
        findings.append(Para(str(report.schema_drift.get("line", ""))))
    out.append(Section("Findings", tuple(findings)))
    out.append(Section("Policy in force", (Table(("setting", "value"), tuple(_policy_lines(report))),)))
    counts = report.slot_counts()
    out.append(Section("Schedule adherence", (
        Table(("schedule", "met", "late", "missed", "pending"),
              tuple((k, str(v["met"]), str(v["late"]), str(v["missed"]), str(v["pending"])) for k, v in counts.items())),
        Para(f"{sum(1 for s in report.slots if s.status in ('missed', 'late'))} slot(s) missed or late; every slot:"),
        Table(("slot", "schedule", "status", "backup", "taken"),
              tuple((_d(s.slot), s.schedule, s.status if s.status in ("met", "pending") else s.status.upper(),
                     (s.backup_id + (" (since deleted per retention)" if s.backup_deleted else "")) if s.backup_id
                     else "—", _d(s.backup_at)) for s in report.slots),
              tuple(s.status if s.status in ("missed", "late") else "" for s in report.slots)))))
    out.append(Section("Backups", (Table(
        ("id", "kind", "database", "taken", "size", "expires", "encryption at rest", "Object Lock",
         "checksums verified", "restore test", "retention"),
        tuple((b.id, b.kind, b.database, _d(b.started_at), _size(b.size_bytes), _d(b.expires_at),
               b.encryption_text(), b.lock_text(), _ok(b.last_verified_ok, b.last_verified),
               _restore_test_text(b.last_restore_test, b.last_restore_test_ok, b.last_restore_test_seconds),
               f"{b.retention}: {'; '.join(b.reasons)}") for b in report.backups)),)))
    past = [b for b in report.backups if b.retention != "retained"]
    out.append(Section("Retention adherence", (
        Para(f"Retention runs recorded: {report.retention_runs}, last {_d(report.last_retention_run)}."),
        Para("Kept past expiry:"),
        Items(tuple(f"{b.id} ({b.kind}, expired {_d(b.expires_at)}): {b.retention} — {'; '.join(b.reasons)}"
                    for b in past)),
        Para("Deletions (append-only log):"),
        Table(("id", "kind", "taken", "deleted", "expired", "why"),
              tuple((d.id, d.kind, _d(d.started_at),
                     _d(d.at) + (" EARLY" if d.expires_at and d.at < d.expires_at else ""), _d(d.expires_at),
                     "; ".join(d.reasons) + ("" if d.completed else " (failed)")) for d in report.deletions),
              tuple("missed" if d.expires_at and d.at < d.expires_at else "" for d in report.deletions)))))
    p = report.pitr
    out.append(Section("Point-in-time recovery", (Items((
        f"PITR window: {_d(p.window_start)} → {_d(report.now)}",
        f"Recoverable: {_d(p.recoverable_from)} → {_d(p.recoverable_to)}",
        f"Base backups: {', '.join(p.bases) or NONE}",
        f"WAL: {p.wal_segments} segments, {p.wal_first or '—'} … {p.wal_last or '—'}, newest archived "
        f"{_d(p.newest_wal_at)}",
        f"Gaps: {', '.join(f'{a}..{b}' for a, b in p.gaps) or NONE}") if p.in_use else ()),
        *(() if p.in_use else (Para("No base backups and no archived WAL."),)))))
    drills = _drills(report)
    timed = [float(r[3].split()[0]) for r in drills if r[3] != NOT_RECORDED]
    out.append(Section("Restore tests (recovery-time evidence)", (
        *((Para(f"{len(drills)} restore test(s); restore and validation took at most {max(timed):.1f} s"),)
          if timed else ()),
        Table(("backup", "tested at", "result", "restore + validation time"), tuple(drills)))))
    out.append(Section("Verification runs", (Table(
        ("at", "result", "backups covered", "restore test"),
        tuple((_d(v.at), "ok" if v.ok else "FAILED", ", ".join(v.backups) or NONE, "yes" if v.restore_test else "no")
              for v in report.verifications),
        tuple("" if v.ok else "missed" for v in report.verifications)),)))
    health = report.health
    out.append(Section("Health checks", (
        Table(("check", "frequency", "last status", "last run", "next check"),
              tuple((r["title"], r["frequency"], r["last_status"], _d(_ts(r["last_run"])), _d(_ts(r["next_check"])))
                    for r in (health or {}).get("checks", ())),
              tuple("missed" if r["last_status"] == "FAILED" else "" for r in (health or {}).get("checks", ()))),
        Para("Failed runs in the audit window:"),
        Items(tuple(f"{_d(_ts(f['at']))} {f['check']}: {f['detail']}" for f in (health or {}).get("failures", [])[:50])))))
    return out


def _md_cell(text: str) -> str:
    return seconds_in(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: AuditReport, output_name: str | None = None) -> str:
    out = [f"# Backup compliance audit — {report.verdict}"]
    for section in sections(report, output_name):
        out += ["", f"## {section.title}"]
        for block in section.blocks:
            out.append("")
            if isinstance(block, Para):
                out.append(seconds_in(block.text))
            elif isinstance(block, Items):
                out += [f"- {seconds_in(i)}" for i in block.items] or [f"- {NONE}"]
            elif block.rows:
                out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            else:
                out.append(NONE)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- HTML


COLORS = {"full": "#1f5fbf", "incremental": "#46a0e0", "base": "#7a4cc2", "met": "#2e7d32", "late": "#e0a100",
          "missed": "#c62828", "pending": "#9e9e9e", "wal": "#2e7d32", "pitr": "#e3f0ff"}

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2330;margin:0;background:#f4f6f9}
main{max-width:1320px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
.meta{color:#5a6475;margin-bottom:16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:12px 16px;min-width:150px}
.card b{display:block;font-size:22px}
.verdict{color:#fff;border:none}
.v-ok{background:#2e7d32}.v-warn{background:#b57f00}.v-bad{background:#c62828}
table{border-collapse:collapse;width:100%;background:#fff;font-size:12.5px}
th,td{border:1px solid #e1e5ec;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eef1f6}
.crit{color:#c62828;font-weight:600}.warn{color:#9a6b00;font-weight:600}
tr.crit td+td,tr.warn td+td{color:inherit;font-weight:normal}
.missed{background:#fdecec}.late{background:#fff6db}
.tl{background:#fff;border:1px solid #d8dde6;border-radius:8px;padding:8px}
details summary{cursor:pointer;color:#1f5fbf}
code{background:#eef1f6;padding:0 3px;border-radius:3px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


TICK_SPACING = 64
LEGEND_CHAR = 7.5  # px per character of an 11px label, wider than any common sans-serif face's average


def timeline_svg(report: AuditReport, width: int = 1260) -> str:
    """The timeline picture: slots, backups, retention spans, the PITR window and WAL coverage.
    Below the lanes, one row each: the date axis, the "now" label, then the legend (wrapped to
    the width), so no label can be drawn over another."""
    start, end = report.window_start, report.now
    span = max((end - start).total_seconds(), 3600.0)
    left, right = 130, 20
    plot = width - left - right
    lanes = [("Full slots", "slots-full"), ("Full backups", "full"), ("Incremental slots", "slots-incremental"),
             ("Incrementals", "incremental")]
    if report.policy["schedule"].get("base") or report.pitr.in_use:
        lanes += [("Base backups", "base"), ("WAL archive", "wal")]
    lane_h, top = 34, 34
    bottom = top + lane_h * len(lanes)
    legend = [("met", "slot met", "circle"), ("late", "slot late", "circle"), ("missed", "slot missed", "x"),
              ("pending", "pending", "circle"), ("full", "full (bar: kept until expiry)", "rect"),
              ("incremental", "incremental", "rect")] + ([("base", "base", "rect")] if any(k == "base" for _, k in lanes) else [])
    legend_at: list[tuple[float, float]] = []
    lx, ly = 8.0, bottom + 62.0
    for _, text, _ in legend:
        item = 14 + LEGEND_CHAR * len(text)
        if lx > 8 and lx + item > width - right:
            lx, ly = 8.0, ly + 18
        legend_at.append((lx, ly))
        lx += item + 18
    height = int(ly + 8)

    def x(ts: datetime) -> float:
        return left + plot * min(max((ts - start).total_seconds() / span, 0.0), 1.0)

    row = {key: top + i * lane_h for i, (_, key) in enumerate(lanes)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="backup timeline">',
             '<style>text{font:11px sans-serif;fill:#333}.lbl{font-weight:600}</style>']
    pitr_x = x(max(report.pitr.window_start, start))
    parts.append(f'<rect x="{pitr_x:.1f}" y="{top - 8}" width="{x(end) - pitr_x:.1f}" '
                 f'height="{lane_h * len(lanes) + 4}" fill="{COLORS["pitr"]}"/>')
    parts.append(f'<text x="{min(pitr_x + 4, width - right - 140):.1f}" y="{top - 12}" fill="#1f5fbf">PITR window '
                 f'({report.policy["retention"]["pitr_days"]} days)</text>')
    days = int(span // 86400) + 1
    step = max(1, math.ceil(TICK_SPACING / (plot * 86400 / span)))  # day labels at least TICK_SPACING px apart
    day0 = datetime(start.year, start.month, start.day, tzinfo=UTC)
    for i in range(0, days + 2, step):
        t = day0 + timedelta(days=i)
        if start <= t <= end:
            parts.append(f'<line x1="{x(t):.1f}" y1="{top - 8}" x2="{x(t):.1f}" y2="{bottom + 10}" '
                         'stroke="#e3e6eb"/>')
            parts.append(f'<text x="{x(t):.1f}" y="{bottom + 24}" text-anchor="middle">{t:%b %d}</text>')
    for label, key in lanes:
        y = row[key]
        parts.append(f'<text class="lbl" x="8" y="{y + 16}">{_e(label)}</text>')
        parts.append(f'<line x1="{left}" y1="{y + lane_h - 4}" x2="{width - right}" y2="{y + lane_h - 4}" '
                     'stroke="#eef0f3"/>')
    for s in report.slots:
        key = f"slots-{s.schedule}" if s.schedule != "base" else "base"
        if key not in row:
            continue
        cx, cy = x(s.slot), row[key] + 13
        color = COLORS[s.status]
        title = f"<title>{_e(s.schedule)} slot {_e(_d(s.slot))}: {_e(s.status)}" \
                f"{' — ' + _e(s.backup_id) if s.backup_id else ''}</title>"
        if s.status == "missed":
            parts.append(f'<g stroke="{color}" stroke-width="2.5">{title}<line x1="{cx - 5:.1f}" y1="{cy - 5}" '
                         f'x2="{cx + 5:.1f}" y2="{cy + 5}"/><line x1="{cx - 5:.1f}" y1="{cy + 5}" '
                         f'x2="{cx + 5:.1f}" y2="{cy - 5}"/></g>')
        else:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy}" r="4.5" fill="{color}">{title}</circle>')
    for b in report.backups:
        if b.kind not in row or b.started_at < start:
            continue
        bx = x(b.started_at)
        y = row[b.kind] + 4
        ex = x(min(b.expires_at, end))
        parts.append(f'<rect x="{bx:.1f}" y="{y + 9}" width="{max(ex - bx, 0):.1f}" height="4" '
                     f'fill="{COLORS[b.kind]}" opacity="0.25"/>')
        parts.append(f'<rect x="{bx - 2:.1f}" y="{y}" width="5" height="22" rx="1.5" fill="{COLORS[b.kind]}">'
                     f'<title>{_e(b.id)} ({_e(b.kind)}) {_e(_d(b.started_at))}, {_e(_size(b.size_bytes))}, '
                     f'expires {_e(_d(b.expires_at))}</title></rect>')
    for d in report.deletions:
        if d.kind in row and d.started_at and d.started_at >= start:
            bx = x(d.started_at)
            parts.append(f'<rect x="{bx - 2:.1f}" y="{row[d.kind] + 4}" width="5" height="22" rx="1.5" fill="none" '
                         f'stroke="{COLORS.get(d.kind, "#888")}" stroke-dasharray="2,2"><title>{_e(d.id)} '
                         f'deleted {_e(_d(d.at))}</title></rect>')
    if "wal" in row and report.pitr.recoverable_from:
        y = row["wal"] + 8
        x0, x1 = x(max(report.pitr.recoverable_from, start)), x(min(report.pitr.recoverable_to or end, end))
        parts.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 2):.1f}" height="12" rx="3" '
                     f'fill="{COLORS["wal"]}" opacity="0.8"><title>recoverable {_e(_d(report.pitr.recoverable_from))}'
                     f' to {_e(_d(report.pitr.recoverable_to))}</title></rect>')
    if "wal" in row and report.pitr.gaps:
        parts.append(f'<text x="{left + 4}" y="{row["wal"] + 30}" fill="{COLORS["missed"]}">'
                     f'{len(report.pitr.gaps)} WAL gap(s)</text>')
    nx = x(end)
    parts.append(f'<line x1="{nx:.1f}" y1="{top - 8}" x2="{nx:.1f}" y2="{bottom + 10}" stroke="#c62828" '
                 'stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{nx - 4:.1f}" y="{bottom + 40}" text-anchor="end" fill="#c62828">now {_e(_d(end))}</text>')
    for (key, text, shape), (lx, ly) in zip(legend, legend_at):
        c = COLORS[key]
        if shape == "circle":
            parts.append(f'<circle cx="{lx + 5:.1f}" cy="{ly - 4:.1f}" r="4" fill="{c}"/>')
        elif shape == "x":
            parts.append(f'<g stroke="{c}" stroke-width="2"><line x1="{lx + 1:.1f}" y1="{ly - 8:.1f}" '
                         f'x2="{lx + 9:.1f}" y2="{ly:.1f}"/><line x1="{lx + 1:.1f}" y1="{ly:.1f}" x2="{lx + 9:.1f}" '
                         f'y2="{ly - 8:.1f}"/></g>')
        else:
            parts.append(f'<rect x="{lx + 2:.1f}" y="{ly - 10:.1f}" width="5" height="11" fill="{c}"/>')
        parts.append(f'<text x="{lx + 14:.1f}" y="{ly:.1f}">{_e(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_block(block: Table | Items | Para) -> str:
    if isinstance(block, Para):
        return f"<p>{_e(seconds_in(block.text))}</p>"
    if isinstance(block, Items):
        return "<ul>" + ("".join(f"<li>{_e(seconds_in(i))}</li>" for i in block.items)
                         or f'<li class="none">{NONE}</li>') + "</ul>"
    if not block.rows:
        return f'<p class="none">{NONE}</p>'
    classes = block.row_classes or ("",) * len(block.rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in block.header)
    body = "".join((f'<tr class="{c}">' if c else "<tr>") + "".join(f"<td>{_e(seconds_in(cell))}</td>" for cell in row)
                   + "</tr>" for row, c in zip(block.rows, classes))
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: AuditReport, output_name: str | None = None) -> str:
    counts = report.slot_counts()
    verdict_class = {"COMPLIANT": "v-ok", "COMPLIANT WITH WARNINGS": "v-warn"}.get(report.verdict, "v-bad")
    crit = sum(1 for f in report.findings if f.severity == "critical")
    warn = sum(1 for f in report.findings if f.severity == "warning")
    met = sum(c["met"] for c in counts.values())
    total = sum(c["met"] + c["late"] + c["missed"] for c in counts.values())
    cards = [f'<div class="card verdict {verdict_class}">verdict<b>{_e(report.verdict)}</b></div>',
             f'<div class="card">slots met<b>{met} / {total}</b></div>',
             f'<div class="card">missed / late<b>{sum(c["missed"] for c in counts.values())} / '
             f'{sum(c["late"] for c in counts.values())}</b></div>',
             f'<div class="card">backups kept<b>{len(report.backups)}</b></div>',
             f'<div class="card">deleted (log)<b>{len(report.deletions)}</b></div>',
             f'<div class="card">findings<b>{crit} critical, {warn} warn</b></div>']
    body = ["<h1>Backup compliance audit</h1>", f'<div class="cards">{"".join(cards)}</div>']
    for i, section in enumerate(sections(report, output_name)):
        body.append(f'<section><h2>{_e(section.title)}</h2>{"".join(_html_block(b) for b in section.blocks)}</section>')
        if i == 0:
            body.append(f'<section><h2>Timeline</h2><div class="tl">{timeline_svg(report)}</div></section>')
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Backup audit — {_e(report.verdict)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
