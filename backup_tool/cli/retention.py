"""``retention apply``: expire backups and WAL per the policy, safely, with a deletion log."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from backup_tool.cli.common import Invocation, command, human_size, human_time, human_times, retention_app
from backup_tool.errors import EXIT_FAILED

NOW_HELP = "Evaluate the policy as of this ISO 8601 time (no zone = UTC); recorded times never change"


def render_retention(data: dict[str, Any]) -> str:
    verb = "would delete" if data["dry_run"] else "deleted"
    lines = []
    for d in data["decisions"]:
        mark = ("DELETE" if data["dry_run"] else "deleted") if d["action"] == "delete" else "keep  "
        lines.append(f"{mark}  {d['id']:<25} {d['kind']:<11} {human_time(d['started_at'])}  "
                     + human_times("; ".join(d["reasons"])))
    if data["wal"]:
        w = data["wal"]
        lines.append(f"WAL: {verb} {w['delete']} segment(s), kept {w['kept']}: {human_times(w['reason'])}")
    for g in data["garbage"]:
        lines.append(f"garbage: {verb} {g['what']} ({g['objects']} objects, {g['unfinished_uploads']} unfinished "
                     f"uploads, {human_size(g['bytes'])}): {g['reason']}")
    lines += [f"note: {human_times(n)}" for n in data["notes"]]
    lines += [f"FAILED: {f}" for f in data["failed"]]
    lines.append(f"{verb} {len(data['deleted'])} backup(s) ({human_size(data['deleted_bytes'])}), kept "
                 f"{len(data['kept'])}" + (f"; logged in {data['log']}" if data["log"] else "")
                 + f" (policy {data['policy']}, as of {human_time(data['now'])})")
    return "\n".join(lines)


@command(retention_app, "apply")
def retention_apply_cmd(
    inv: Invocation,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be deleted; delete and log nothing")] = False,
    now: Annotated[Optional[str], typer.Option("--now", metavar="TS", help=NOW_HELP)] = None,
) -> int:
    """Delete expired backups, WAL no retained base backup needs, and garbage of crashed runs.

    Never deletes the newest full (or fewer than retention.min_fulls), a backup a retained one
    depends on, WAL the PITR window needs, a backup in progress, or an object under Object Lock;
    each kept backup says why. Every real run is recorded in the repository's retention-log/."""
    from backup_tool.core.timestamps import parse_ts
    from backup_tool.jobs.expire import apply_retention

    result = apply_retention(inv.settings, parse_ts(now) if now else None, dry_run, inv.reporter)
    data = result.to_dict()
    inv.out(data, lambda: render_retention(data))
    return 0 if result.ok else EXIT_FAILED
