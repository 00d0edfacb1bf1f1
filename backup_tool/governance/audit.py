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
  that is overdue is a warning (:func:`backup_tool.governance.health.status_checks`).

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
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backup_tool.core.cron import next_slot, slots_between
from backup_tool.core.kinds import ALL_KINDS, BackupKind
from backup_tool.core.timestamps import iso_seconds as iso
from backup_tool.core.timestamps import seconds_in
from backup_tool.core.walnames import DEFAULT_SEGMENT_SIZE, segment_number
from backup_tool.governance.due import meet_slot
from backup_tool.governance.retention import BackupRecord, effective_expiry, plan_retention
from backup_tool.governance.status import Verification, WalState, wal_gap_ranges
from backup_tool.repository.retention_log import LogEntry
from backup_tool.repository.storage.base import AtRest

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
    judged by :func:`backup_tool.governance.due.meet_slot`, the rule run-due decides by."""
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
    taken and how the store keeps it; ``repo_state`` is the digest of the repository state read.
    One function below per promise: schedule, each backup (retention, immutability, integrity,
    checksums), deletions, verification, PITR."""
    present = [b for b in backups if b.started_at <= now]
    gone = [d for d in deletions if d.started_at is None or d.started_at <= now]
    evidence = [b.started_at for b in present] + [d.started_at for d in gone if d.started_at]
    window_start = now - timedelta(days=policy.audit.window_days)
    facts = list(facts)
    if evidence and min(evidence) > window_start:
        facts.append(f"the audit window starts at the repository's first backup ({iso(min(evidence))}), "
                     f"not {policy.audit.window_days} days back")
        window_start = min(evidence)
    present_ids = {b.id for b in present}
    candidates = [Candidate(b.id, b.kind, b.started_at) for b in present]
    candidates += [Candidate(d.id, d.kind, d.started_at, True) for d in gone
                   if d.started_at and d.completed and d.id not in present_ids]
    slots = schedule_adherence(candidates, policy, window_start, now)
    findings = _schedule_findings(slots)
    rows, backup_findings = _backup_rows(present, verifications, policy, now, backup_evidence or {})
    findings += backup_findings
    if policy.object_lock.mode != "none" and lock_supported is False:
        findings.append(Finding("critical", "immutability", f"the policy requires Object Lock "
                                f"({policy.object_lock.mode}) but the repository does not support it"))
    findings += _deletion_findings(gone, present_ids)
    findings += _verification_findings(rows, present, verifications, window_start, now)
    pitr = _pitr(present, wal, policy, now)
    findings += _pitr_findings(pitr, policy)
    runs = sorted(retention_runs)
    return AuditReport(now, repository, policy.to_dict(), window_start, now, tuple(rows), tuple(slots),
                       tuple(gone), tuple(v for v in verifications if v.at <= now), pitr,
                       tuple(sorted(findings, key=lambda f: (f.severity != "critical", f.area))),
                       tuple(seconds_in(f) for f in facts), len(runs), runs[-1] if runs else None,
                       tool_version=tool_version, repository_state=repo_state)


def _schedule_findings(slots: Sequence[SlotResult]) -> list[Finding]:
    """Missed slots are critical, late ones a warning, per schedule."""
    findings: list[Finding] = []
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
    return findings


def _backup_rows(present: Sequence[BackupRecord], verifications: Sequence[Verification], policy: Policy,
                 now: datetime, by_id: Mapping[str, BackupEvidence]) -> tuple[list[BackupRow], list[Finding]]:
    """One row per backup with its retention state, and the findings about each backup:
    kept long past expiry, lock weaker than recorded or required, a missing dependency, a
    failed checksum verification."""
    plan = plan_retention(present, policy, now)
    checked, restored = _verification_index(verifications, now)
    present_ids = {b.id for b in present}
    rows: list[BackupRow] = []
    findings: list[Finding] = []
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
        findings += _immutability_findings(b, ev, expiry, policy, now)
        missing = sorted(dep for dep in b.deps if dep not in present_ids)
        if missing:
            findings.append(Finding("critical", "integrity", f"{b.id} needs {', '.join(missing)}, "
                                                             "which is not in the repository: it cannot be restored"))
        if chk is not None and not chk[1]:
            findings.append(Finding("critical", "verification",
                                    f"{b.id}: its last checksum verification ({iso(chk[0])}) failed"))
    if overdue:
        oldest_id, oldest = min(overdue, key=lambda o: o[1])
        findings.append(Finding("warning", "retention",
                                f"{len(overdue)} backup(s) kept more than a day past expiry without a rule "
                                f"requiring it (longest: {oldest_id}, expired {iso(oldest)}): retention is not "
                                "being applied; run 'backup-tool retention apply'"))
    return rows, findings


