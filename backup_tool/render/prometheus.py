"""The Prometheus textfile (node_exporter's textfile collector) for a status report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backup_tool.governance.status import StatusReport

if TYPE_CHECKING:
    pass




def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(report: StatusReport) -> str:
    repo = f'repository="{_label(report.repository)}"'
    m = report.metrics
    lines: list[str] = []

    def metric(name: str, help_: str, kind: str, samples: list[tuple[str, Any]]) -> None:
        samples = [(lbl, v) for lbl, v in samples if v is not None]
        if not samples:
            return
        lines.append(f"# HELP backup_tool_{name} {help_}")
        lines.append(f"# TYPE backup_tool_{name} {kind}")
        for labels, value in samples:
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, float):
                value = int(value) if value.is_integer() else repr(value)
            lines.append(f"backup_tool_{name}{{{labels}}} {value}")

    def per_kind(key: str) -> list[tuple[str, Any]]:
        return [(f'{repo},kind="{k}"', float(v)) for k, v in sorted(m.get(key, {}).items())]

    metric("status", "Overall status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN", "gauge", [(repo, report.code)])
    metric("up", "1 if the repository could be read", "gauge", [(repo, int(report.error is None))])
    metric("check_status", "Status of each check (0 OK, 1 WARNING, 2 CRITICAL)", "gauge",
           [(f'{repo},check="{c.name}"', c.severity) for c in report.checks])
    metric("last_success_timestamp_seconds", "Finish time of the newest backup of each kind", "gauge",
           per_kind("last_success"))
    metric("last_size_bytes", "Bytes stored by the newest backup of each kind", "gauge", per_kind("last_size_bytes"))
    metric("last_duration_seconds", "Duration of the newest backup of each kind", "gauge",
           per_kind("last_duration_seconds"))
    metric("backup_age_seconds", "Age of the newest backup of each kind", "gauge", per_kind("age_seconds"))
    metric("backups", "Backups in the repository by kind", "gauge",
           [(f'{repo},kind="{k}"', v) for k, v in sorted(m.get("count", {}).items())])
    metric("repository_size_bytes", "Bytes stored by all listed backups", "gauge", [(repo, m.get("repository_bytes"))])
    metric("wal_archive_lag_seconds", "Seconds since the newest WAL segment was archived", "gauge",
           [(repo, m.get("wal_lag_seconds"))])
    metric("wal_gaps", "Missing WAL ranges after the oldest base backup", "gauge",
           [(repo, m.get("wal_gaps") if m.get("wal_segments") is not None else None)])
    metric("verification_age_seconds", "Seconds since the newest verification run", "gauge",
           [(repo, m.get("verification_age_seconds"))])
    metric("verification_success", "1 if the newest verification run passed", "gauge",
           [(repo, m.get("verification_ok"))])
    health = sorted(m.get("health", {}).items())
    metric("health_last_run_timestamp_seconds", "Start of the newest run of each health check", "gauge",
           [(f'{repo},check="{name}"', h["last_run"]) for name, h in health])
    metric("health_last_ok", "1 if the newest run of each health check passed (warnings pass)", "gauge",
           [(f'{repo},check="{name}"', h["last_ok"]) for name, h in health])
    metric("status_evaluated_timestamp_seconds", "When this file was computed (policy time)", "gauge",
           [(repo, float(report.now.timestamp()))])
    return "\n".join(lines) + "\n"
