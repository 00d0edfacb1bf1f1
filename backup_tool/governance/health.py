"""Health-check results and the pure decisions over their log: what is due (a check is due when
the newest slot of its frequency at or before ``now`` has no run of it at or after that slot; a
missed slot is run once, late), what ``status`` reports and the audit's health table.

The checks themselves, which read the live database, are :mod:`backup_tool.jobs.health`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Sequence

from backup_tool.config.policy import CHECK_NAMES, TITLES, frequency_cron, frequency_label
from backup_tool.core.cron import last_due_slot, next_slot, previous_slot
from backup_tool.core.timestamps import iso

if TYPE_CHECKING:

    from backup_tool.config.policy import Policy

SHOWN = 5


# ----------------------------------------------------------------------------- results


class Level(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    level: Level
    object: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level.value, "object": self.object, "message": self.message}


@dataclass(frozen=True)
class HealthCheck:
    """One check's verdict; ``ok`` is false exactly when ``level`` is FAIL."""

    name: str
    level: Level
    detail: str
    findings: tuple[Finding, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.level is not Level.FAIL

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "level": self.level.value, "detail": self.detail,
                "findings": [f.to_dict() for f in self.findings], "seconds": round(self.seconds, 3)}


def verdict(name: str, findings: Sequence[Finding], passed: str) -> HealthCheck:
    """The check's level is its worst finding's; the detail names the worst findings first."""
    fails = [f for f in findings if f.level is Level.FAIL]
    warns = [f for f in findings if f.level is Level.WARN]
    if fails:
        detail = "; ".join(f.message for f in fails[:SHOWN]) + (
            f" and {len(fails) - SHOWN} more" if len(fails) > SHOWN else "")
        if warns:
            detail += f" (+{len(warns)} warning(s))"
        return HealthCheck(name, Level.FAIL, detail, tuple(findings))
    if warns:
        detail = f"{passed}; {len(warns)} warning(s): " + "; ".join(f.message for f in warns[:SHOWN]) + (
            f" and {len(warns) - SHOWN} more" if len(warns) > SHOWN else "")
        return HealthCheck(name, Level.WARN, detail, tuple(findings))
    return HealthCheck(name, Level.OK, passed, tuple(findings))


@dataclass(frozen=True)
class HealthReport:
    target: str
    database: str
    started_at: datetime
    finished_at: datetime
    checks: tuple[HealthCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "target": self.target, "database": self.database, "at": iso(self.started_at),
                "finished_at": iso(self.finished_at), "checks": [c.to_dict() for c in self.checks]}


# ----------------------------------------------------------------------------- what is due
@dataclass(frozen=True)
class HealthRecord:
    """One run of one check, as recorded in ``health-log/``."""

    check: str
    at: datetime
    ok: bool
    level: str
    detail: str
    database: str = ""
    run: str = ""


@dataclass(frozen=True)
class HealthDue:
    check: str
    slot: datetime
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "slot": iso(self.slot), "reason": self.reason}


@dataclass(frozen=True)
class HealthPlan:
    now: datetime
    due: tuple[HealthDue, ...]
    next_runs: tuple[tuple[str, datetime | None], ...]

    @property
    def checks(self) -> list[str]:
        return [d.check for d in self.due]

    def to_dict(self) -> dict[str, Any]:
        return {"now": iso(self.now), "due": [d.to_dict() for d in self.due],
                "next": {name: iso(at) for name, at in self.next_runs}}


def _newest(records: Sequence[HealthRecord], check: str, now: datetime) -> HealthRecord | None:
    runs = [r for r in records if r.check == check and r.at <= now]
    return max(runs, key=lambda r: (r.at, r.run)) if runs else None