def _immutability_findings(b: BackupRecord, ev: BackupEvidence, expiry: datetime, policy: Policy,
                           now: datetime) -> list[Finding]:
    """The store holding less lock than the backup records; no lock, or one ending before the
    expiry, where the policy requires Object Lock."""
    findings: list[Finding] = []
    store_lock = ev.at_rest.lock if ev.at_rest is not None and ev.at_rest.applicable else None
    if ev.at_rest is not None and ev.at_rest.applicable and b.lock_until and b.lock_until > now and (
            store_lock is None or (not store_lock.legal_hold
                                   and store_lock.retain_until < b.lock_until - timedelta(minutes=1))):
        findings.append(Finding("critical", "immutability",
                                f"{b.id} records Object Lock until {iso(b.lock_until)} but the store holds "
                                + (f"its manifest only until {iso(store_lock.retain_until)}" if store_lock
                                   else "no lock on its manifest")))
    if policy.object_lock.mode != "none" and expiry > now:
        if not b.lock_until:
            findings.append(Finding("critical", "immutability",
                                    f"{b.id} is not under Object Lock although the policy requires "
                                    f"{policy.object_lock.mode} mode"))
        elif b.lock_until < b.expires_at - timedelta(minutes=1):
            findings.append(Finding("warning", "immutability",
                                    f"{b.id} is locked only until {iso(b.lock_until)}, before its expiry "
                                    f"{iso(b.expires_at)}"))
    return findings


def _deletion_findings(gone: Sequence[LogEntry], present_ids: set[str]) -> list[Finding]:
    """A deletion before expiry is critical; a logged deletion of a backup still listed, a warning."""
    findings: list[Finding] = []
    for entry in gone:
        if entry.expires_at and entry.at < entry.expires_at:
            findings.append(Finding("critical", "retention", f"{entry.id} ({entry.kind}) was deleted at "
                                                             f"{iso(entry.at)}, before its expiry {iso(entry.expires_at)}"))
        if entry.id in present_ids and entry.completed:
            findings.append(Finding("warning", "retention", f"{entry.id} is logged as deleted at {iso(entry.at)} "
                                                            "but is still listed: the deletion was interrupted"))
    return findings


def _verification_findings(rows: Sequence[BackupRow], present: Sequence[BackupRecord],
                           verifications: Sequence[Verification], window_start: datetime,
                           now: datetime) -> list[Finding]:
    """The newest full never verified, no successful restore test in the window, the last run failed."""
    findings: list[Finding] = []
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
    return findings


def _pitr_findings(pitr: Pitr, policy: Policy) -> list[Finding]:
    """Gaps in the WAL archive, a PITR window not covered, base backups scheduled but none taken."""
    if not pitr.in_use:
        return [Finding("critical", "pitr", "base backups are scheduled but there is none: "
                                            "point-in-time recovery is impossible")] if policy.schedule.base else []
    findings: list[Finding] = []
    if pitr.gaps:
        first, last = pitr.gaps[0]
        findings.append(Finding("critical", "pitr", f"{len(pitr.gaps)} gap(s) in the WAL archive, first "
                                                    f"{first}..{last}: recovery cannot cross them"))
    if pitr.recoverable_from is None or pitr.recoverable_from > pitr.window_start:
        findings.append(Finding("critical" if policy.schedule.base else "warning", "pitr",
                                f"the PITR window ({policy.retention.pitr_days} days, from "
                                f"{iso(pitr.window_start)}) is covered only from {iso(pitr.recoverable_from)}"))
    return findings


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


