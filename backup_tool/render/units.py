"""The text that runs a policy: a crontab, systemd service/timer units, or Kubernetes CronJobs.

Each runs a frequent ``run-due`` (which takes whatever is due, then refreshes the monitoring
textfile even when the backup failed) and a daily ``retention apply`` + ``verify latest``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from backup_tool.core.cron import parse_cron
from backup_tool.errors import ConfigError, UsageError
from backup_tool.postgres.connection import database_of

if TYPE_CHECKING:
    from backup_tool.config.policy import Policy
    from backup_tool.config.settings import Settings


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
    name = _k8s_name(name or database_of(settings.dsn) or policy.name)
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