def decide_health_due(records: Sequence[HealthRecord], policy: Policy, now: datetime) -> HealthPlan:
    """Which checks are due at ``now`` (pure): those whose newest slot at or before ``now``
    has no run of that check at or after it. Only the newest slot counts, so checks missed
    for days run once."""
    tz = policy.schedule.timezone
    due: list[HealthDue] = []
    upcoming: list[tuple[str, datetime | None]] = []
    for name in CHECK_NAMES:
        cron = frequency_cron(getattr(policy.health, name))
        if cron is None:
            continue
        upcoming.append((name, next_slot(cron, tz, now)))
        slot = previous_slot(cron, tz, now)
        if slot is None:
            continue
        last = _newest(records, name, now)
        if last is None:
            due.append(HealthDue(name, slot, "never run"))
        elif last.at < slot:
            due.append(HealthDue(name, slot, f"slot {iso(slot)} not run yet (last run {iso(last.at)})"))
    return HealthPlan(now, tuple(due), tuple(upcoming))


@dataclass(frozen=True)
class CheckStatus:
    """How one check stands for ``status`` (severity: 0 OK, 1 WARNING, 2 CRITICAL)."""

    check: str
    severity: int
    detail: str
    last_run: datetime | None
    last_ok: bool | None


def status_checks(records: Sequence[HealthRecord], policy: Policy, now: datetime) -> list[CheckStatus]:
    """Monitoring per scheduled check (pure). Never run: OK ("not run yet", as a verification
    is). Newest run failed: WARNING. Overdue (the newest slot past ``schedule.grace_minutes``
    has no run): WARNING; overdue by more than one period (the slot before it had none either):
    CRITICAL."""
    s = policy.schedule
    grace = timedelta(minutes=s.grace_minutes)
    out: list[CheckStatus] = []
    for name in CHECK_NAMES:
        cron = frequency_cron(getattr(policy.health, name))
        if cron is None:
            continue
        last = _newest(records, name, now)
        if last is None:
            out.append(CheckStatus(name, 0, f"health check {name}: not run yet", None, None))
            continue
        severity, parts = 0, []
        due_slot = last_due_slot(cron, s.timezone, now, grace)
        if due_slot is not None and last.at < due_slot:
            before = previous_slot(cron, s.timezone, due_slot - timedelta(microseconds=1))
            severity = 2 if before is not None and last.at < before else 1
            parts.append(f"health check {name} overdue: slot {iso(due_slot)} not run "
                         f"(last run {iso(last.at)}{', more than one period ago' if severity == 2 else ''})")
        if not last.ok:
            severity = max(severity, 1)
            parts.append(f"health check {name} failed at {iso(last.at)}: {last.detail[:160]}")
        if not parts:
            parts.append(f"health check {name} {last.level} at {iso(last.at)}")
        out.append(CheckStatus(name, severity, "; ".join(parts), last.at, last.ok))
    return out


def audit_table(records: Sequence[HealthRecord], policy: Policy, now: datetime,
                window_start: datetime) -> dict[str, Any]:
    """The seed's table (check, frequency, last status, last run, next check) and the failures
    recorded in the audit window, newest first (pure)."""
    tz = policy.schedule.timezone
    rows = []
    for name in CHECK_NAMES:
        value = getattr(policy.health, name)
        cron = frequency_cron(value)
        last = _newest(records, name, now)
        status = "never run" if last is None else {"ok": "passed", "warn": "passed with warnings"}.get(
            last.level, "FAILED")
        rows.append({"check": name, "title": TITLES[name], "frequency": frequency_label(value),
                     "last_status": status, "last_run": iso(last.at) if last else None,
                     "last_detail": last.detail if last else None,
                     "next_check": iso(next_slot(cron, tz, now)) if cron else None})
    failures = sorted((r for r in records if not r.ok and window_start <= r.at <= now),
                      key=lambda r: (r.at, r.check), reverse=True)
    return {"checks": rows, "failures": [{"check": r.check, "at": iso(r.at), "database": r.database,
                                          "detail": r.detail} for r in failures]}


def of_database(records: Sequence[HealthRecord], database: str | None) -> list[HealthRecord]:
    """The runs on ``database`` (all when None)."""
    return [r for r in records if database is None or r.database == database]
