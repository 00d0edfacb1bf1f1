"""``audit``: read the repository (catalog, deletion log, verifications, WAL archive, health
log, schema drift, per-backup encryption and lock state), build the report with
:func:`backup_tool.governance.audit.build_report`, render it and write it with its SHA-256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backup_tool import __version__
from backup_tool.core.timestamps import parse_utc
from backup_tool.errors import BackupToolError, UsageError
from backup_tool.governance.audit import AuditReport, BackupEvidence, Finding, build_report, repository_state
from backup_tool.governance.health import audit_table, status_checks
from backup_tool.jobs.health import read_records, records_for
from backup_tool.jobs.status import read_verifications, read_wal_state
from backup_tool.render.audit import FORMATS, SIDECAR_SUFFIX, render
from backup_tool.repository.catalog import REFUSED, Catalog, manifest_key
from backup_tool.repository.retention_log import read_log
from backup_tool.repository.storage import open_repository
from backup_tool.repository.storage.base import AtRest
from backup_tool.schema.drift import summary_for_audit

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings
    from backup_tool.repository.catalog_index import IndexEntry
    from backup_tool.repository.storage import Storage

UTC = timezone.utc





def collect(settings: Settings, now: datetime | None = None) -> AuditReport:
    """Read the repository (manifests, deletion log, verifications, WAL) and build the audit."""
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
    for entry, rest in zip(entries, at_rest, strict=False):
        summary = entry.summary
        found[entry.id] = BackupEvidence(summary.get("host") or None, summary.get("system_identifier") or None,
                                         summary.get("tool_version") or None,
                                         summary.get("encryption_key_id") or entry.key_id, rest)
    return found, [e.id for e, rest in zip(entries, at_rest, strict=False) if rest is None]


def _with_health(report: AuditReport, storage: Any, settings: Settings, now: datetime) -> AuditReport:
    found, problems = read_records(storage)
    records = records_for(settings, found)
    findings = tuple(Finding("warning", "health", s.detail)
                     for s in status_checks(records, settings.policy, now) if s.severity)
    return replace(report, health=audit_table(records, settings.policy, now, report.window_start),
                   findings=report.findings + findings, facts=report.facts + tuple(problems))




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


