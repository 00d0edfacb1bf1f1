"""``schedule``, ``run-due``, ``status`` and ``audit``: running the policy unattended and
proving it was followed."""

from __future__ import annotations

import shutil
import sys
from typing import Annotated, Any, Optional

import typer

from backup_tool.cli.common import Invocation, app, command
from backup_tool.cli.retention import NOW_HELP, render_retention
from backup_tool.errors import EXIT_FAILED, EXIT_VALIDATION


@command(app, "schedule")
def schedule_cmd(
    inv: Invocation,
    fmt: Annotated[str, typer.Option("--format", metavar="cron|systemd|kubernetes",
                                     help="crontab lines, systemd timer + service units, or Kubernetes CronJobs")] = "cron",
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Name for units/CronJobs/Secret (default: the database)")] = "",
    image: Annotated[str, typer.Option("--image", metavar="IMAGE", help="Container image for --format kubernetes")] = "backup-tool:latest",
    log_file: Annotated[str, typer.Option("--log-file", metavar="FILE", help="Log file for --format cron")] = "/var/log/backup-tool.log",
    textfile: Annotated[str, typer.Option("--textfile", metavar="FILE", help="Prometheus textfile written by 'status' after each run")]
    = "/var/lib/node_exporter/textfile_collector/backup_tool.prom",
) -> int:
    """Print what runs the policy: a frequent 'run-due' (takes whichever backup is due, then
    updates the monitoring textfile) and a daily 'retention apply' + 'verify latest'."""
    from backup_tool.render.units import render_schedule

    exe = shutil.which("backup-tool")
    executable = [exe] if exe else [sys.executable, "-m", "backup_tool"]
    text = render_schedule(inv.settings, fmt, executable, name, image, log_file, textfile)
    inv.out({"format": fmt, "text": text}, lambda: text.rstrip("\n"))
    return 0


def _render_run_due(data: dict[str, Any]) -> str:
    lines = [f"as of {data['now']}: " + (", ".join(f"{d['kind']} due ({d['reason']})" for d in data["due"])
                                         or "nothing due")]
    lines += [f"  {n}" for n in data["notes"]]
    if data["dry_run"]:
        lines += [f"would take {d['kind']}" + (f" for slot {d['slot']}" if d["slot"] else "") + f": {d['reason']}"
                  for d in data["due"]]
        lines.append("dry run: nothing taken")
    lines += [f"took {t['kind']} {t['id']} ({t['size_bytes']} bytes)" for t in data["taken"]]
    if data["retention"]:
        lines.append(render_retention(data["retention"]))
    if data["retention_error"]:
        lines.append(f"retention failed: {data['retention_error']}")
    health = data.get("health") or {}
    if data["dry_run"] and health:
        lines += [f"would run health check {d['check']}: {d['reason']}" for d in health["due"]]
    if health.get("ran"):
        lines += [f"health check {c['name']}: {c['level']} — {c['detail']}" for c in health["ran"]["checks"]]
    if data.get("health_error"):
        lines.append(f"health checks failed to run: {data['health_error']}")
    if data["next_full"]:
        lines.append(f"next full slot {data['next_full']}"
                     + (f", next incremental slot {data['next_incremental']}" if data["next_incremental"] else ""))
    return "\n".join(lines)


@command(app, "run-due")
def run_due_cmd(
    inv: Invocation,
    now: Annotated[Optional[str], typer.Option("--now", metavar="TS",
                                               help="Plan as if it were TS (only with --dry-run)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be taken and why; take nothing")] = False,
) -> int:
    """Take the backup the policy says is due now (full, incremental, or nothing; a missed
    slot is taken now), under the lock (exit 4 if another backup runs), then apply retention
    when the policy says so, then run and record the health checks that are due ([health]
    frequencies; a failed check is reported by 'status', not by this exit code). Safe to call every few minutes: it never takes a slot twice.
    Backups are only taken at the real current time; --now plans with --dry-run."""
    from backup_tool.core.timestamps import parse_ts
    from backup_tool.errors import UsageError
    from backup_tool.jobs.run_due import plan_due, run_due

    at = parse_ts(now) if now else None
    if at is not None and not dry_run:
        raise UsageError("run-due --now only plans: a backup taken now cannot meet another time's slot",
                         "add --dry-run to see what would be due at that time, or drop --now")
    result = plan_due(inv.settings, at, inv.reporter) if dry_run else run_due(inv.settings, inv.reporter)
    data = result.to_dict()
    inv.out(data, lambda: _render_run_due(data))
    failed = result.retention_error or (result.retention and result.retention.get("failed")) or result.health_error
    return EXIT_FAILED if failed else 0


@command(app, "status", exit_codes="Exit codes (Nagios): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (e.g. the "
                                   "repository cannot be read).")
def status_cmd(
    inv: Invocation,
    now: Annotated[Optional[str], typer.Option("--now", metavar="TS", help=NOW_HELP)] = None,
    prometheus: Annotated[Optional[str], typer.Option("--prometheus", metavar="FILE",
                                                      help="Also write node_exporter textfile metrics (atomically)")] = None,
) -> int:
    """One-line health verdict with Nagios exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

    CRITICAL: no full since the last full slot + grace, WAL archive stale or gapped, last
    verification failed. WARNING: incremental late, verification too old."""
    from backup_tool.core.timestamps import parse_ts
    from backup_tool.jobs.status import collect_status, write_textfile
    from backup_tool.render.prometheus import prometheus_text

    report = collect_status(lambda: inv.settings, parse_ts(now) if now else None)
    if prometheus:
        write_textfile(prometheus, prometheus_text(report))
    inv.out(report.to_dict(), report.summary)
    return report.code


@command(app, "audit")
def audit_cmd(
    inv: Invocation,
    now: Annotated[Optional[str], typer.Option("--now", metavar="TS", help=NOW_HELP)] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="json|markdown|html", help="Report format")] = "json",
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE",
                                                  help="Write the report to FILE instead of stdout")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 when the verdict is NON-COMPLIANT")] = False,
) -> int:
    """The compliance report: policy in force, every backup (taken, size, verified, restore-tested,
    expiry, lock), every scheduled slot met or missed, retention adherence from the deletion log,
    PITR coverage, and a verdict. HTML is one self-contained page with a timeline."""
    from backup_tool.core.timestamps import parse_ts
    from backup_tool.jobs.audit import run_audit

    written = run_audit(inv.settings, parse_ts(now) if now else None, fmt, output)
    report, text = written.report, written.text
    if output:
        summary = {"verdict": report.verdict, "output": output, "format": fmt, "sha256": written.sha256,
                   "sha256_file": written.sidecar, "findings": [f.to_dict() for f in report.findings]}
        inv.out(summary, f"audit written to {output}: {report.verdict} "
                         f"({len(report.findings)} finding(s))\nsha256 {written.sha256} (also in {written.sidecar})")
    elif inv.common.json and fmt == "json":
        inv.out(report.to_dict(), text)
    else:
        print(inv.redact(text), end="" if text.endswith("\n") else "\n")
    return EXIT_VALIDATION if strict and report.verdict == "NON-COMPLIANT" else 0
