"""``run-due``: take the backup the policy says is due now, under the repository lock, then
apply retention when the policy says so, then run the health checks that are due.

The decision is :func:`backup_tool.governance.due.decide_due`; this module only gathers its
inputs and carries it out. ``run-due`` takes backups only at the real current time; ``--now``
only plans (``--dry-run``), so a backup can never be recorded against a slot that has not come
yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from backup_tool.core.kinds import BackupKind
from backup_tool.core.report import NullReporter
from backup_tool.core.timestamps import iso
from backup_tool.errors import BackupToolError
from backup_tool.governance.due import DueItem, DuePlan, decide_due
from backup_tool.jobs.expire import apply_retention
from backup_tool.jobs.health import plan_health, run_due_checks
from backup_tool.logical import backup
from backup_tool.physical import basebackup, walscan
from backup_tool.postgres.connection import database_of
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage import open_repository, open_storage

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings
    from backup_tool.core.report import Reporter
    from backup_tool.repository.records import BackupRecord
    from backup_tool.repository.storage import Storage

UTC = timezone.utc
RUN_LOG_PREFIX = "schedule-log/"


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


def _of_database(settings: Settings, records: Sequence[BackupRecord]) -> list[BackupRecord]:
    database = database_of(settings.dsn)
    return [r for r in records if database is None or r.database == database]


def _indexed_records(settings: Settings, storage: Storage, reporter: Reporter,
                     refresh: bool) -> list[BackupRecord]:
    """This database's backups from the catalog index (manifests it does not vouch for are read),
    so planning costs the same with 5,000 backups as with 5; ``refresh`` rewrites a stale index
    (never in a dry run, which writes nothing)."""
    records, problems = Catalog(storage).records(refresh=refresh)
    for p in problems:
        reporter.warning(f"unreadable manifest ignored: {p.message}")
    return _of_database(settings, records)


def plan_due(settings: Settings, now: datetime | None = None, reporter: Reporter | None = None) -> RunDueResult:
    """What run-due would take at ``now`` (default: the current time) and why, read from the
    repository; takes, writes and locks nothing, so any ``now`` is safe."""

    reporter = reporter or NullReporter()
    storage = open_repository(settings.repo_url)
    at = now or datetime.now(UTC)
    plan = decide_due(_indexed_records(settings, storage, reporter, refresh=False), settings.policy, at)
    return RunDueResult(plan, (), None, None, dry_run=True, health=plan_health(settings, storage, at).to_dict())


def run_due(settings: Settings, reporter: Reporter | None = None) -> RunDueResult:
    """Take whatever the policy says is due now (the real clock: a backup is only ever taken
    for a slot that has come), under the backup lock; then apply retention when
    ``retention.run_after_backup`` is set."""
    reporter = reporter or NullReporter()
    evaluated_at = datetime.now(UTC)
    storage = open_storage(settings.repo_url)
    plan = decide_due(_indexed_records(settings, storage, reporter, refresh=True), settings.policy,
                     evaluated_at)
    reporter.event("run-due", now=iso(evaluated_at), due=plan.kinds or "nothing",
                   reasons=[i.reason for i in plan.items] or list(plan.notes))
    taken: list[dict[str, Any]] = []
    for item in plan.items:

        def still_due(current: list[BackupRecord], kind: str = item.kind) -> bool:
            return kind in decide_due(_of_database(settings, current), settings.policy, datetime.now(UTC)).kinds

        try:
            if item.kind == BackupKind.FULL:
                manifest = backup.backup_full(settings, reporter, still_due=still_due)
            elif item.kind == BackupKind.INCREMENTAL:
                manifest = backup.backup_incremental(settings, reporter, still_due=still_due,
                                                     changes=walscan.changed_relations)
            else:
                manifest = None
        except backup.NoLongerDue as exc:
            reporter.event("nothing to do", reason=str(exc))
            continue
        if manifest is None:
            manifest = basebackup.backup_base(settings, reporter)
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
    try:
        return run_due_checks(settings, storage, reporter).to_dict(), None
    except BackupToolError as exc:
        reporter.warning(f"health checks failed to run: {exc}")
        return None, str(exc)
