"""The policy's schedule: cron expressions, the slots they define, what is due, and the
crontab / systemd / Kubernetes text that runs it.

A *slot* is one moment the policy's cron expression fires, read in the policy's time zone
(``schedule.timezone``, an IANA name) and converted to UTC. Cron semantics are Vixie
cron's: five fields (minute, hour, day of month, month, day of week; names, ranges, lists
and steps allowed, ``@daily``-style macros too); when both day fields are restricted a day
matching either one fires. Across a daylight-saving change a wall-clock time that does not
exist fires at the same instant an hour later, and a time that occurs twice fires once
(the first time).

Which backup meets a slot is decided in one place, :func:`meet_slot`, used by ``run-due``
(what is due) and ``audit`` (every slot met, late, missed or pending): a slot
of a schedule is met by the earliest backup of an accepted kind (a full or an incremental
for an incremental slot) started in [slot, next slot) and at or before ``now``; on time
within ``grace_minutes``, late after. So every backup belongs to at most one slot of a
schedule, the newest slot at or before its start, and a backup is judged by when it really
started, never by the time a command claimed (``schedule-log/`` records written by older
versions for ``run-due --now`` are not read).

What is due is a pure function of (backups, policy, now): a full is due when the newest
full slot at or before ``now`` is not met (or there is no full at all, or the chain has
reached ``retention.max_chain_length``); an incremental when the newest incremental slot is
not met. Only the newest slot matters, so a missed slot is taken at the next run, once.
``run-due`` takes backups only at the real current time; ``--now`` only plans
(``--dry-run``), so a backup can never be recorded against a slot that has not come yet.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Mapping, Protocol, Sequence, TypeVar
from zoneinfo import ZoneInfo

from backup_tool.errors import BackupToolError, ConfigError, UsageError
from backup_tool.core.timestamps import iso, parse_utc  # noqa: F401  (iso re-exported for callers)

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings
    from backup_tool.config.policy import Policy
    from backup_tool.core.report import Reporter
    from backup_tool.governance.retention import BackupRecord
    from backup_tool.repository.storage import Storage

UTC = timezone.utc
RUN_LOG_PREFIX = "schedule-log/"
LOGICAL = ("full", "incremental")
ACCEPTS: Mapping[str, tuple[str, ...]] = {"full": ("full",), "incremental": ("full", "incremental"),
                                          "base": ("base",)}

MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
          ("month", 1, 12, MONTHS), ("day of week", 0, 7, DAYS))
SEARCH_DAYS = 4 * 366 + 1


# ----------------------------------------------------------------------------- timestamps


def parse_ts(text: str, option: str = "--now") -> datetime:
    """An ISO 8601 timestamp (``Z`` or an offset; none means UTC) as an aware UTC datetime."""
    try:
        return parse_utc(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an ISO 8601 time",
                         "use e.g. 2026-11-25T14:02:00Z (a time without zone is UTC)") from None


# ----------------------------------------------------------------------------- cron


@dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression."""

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def matches_date(self, d: date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _parse_value(token: str, lo: int, hi: int, names: Mapping[str, int], what: str) -> int:
    value = names.get(token.lower()) if names else None
    if value is None:
        if not token.isdigit():
            raise ValueError(f"{what}: {token!r} is not a number" + (" or a name" if names else ""))
        value = int(token)
    if not lo <= value <= hi:
        raise ValueError(f"{what}: {value} is outside {lo}-{hi}")
    return value


def _parse_field(text: str, lo: int, hi: int, names: Mapping[str, int], what: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{what}: bad step {step_text!r}")
            step = int(step_text)
        if rng == "*":
            start, end = lo, hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            start, end = _parse_value(a, lo, hi, names, what), _parse_value(b, lo, hi, names, what)
            if start > end:
                raise ValueError(f"{what}: range {rng!r} runs backwards")
        elif rng:
            start = _parse_value(rng, lo, hi, names, what)
            end = hi if step_text else start
        else:
            raise ValueError(f"{what}: empty item in {text!r}")
        values.update(range(start, end + 1, step))
    return values


def parse_cron(expr: str) -> Cron:
    """Parse a cron expression; ValueError says which field is wrong."""
    text = MACROS.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"{len(parts)} fields instead of 5")
    sets = [_parse_field(p, lo, hi, names, what) for p, (what, lo, hi, names) in zip(parts, FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(expr=expr, minutes=tuple(sorted(sets[0])), hours=tuple(sorted(sets[1])),
                days=frozenset(sets[2]), months=frozenset(sets[3]), weekdays=weekdays,
                any_day=parts[2].startswith("*"), any_weekday=parts[4].startswith("*"))


def _day_slots(cron: Cron, d: date, zone: ZoneInfo) -> list[datetime]:
    if not cron.matches_date(d):
        return []
    found = {datetime.combine(d, time(h, m), zone).astimezone(UTC)
             for h in cron.hours for m in cron.minutes}
    return sorted(found)


def slots_between(expr: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """Every slot in [start, end), UTC, ascending."""
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    found: set[datetime] = set()
    while day <= last:
        found.update(s for s in _day_slots(cron, day, zone) if start <= s < end)
        day += timedelta(days=1)
    return sorted(found)


def previous_slot(expr: str, tz: str, now: datetime) -> datetime | None:
    """The newest slot at or before ``now`` (None if the expression has not fired for 4 years)."""
    if not expr:
        return None
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = now.astimezone(zone).date() + timedelta(days=1)
    for _ in range(SEARCH_DAYS):
        earlier = [s for s in _day_slots(cron, day, zone) if s <= now]
        if earlier:
            return earlier[-1]
        day -= timedelta(days=1)
    return None


def next_slot(expr: str, tz: str, now: datetime) -> datetime | None:
    """The first slot strictly after ``now``."""
    if not expr:
        return None
    cron, zone = parse_cron(expr), ZoneInfo(tz)
    day = now.astimezone(zone).date() - timedelta(days=1)
    for _ in range(SEARCH_DAYS):
        later = [s for s in _day_slots(cron, day, zone) if s > now]
        if later:
            return later[0]
        day += timedelta(days=1)
    return None


def last_due_slot(expr: str, tz: str, now: datetime, grace: timedelta) -> datetime | None:
    """The newest slot whose grace period has fully elapsed by ``now``."""
    return previous_slot(expr, tz, now - grace)


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
    while cur.kind == "incremental" and cur.parent_id and cur.id not in seen:
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
    fulls = [b for b in logical if b.kind == "full"]
    items: list[DueItem] = []
    notes: list[str] = []

    def not_taken(schedule: str, slot: datetime, verdict: SlotVerdict[BackupRecord]) -> str:
        missed = " (missed, taking it now)" if verdict.status is SlotStatus.MISSED else ""
        return f"{schedule} slot {iso(slot)} not taken yet{missed}"

    def covered(schedule: str, slot: datetime, verdict: SlotVerdict[BackupRecord]) -> str:
        assert verdict.backup is not None
        return f"{schedule}: {verdict.backup.id} covers slot {iso(slot)} ({verdict.status.value})"

    full_slot, full_v = newest_slot_verdict("full", s.full, tz, grace, now, present)
    if not fulls:
        items.append(DueItem("full", full_slot, "no full backup yet"))
    elif full_slot and full_v and full_v.backup is None:
        items.append(DueItem("full", full_slot, not_taken("full", full_slot, full_v)))
    else:
        notes.append(covered("full", full_slot, full_v) if full_slot and full_v
                     else f"full: newest {fulls[-1].id}; the full schedule has not fired")
    if not items and s.incremental:
        incr_slot, incr_v = newest_slot_verdict("incremental", s.incremental, tz, grace, now, present)
        if incr_slot and incr_v and incr_v.backup is None:
            head = logical[-1]
            length = chain_length(logical, head)
            if length >= policy.retention.max_chain_length:
                items.append(DueItem("full", incr_slot,
                                     f"incremental slot {iso(incr_slot)} due but the chain already has "
                                     f"{length} incrementals (max_chain_length {policy.retention.max_chain_length}): "
                                     f"taking a full"))
            else:
                items.append(DueItem("incremental", incr_slot, not_taken("incremental", incr_slot, incr_v)))
        elif incr_slot and incr_v:
            notes.append(covered("incremental", incr_slot, incr_v))
    if s.base:
        bases = [b for b in present if b.kind == "base"]
        base_slot, base_v = newest_slot_verdict("base", s.base, tz, grace, now, present)
        if not bases:
            items.append(DueItem("base", base_slot, "no base backup yet"))
        elif base_slot and base_v and base_v.backup is None:
            items.append(DueItem("base", base_slot, not_taken("base", base_slot, base_v)))
        elif base_slot and base_v:
            notes.append(covered("base", base_slot, base_v))
    return DuePlan(now, tuple(items), tuple(notes), next_slot(s.full, tz, now),
                   next_slot(s.incremental, tz, now) if s.incremental else None)


# ----------------------------------------------------------------------------- run-due log


def write_run_record(storage: Storage, backup_id: str, item: DueItem, evaluated_at: datetime) -> str:
    """Record why run-due took ``backup_id`` (slot and reason) under ``schedule-log/``: evidence
    for people; no decision reads it (a backup counts by when it started)."""
    key = f"{RUN_LOG_PREFIX}{backup_id}.json"
    body = {"backup": backup_id, "kind": item.kind, "slot": iso(item.slot), "reason": item.reason,
            "evaluated_at": iso(evaluated_at), "recorded_at": iso(datetime.now(UTC))}
    storage.put_bytes(key, json.dumps(body, indent=1).encode())
    return key


# ----------------------------------------------------------------------------- run-due


@dataclass(frozen=True)
class RunDueResult:
    plan: DuePlan
    taken: tuple[dict[str, Any], ...]
    retention: dict[str, Any] | None
    retention_error: str | None = None
    dry_run: bool = False
    health: dict[str, Any] | None = None
    health_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "taken": list(self.taken),
                "retention": self.retention, "retention_error": self.retention_error,
                "health": self.health, "health_error": self.health_error}


def _records(settings: Settings, manifests: Sequence[Any]) -> list[BackupRecord]:
    from backup_tool.governance.retention import BackupRecord

    database = _database_of(settings)
    return [BackupRecord.from_manifest(m) for m in manifests if database is None or m.database == database]


def plan_due(settings: Settings, now: datetime | None = None, reporter: Reporter | None = None) -> RunDueResult:
    """What run-due would take at ``now`` (default: the current time) and why, read from the
    repository; takes, writes and locks nothing, so any ``now`` is safe."""
    from backup_tool.repository.catalog import Catalog
    from backup_tool.core.report import NullReporter
    from backup_tool.repository.storage import open_repository

    from backup_tool.jobs.health import plan_health

    reporter = reporter or NullReporter()
    storage = open_repository(settings.repo_url)
    manifests, problems = Catalog(storage).scan()
    for p in problems:
        reporter.warning(f"unreadable manifest ignored: {p.message}")
    at = now or datetime.now(UTC)
    plan = decide_due(_records(settings, manifests), settings.policy, at)
    return RunDueResult(plan, (), None, None, dry_run=True, health=plan_health(settings, storage, at).to_dict())


def run_due(settings: Settings, reporter: Reporter | None = None) -> RunDueResult:
    """Take whatever the policy says is due now (the real clock: a backup is only ever taken
    for a slot that has come), under the backup lock; then apply retention when
    ``retention.run_after_backup`` is set."""
    from backup_tool.logical import backup
    from backup_tool.repository.catalog import Catalog
    from backup_tool.core.report import NullReporter
    from backup_tool.governance.retention import apply_retention
    from backup_tool.repository.storage import open_storage

    reporter = reporter or NullReporter()
    evaluated_at = datetime.now(UTC)
    storage = open_storage(settings.repo_url)
    manifests, problems = Catalog(storage).scan()
    for p in problems:
        reporter.warning(f"unreadable manifest ignored: {p.message}")
    plan = decide_due(_records(settings, manifests), settings.policy, evaluated_at)
    reporter.event("run-due", now=iso(evaluated_at), due=plan.kinds or "nothing",
                   reasons=[i.reason for i in plan.items] or list(plan.notes))
    taken: list[dict[str, Any]] = []
    for item in plan.items:

        def still_due(current: list[Any], kind: str = item.kind) -> bool:
            return kind in decide_due(_records(settings, current), settings.policy, datetime.now(UTC)).kinds

        try:
            if item.kind == "full":
                manifest = backup.backup_full(settings, reporter, still_due=still_due)
            elif item.kind == "incremental":
                manifest = backup.backup_incremental(settings, reporter, still_due=still_due)
            else:
                manifest = None
        except backup.NoLongerDue as exc:
            reporter.event("nothing to do", reason=str(exc))
            continue
        if manifest is None:
            try:
                from backup_tool.physical import basebackup
            except ImportError:
                basebackup = None  # type: ignore[assignment]
            fn = getattr(basebackup, "backup_base", None)
            if fn is None:
                raise BackupToolError("schedule.base is set but this build cannot take base backups",
                                      "remove schedule.base from the policy or upgrade backup-tool")
            manifest = fn(settings, reporter)
        write_run_record(storage, manifest.id, item, evaluated_at)
        taken.append({**manifest.summary(), "slot": iso(item.slot), "reason": item.reason})
    retention: dict[str, Any] | None = None
    error: str | None = None
    if taken and settings.policy.retention.run_after_backup:
        try:
            retention = apply_retention(settings, reporter=reporter).to_dict()
        except BackupToolError as exc:
            error = str(exc)
            reporter.warning(f"retention after backup failed: {exc}")
    health, health_error = _due_health_checks(settings, storage, reporter)
    return RunDueResult(plan, tuple(taken), retention, error, health=health, health_error=health_error)


def _due_health_checks(settings: Settings, storage: Storage, reporter: Reporter
                       ) -> tuple[dict[str, Any] | None, str | None]:
    """The health checks due now (:mod:`backup_tool.jobs.health`), after any backup: their run and
    record, or why they could not run."""
    from backup_tool.jobs.health import run_due_checks

    try:
        return run_due_checks(settings, storage, reporter).to_dict(), None
    except BackupToolError as exc:
        reporter.warning(f"health checks failed to run: {exc}")
        return None, str(exc)


def _database_of(settings: Settings) -> str | None:
    from backup_tool.postgres.connection import ConnInfo

    try:
        return ConnInfo(settings.dsn).dbname
    except BackupToolError:
        return None


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Job:
    """One thing the scheduler runs: a name, a cron expression and the commands."""

    name: str
    cron: str
    commands: tuple[tuple[str, ...], ...]
    description: str
    ignore_failure: tuple[bool, ...]


def jobs_for(policy: Policy, textfile: str) -> list[Job]:
    s = policy.schedule
    due = Job("run-due", s.run_due, (("run-due", "--json"), ("status", "--prometheus", textfile)),
              f"take the backup the policy says is due (full {s.full!r}, incremental "
              f"{s.incremental or 'off'!r}{', base ' + repr(s.base) if s.base else ''}, {s.timezone})",
              (False, True))
    jobs = [due]
    if s.maintenance:
        jobs.append(Job("maintenance", s.maintenance,
                        (("retention", "apply", "--json"), ("verify", "latest", "--json")),
                        "apply retention, then re-read the newest backup's checksums", (False, False)))
    return jobs


def _env_lines(settings: Settings) -> dict[str, str]:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    policy = settings.policy
    ref = policy.source if policy.source not in ("built-in", "") else policy.name
    env = {"BACKUP_TOOL_REPO": settings.repo_url, "BACKUP_TOOL_POLICY": ref}
    for name in ("BACKUP_TOOL_ENCRYPTION_KEY_FILE", "BACKUP_TOOL_PREVIOUS_KEYS_FILE", "BACKUP_TOOL_S3_SSE",
                 "BACKUP_TOOL_S3_SSE_KMS_KEY_ID"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if settings.dsn:
        try:
            params = {k: v for k, v in conninfo_to_dict(settings.dsn).items() if k != "password"}
            env["DATABASE_URL"] = make_conninfo("", **params)
        except ProgrammingError:
            raise ConfigError("the DSN (--dsn or DATABASE_URL) is not a valid PostgreSQL connection string, "
                              "so the schedule cannot carry it",
                              "use postgresql://user@host:port/dbname or 'host=... dbname=...'") from None
    return env


def _cron_calendar(expr: str, tz: str) -> list[str]:
    """systemd OnCalendar= values equivalent to a cron expression."""
    cron = parse_cron(expr)

    def fmt(values: Sequence[int] | frozenset[int], full: int, width: int = 2) -> str:
        vals = sorted(values)
        return "*" if len(vals) == full else ",".join(f"{v:0{width}d}" for v in vals)

    hm = f"{fmt(cron.hours, 24)}:{fmt(cron.minutes, 60)}:00"
    month = fmt(cron.months, 12)
    names = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    dow = ",".join(names[d] for d in sorted(cron.weekdays))
    day = fmt(cron.days, 31)
    if cron.any_day and cron.any_weekday:
        return [f"*-{month}-{day} {hm} {tz}"]
    if cron.any_weekday:
        return [f"*-{month}-{day} {hm} {tz}"]
    if cron.any_day:
        return [f"{dow} *-{month}-* {hm} {tz}"]
    return [f"*-{month}-{day} {hm} {tz}", f"{dow} *-{month}-* {hm} {tz}"]


def render_schedule(settings: Settings, fmt: str, executable: Sequence[str], name: str = "",
                    image: str = "backup-tool:latest", log_file: str = "/var/log/backup-tool.log",
                    textfile: str = "/var/lib/node_exporter/textfile_collector/backup_tool.prom") -> str:
    """The policy's schedule as crontab lines, systemd units or Kubernetes CronJobs."""
    policy = settings.policy
    name = _k8s_name(name or _database_of(settings) or policy.name)
    if fmt == "cron":
        return _render_cron(settings, executable, log_file, textfile)
    if fmt == "systemd":
        return _render_systemd(settings, executable, name, textfile)
    if fmt == "kubernetes":
        return _render_kubernetes(settings, name, image)
    raise UsageError(f"unknown schedule format {fmt!r}", "use cron, systemd or kubernetes")


def _k8s_name(text: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (cleaned or "db")[:40].strip("-")


def _render_cron(settings: Settings, exe: Sequence[str], log_file: str, textfile: str) -> str:
    policy = settings.policy
    s = policy.schedule
    prog = " ".join(shlex.quote(a) for a in exe)
    lines = [
        f"# backup-tool: policy {policy.name!r} ({policy.source})",
        f"# full {s.full!r}, incremental {s.incremental or 'off'!r}"
        + (f", base {s.base!r}" if s.base else "") + f", read in time zone {s.timezone}, grace {s.grace_minutes} min.",
        "# run-due decides from the repository what is due (a missed slot is taken late, never twice);",
        "# CRON_TZ makes cronie read the times in the policy's zone (Debian's cron uses the system zone).",
        "# Secrets stay out of this file: the database password in ~/.pgpass (or PGPASSFILE),",
        "# S3 credentials from the AWS chain (AWS_PROFILE / instance role).",
        "SHELL=/bin/sh",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        f"CRON_TZ={s.timezone}",
        "# the log file gets every milestone as a JSON line, not only warnings and errors",
        "BACKUP_TOOL_LOG=json",
    ]
    lines += [f"{k}={v}" for k, v in _env_lines(settings).items()]
    log = f">> {shlex.quote(log_file)} 2>&1"
    for job in jobs_for(policy, textfile):
        parts = []
        for cmd, ignore in zip(job.commands, job.ignore_failure, strict=True):
            line = f"{prog} {' '.join(shlex.quote(a) for a in cmd)}"
            parts.append(f"{line} >/dev/null 2>&1" if ignore else f"{line} {log}")
        joiner = "; " if job.name == "run-due" else " && "
        lines.append(f"# {job.name}: {job.description}")
        lines.append(f"{job.cron:<14} " + joiner.join(parts).replace("%", "\\%"))
    return "\n".join(lines) + "\n"


def _render_systemd(settings: Settings, exe: Sequence[str], name: str, textfile: str) -> str:
    policy = settings.policy
    unit_prefix = f"backup-tool-{name}"
    env_file = f"/etc/backup-tool/{name}.env"
    out = [f"# backup-tool systemd units for policy {policy.name!r}: save each block under the path in its",
           f"# header, then: systemctl daemon-reload && systemctl enable --now {unit_prefix}-run-due.timer"
           + (f" {unit_prefix}-maintenance.timer" if policy.schedule.maintenance else ""),
           f"# {env_file} (mode 0600) holds the environment; secrets (PGPASSWORD or a PGPASSFILE,",
           "# AWS credentials unless an instance role is used) go there, never into the units:"]
    out += [f"#   {k}={v}" for k, v in _env_lines(settings).items()]
    prog = " ".join(shlex.quote(a) for a in exe)
    for job in jobs_for(policy, textfile):
        calendars = _cron_calendar(job.cron, policy.schedule.timezone)
        out += ["", f"# --- /etc/systemd/system/{unit_prefix}-{job.name}.service ---",
                "[Unit]", f"Description=backup-tool {job.name} ({name}): {job.description}",
                "After=network-online.target", "Wants=network-online.target", "",
                "[Service]", "Type=oneshot", f"EnvironmentFile={env_file}", "Environment=BACKUP_TOOL_LOG=json",
                "Nice=10", "IOSchedulingClass=best-effort"]
        for cmd, ignore in zip(job.commands, job.ignore_failure, strict=True):
            # A refresh that must run whatever the job's outcome (the metrics matter most after a
            # failure) is ExecStopPost: systemd skips later ExecStart lines of a failed oneshot.
            directive = "ExecStopPost=-" if ignore else "ExecStart="
            out.append(f"{directive}{prog} {' '.join(shlex.quote(a) for a in cmd)}")
        out += ["", f"# --- /etc/systemd/system/{unit_prefix}-{job.name}.timer ---",
                "[Unit]", f"Description=backup-tool {job.name} ({name}) timer", "",
                "[Timer]", *[f"OnCalendar={c}" for c in calendars], "Persistent=true",
                "AccuracySec=1s", "", "[Install]", "WantedBy=timers.target"]
    return "\n".join(out) + "\n"


def _yaml(value: str) -> str:
    return json.dumps(value)


def _render_kubernetes(settings: Settings, name: str, image: str) -> str:
    policy = settings.policy
    env = {**_env_lines(settings), "BACKUP_TOOL_LOG": "json"}
    secret = f"backup-tool-{name}"
    docs = [f"# backup-tool CronJobs for policy {policy.name!r} (database {name}).",
            f"# Secrets come from the Secret {secret!r}; create it once, e.g.:",
            f"#   kubectl create secret generic {secret} \\",
            "#     --from-literal=DATABASE_URL='postgresql://user:PASSWORD@host:5432/db' \\",
            "#     --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...",
            "# (or give the pod an IAM role and keep only DATABASE_URL in the Secret)."]
    for job in jobs_for(policy, "/tmp/backup_tool.prom"):
        commands = [c for c, ignore in zip(job.commands, job.ignore_failure, strict=True) if not ignore]
        script = " && ".join("backup-tool " + " ".join(shlex.quote(a) for a in c) for c in commands)
        tz = policy.schedule.timezone
        docs += ["---", "apiVersion: batch/v1", "kind: CronJob", "metadata:",
                 f"  name: {_yaml(f'backup-tool-{name}-{job.name}'[:52])}",
                 "  labels:", "    app.kubernetes.io/name: backup-tool",
                 f"    app.kubernetes.io/instance: {_yaml(name)}",
                 "  annotations:", f"    backup-tool/description: {_yaml(job.description)}",
                 "spec:", f"  schedule: {_yaml(job.cron)}", f"  timeZone: {_yaml(tz)}",
                 "  concurrencyPolicy: Forbid", "  startingDeadlineSeconds: 600",
                 "  successfulJobsHistoryLimit: 3", "  failedJobsHistoryLimit: 5",
                 "  jobTemplate:", "    spec:", "      backoffLimit: 0",
                 "      template:", "        metadata:", "          labels:",
                 "            app.kubernetes.io/name: backup-tool",
                 f"            app.kubernetes.io/instance: {_yaml(name)}",
                 "        spec:", "          restartPolicy: Never", "          containers:",
                 f"            - name: {_yaml(job.name)}", f"              image: {_yaml(image)}",
                 f"              command: [\"/bin/sh\", \"-c\", {_yaml(script)}]",
                 "              env:"]
        for k, v in env.items():
            if k == "DATABASE_URL":
                continue
            docs += [f"                - name: {k}", f"                  value: {_yaml(v)}"]
        docs += ["              envFrom:", "                - secretRef:", f"                    name: {_yaml(secret)}"]
    return "\n".join(docs) + "\n"

