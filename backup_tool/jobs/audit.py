"""``audit``: read the repository (catalog, deletion log, verifications, WAL archive, health
log, schema drift), build the report with :func:`backup_tool.governance.audit.build_report`,
render it and write it."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_tool.core.timestamps import parse_utc
from backup_tool.errors import BackupToolError, UsageError
from backup_tool.governance.audit import AuditReport, Finding, build_report
from backup_tool.governance.health import audit_table, status_checks
from backup_tool.jobs.health import read_records, records_for
from backup_tool.jobs.status import read_verifications, read_wal_state
from backup_tool.render.audit import FORMATS, render
from backup_tool.repository.catalog import REFUSED, Catalog
from backup_tool.repository.retention_log import read_log
from backup_tool.repository.storage import open_repository
from backup_tool.schema.drift import summary_for_audit

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings




UTC = timezone.utc


def collect(settings: Settings, now: datetime | None = None) -> AuditReport:
    """Read the repository (manifests, deletion log, verifications, WAL) and build the audit."""
    generated = datetime.now(UTC)
    now = now or generated
    storage = open_repository(settings.repo_url)
    records, problems = Catalog(storage).records()
    runs, deletions, log_problems = read_log(storage)
    facts = [f"{'refused' if isinstance(p, REFUSED) else 'unreadable'} manifest: {p.message}"
             for p in problems] + log_problems
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
                          lock_supported)
    if problems:
        report = replace(report, findings=report.findings + (
            Finding("critical", "integrity", f"{len(problems)} manifest(s) cannot be read or are not "
                    "authenticated"),))
    if settings.policy.schema.migrations:
        drift = summary_for_audit(settings)
        if drift.get("ok") is False:
            report = replace(report, findings=report.findings + (Finding("warning", "schema", drift["line"]),))
        elif drift.get("ok") is None:
            report = replace(report, facts=report.facts + (drift["line"],))
        report = replace(report, schema_drift=drift)
    report = _with_health(report, storage, settings, now)
    return replace(report, generated_at=generated)


def _with_health(report: AuditReport, storage: Any, settings: Settings, now: datetime) -> AuditReport:
    found, problems = read_records(storage)
    records = records_for(settings, found)
    findings = tuple(Finding("warning", "health", s.detail)
                     for s in status_checks(records, settings.policy, now) if s.severity)
    return replace(report, health=audit_table(records, settings.policy, now, report.window_start),
                   findings=report.findings + findings, facts=report.facts + tuple(problems))
def run_audit(settings: Settings, now: datetime | None = None, fmt: str = "json",
              output: str | None = None) -> tuple[AuditReport, str]:
    """Build the audit, render it, and write it to ``output`` when given."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown audit format {fmt!r}", "use json, markdown or html")
    report = collect(settings, now)
    text = render(report, fmt)
    if output:
        path = Path(output)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            raise BackupToolError(f"cannot write the audit to {path}: {exc.strerror}",
                                  "choose a writable --output path") from None
    return report, text
