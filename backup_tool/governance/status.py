"""Monitoring: one verdict with Nagios exit codes, and the metrics behind it.

:func:`evaluate` is a pure function of (backups, verification records, WAL archive state,
policy, now). Each rule compares the repository with the policy's schedule, read in its time
zone: a slot is *late* once its grace period (``schedule.grace_minutes``) has passed
without a backup taken at or after it.

* no full backup, or the newest full older than the last full slot past its grace: CRITICAL
* the newest backup older than the last incremental slot past its grace: WARNING
* base backups scheduled (``schedule.base``) and the last base slot missed: CRITICAL
* WAL archiving in use (base backups or WAL in the repository) and the newest segment older
  than ``monitoring.wal_max_age_minutes``, or a gap in the WAL needed by a base: CRITICAL
* the newest verification run failed: CRITICAL
* backups older than ``monitoring.verify_max_age_hours`` and no verification that recent:
  WARNING
* a health check (``[health]``, recorded in ``health-log/``) whose newest run failed, or whose
  newest slot passed its grace without a run: WARNING; overdue by more than one period:
  CRITICAL; never run: OK, "not run yet" (see :func:`backup_tool.governance.health.status_checks`)
* the repository cannot be read or does not exist (or the policy is broken): UNKNOWN

Reading the repository is :mod:`backup_tool.jobs.status`; the textfile,
:mod:`backup_tool.render.prometheus`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backup_tool.core.cron import last_due_slot
from backup_tool.core.kinds import ALL_KINDS, LOGICAL_KINDS, BackupKind
from backup_tool.core.timestamps import iso
from backup_tool.core.walnames import DEFAULT_SEGMENT_SIZE, segment_number
from backup_tool.governance.health import status_checks
from backup_tool.governance.walcoverage import archive_gaps
from backup_tool.repository.records import BackupRecord

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy
    from backup_tool.governance.health import HealthRecord

UTC = timezone.utc
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LEVELS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


@dataclass(frozen=True)
class RestoreTest:
    """One restore drill of a verification run: how long restoring and validating took."""

    backup: str
    ok: bool
    seconds: float


@dataclass(frozen=True)
class Verification:
    at: datetime
    ok: bool
    backups: tuple[str, ...]
    restore_test: bool
    checks: tuple[dict[str, Any], ...]
    key: str = ""
    restore_tests: tuple[RestoreTest, ...] | None = None  # None: a record from before durations were kept

    def failed_checks(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c.get("ok")]


@dataclass(frozen=True)
class WalState:
    """The WAL archive as seen in the repository (segment names, newest archive time)."""

    names: tuple[str, ...]
    newest_modified: datetime | None
    total_bytes: int = 0
    histories: Mapping[int, Sequence[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    name: str
    severity: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": LEVELS[self.severity], "ok": self.severity == OK,
                "detail": self.detail}


@dataclass(frozen=True)
class StatusReport:
    now: datetime
    repository: str
    checks: tuple[Check, ...]
    metrics: Mapping[str, Any]
    error: str | None = None

    @property
    def code(self) -> int:
        if self.error is not None:
            return UNKNOWN
        return max((c.severity for c in self.checks), default=OK)

    @property
    def summary(self) -> str:
        level = LEVELS[self.code]
        if self.error is not None:
            return f"BACKUP UNKNOWN - {self.error}"
        worst = [c for c in self.checks if c.severity == self.code and c.severity != OK]
        if worst:
            text = worst[0].detail
            others = sum(1 for c in self.checks if c.severity != OK) - 1
            if others:
                text += f" (+{others} more problem{'s' if others > 1 else ''})"
        else:
            text = "; ".join(c.detail for c in self.checks if c.name in ("full", "incremental", "wal"))
        return f"BACKUP {level} - {text} | {self.perfdata()}"

    def perfdata(self) -> str:
        m = self.metrics
        parts = []
        for kind in ALL_KINDS:
            age = m.get("age_seconds", {}).get(kind)
            if age is not None:
                parts.append(f"{kind}_age={int(age)}s")
        if m.get("wal_lag_seconds") is not None:
            parts.append(f"wal_lag={int(m['wal_lag_seconds'])}s")
        if m.get("verification_age_seconds") is not None:
            parts.append(f"verify_age={int(m['verification_age_seconds'])}s")
        parts.append(f"backups={m.get('backups', 0)}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"status": LEVELS[self.code], "code": self.code, "summary": self.summary,
                "now": iso(self.now), "repository": self.repository,
                "checks": [c.to_dict() for c in self.checks], "metrics": dict(self.metrics),
                "error": self.error}


def _age(now: datetime, ts: datetime) -> str:
    seconds = max(0.0, (now - ts).total_seconds())
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def evaluate(backups: Sequence[BackupRecord], verifications: Sequence[Verification], wal: WalState | None,
             policy: Policy, now: datetime, repository: str = "",
             health: Sequence[HealthRecord] = ()) -> StatusReport:
    """The monitoring verdict at ``now`` (pure); a backup counts from when it started.
    One rule per check, each below, in the order the verdict lists them."""
    present = sorted((b for b in backups if b.started_at <= now), key=lambda b: (b.started_at, b.id))
    newest: dict[str, BackupRecord] = {}
    for b in present:
        newest[b.kind] = b
    done = sorted((v for v in verifications if v.at <= now), key=lambda v: v.at)
    last_verify = done[-1] if done else None
    checks = [_full_check(newest.get(BackupKind.FULL), policy, now)]
    logical = [b for b in present if b.kind in LOGICAL_KINDS]
    if policy.schedule.incremental and logical:
        checks.append(_incremental_check(logical[-1], policy, now))
    base = newest.get(BackupKind.BASE)
    if policy.schedule.base:
        checks.append(_base_check(base, policy, now))
    wal_lag: float | None = None
    gaps: list[tuple[str, str]] = []
    if wal is not None and (wal.names or base is not None):
        wal_check, wal_lag, gaps = _wal_check(present, wal, policy, now)
        checks.append(wal_check)
    checks.append(_verification_check(last_verify, present, policy, now))
    per_check = status_checks(health, policy, now)
    checks += [Check(f"health_{h.check}", h.severity, h.detail) for h in per_check]
    metrics: dict[str, Any] = {
        "health": {h.check: {"last_run": h.last_run.timestamp() if h.last_run else None,
                             "last_ok": h.last_ok} for h in per_check},
        "backups": len(present),
        "age_seconds": {k: (now - b.started_at).total_seconds() for k, b in newest.items()},
        "last_success": {k: b.finished_at.timestamp() if b.finished_at else b.started_at.timestamp()
                         for k, b in newest.items()},
        "last_size_bytes": {k: b.size_bytes for k, b in newest.items()},
        "last_duration_seconds": {k: ((b.finished_at or b.started_at) - b.started_at).total_seconds()
                                  for k, b in newest.items()},
        "count": {k: sum(1 for b in present if b.kind == k) for k in ALL_KINDS},
        "repository_bytes": sum(b.size_bytes for b in present),
        "wal_lag_seconds": wal_lag,
        "wal_gaps": len(gaps),
        "wal_segments": len(wal.names) if wal else None,
        "verification_age_seconds": (now - last_verify.at).total_seconds() if last_verify else None,
        "verification_ok": None if last_verify is None else last_verify.ok,
    }
    return StatusReport(now, repository, tuple(checks), metrics)


def _full_check(full: BackupRecord | None, policy: Policy, now: datetime) -> Check:
    """CRITICAL without a full, or when the newest full slot passed its grace without one."""
    s = policy.schedule
    slot = last_due_slot(s.full, s.timezone, now, timedelta(minutes=s.grace_minutes))
    if full is None:
        return Check("full", CRITICAL, "no full backup in the repository")
    if slot and full.started_at < slot:
        return Check("full", CRITICAL,
                     f"full backup missed: newest full {full.id} is {_age(now, full.started_at)} old; "
                     f"the {iso(slot)} slot passed its {s.grace_minutes} min grace without one")
    return Check("full", OK, f"newest full {full.id} {_age(now, full.started_at)} old")


def _incremental_check(head: BackupRecord, policy: Policy, now: datetime) -> Check:
    """WARNING when the newest backup is older than the last incremental slot past its grace."""
    s = policy.schedule
    assert s.incremental
    slot = last_due_slot(s.incremental, s.timezone, now, timedelta(minutes=s.grace_minutes))
    if slot and head.started_at < slot:
        return Check("incremental", WARNING,
                     f"incremental late: newest backup {head.id} is {_age(now, head.started_at)} old; "
                     f"the {iso(slot)} slot passed its grace without one")
    return Check("incremental", OK, f"newest backup {head.id} {_age(now, head.started_at)} old")


def _base_check(base: BackupRecord | None, policy: Policy, now: datetime) -> Check:
    """CRITICAL without a base backup, or when the last base slot was missed."""
    s = policy.schedule
    assert s.base
    slot = last_due_slot(s.base, s.timezone, now, timedelta(minutes=s.grace_minutes))
    if base is None:
        return Check("base", CRITICAL, "no base backup: point-in-time recovery is impossible")
    if slot and base.started_at < slot:
        return Check("base", CRITICAL, f"base backup missed: newest {base.id} is "
                                       f"{_age(now, base.started_at)} old; slot {iso(slot)} passed")
    return Check("base", OK, f"newest base {base.id} {_age(now, base.started_at)} old")


def _wal_check(present: Sequence[BackupRecord], wal: WalState, policy: Policy,
               now: datetime) -> tuple[Check, float | None, list[tuple[str, str]]]:
    """CRITICAL for an empty archive beside base backups, a gap after the oldest base, or an
    archive older than ``monitoring.wal_max_age_minutes``; with the lag and the gaps."""
    if wal.newest_modified is None:
        return Check("wal", CRITICAL, "base backups exist but the WAL archive is empty: check archive_command"), None, []
    limit = timedelta(minutes=policy.monitoring.wal_max_age_minutes)
    lag = max(0.0, (now - wal.newest_modified).total_seconds())
    gaps = wal_gap_ranges(present, wal)
    if gaps:
        first, last = gaps[0]
        return Check("wal", CRITICAL, f"WAL archive has {len(gaps)} gap(s), first {first}"
                                      + (f"..{last}" if last != first else "")
                                      + ": point-in-time recovery cannot cross it"), lag, gaps
    if limit and now - wal.newest_modified > limit:
        return Check("wal", CRITICAL, f"WAL archive stale: newest segment archived "
                                      f"{_age(now, wal.newest_modified)} ago (limit "
                                      f"{policy.monitoring.wal_max_age_minutes} min)"), lag, gaps
    return Check("wal", OK, f"WAL archived {_age(now, wal.newest_modified)} ago, no gaps"), lag, gaps


def _verification_check(last: Verification | None, present: Sequence[BackupRecord], policy: Policy,
                        now: datetime) -> Check:
    """CRITICAL when the newest verification failed; WARNING when backups older than
    ``monitoring.verify_max_age_hours`` have no verification that recent."""
    max_age = timedelta(hours=policy.monitoring.verify_max_age_hours)
    if last is not None and not last.ok:
        failed = last.failed_checks()
        what = f"{failed[0].get('name')}: {failed[0].get('detail', '')}"[:160] if failed else "see its record"
        return Check("verification", CRITICAL, f"last verification ({iso(last.at)}) failed: {what}")
    if max_age and present and min(b.started_at for b in present) < now - max_age and (
            last is None or last.at < now - max_age):
        when = f"last one {_age(now, last.at)} ago" if last else "never verified"
        return Check("verification", WARNING, f"no verification in {policy.monitoring.verify_max_age_hours} h "
                                              f"({when}): run 'backup-tool verify latest'")
    return Check("verification", OK, f"last verification {iso(last.at)} passed" if last else "no verification yet")


def wal_gap_ranges(present: Sequence[BackupRecord], wal: WalState) -> list[tuple[str, str]]:
    """(first, last) missing segment of each gap after the oldest base backup's start, on
    every timeline path the archive holds (:func:`backup_tool.physical.wal.archive_gaps`)."""
    bases = [b for b in present if b.kind == BackupKind.BASE and b.start_wal]
    seg_size = bases[-1].wal_segment_size if bases else DEFAULT_SEGMENT_SIZE
    start = min((b.start_wal for b in bases if b.start_wal), default=None,
                key=lambda n: segment_number(n, seg_size))
    return [(g.first_missing, g.last_missing) for g in archive_gaps(wal.names, wal.histories, start, seg_size)]

