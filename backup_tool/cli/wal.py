"""``wal push``, ``wal fetch``, ``wal status``: the WAL archive behind point-in-time recovery.

``wal push %p`` is PostgreSQL's ``archive_command`` and ``wal fetch %f %p`` its
``restore_command``: both are silent on success (PostgreSQL's log stays readable) and say
one line on stderr otherwise.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from backup_tool.cli.common import Invocation, command, wal_app
from backup_tool.errors import EXIT_VALIDATION
from backup_tool.physical import walspool


@command(wal_app, "push")
def wal_push_cmd(
    inv: Invocation,
    wal_path: Annotated[str, typer.Argument(metavar="WAL_PATH",
                                            help="The file to archive: PostgreSQL's %p")],
    batch: Annotated[int, typer.Option("--batch", metavar="N", min=1, max=64,
                                       help="Push the segments PostgreSQL has marked ready in a background "
                                            "process, in parallel, up to N ahead of its calls, which then "
                                            "only wait for their own (1 = one segment per call, in the "
                                            "call itself)")] = 16,
) -> int:
    """Archive one WAL file (archive_command = 'backup-tool wal push %p'). Exit 0 only once it is
    durable in the repository; pushing identical content again succeeds, different content under
    the same name is refused (exit 1) and nothing is overwritten."""
    from pathlib import Path

    from backup_tool.physical import walack, walpush

    settings = inv.settings
    pg_wal = Path(wal_path).absolute().parent

    def push_ahead() -> None:
        walpush.run_pusher(pg_wal, lambda: walpush.open_push_target(settings), batch)

    marker = walack.acknowledged(wal_path, settings.repo_url) \
        if walack.acknowledge_or_push_ahead(wal_path, settings.repo_url, batch, push_ahead) else None
    name = wal_path.rsplit("/", 1)[-1]
    if marker is not None:
        if inv.common.json:
            ahead = walpush.pushed_ahead(pg_wal, settings.repo_url, name)
            inv.out(walpush.result_from_marker(name, marker, ahead).to_dict(), "")
        return 0
    target = walpush.open_push_target(settings)
    result = walpush.push(target.storage, wal_path, settings.repo_url, level=target.level)
    if inv.common.json:
        inv.out(result.to_dict(), "")
    return 0


@command(wal_app, "fetch", needs_policy=False,
         exit_codes="Exit codes (PostgreSQL's restore_command conventions): 0 DEST holds the file, 1 not in "
                    "the archive (or another failure), 2 usage error, 3 the archived copy is corrupt; with "
                    "--abort-on-error, 255 on any failure but 'not in the archive'.")
def wal_fetch_cmd(
    inv: Invocation,
    wal_name: Annotated[str, typer.Argument(metavar="WAL_NAME", help="The file to restore: PostgreSQL's %f")],
    destination: Annotated[str, typer.Argument(metavar="DEST", help="Where to write it: PostgreSQL's %p")],
    prefetch: Annotated[int, typer.Option("--prefetch", metavar="N", min=0, max=64,
                                          help="After fetching a segment, download and verify the next N in "
                                               "the background so PostgreSQL's next calls return at once "
                                               "(0 = off)")] = 8,
    abort_on_error: Annotated[bool, typer.Option(
        "--abort-on-error",
        help="On any failure other than 'not in the archive' exit 255, so that PostgreSQL aborts "
             "recovery instead of ending it early ('restore pitr' writes this)")] = False,
) -> int:
    """Restore one WAL file from the archive (restore_command = 'backup-tool wal fetch %f %p').
    Exit 0 once DEST holds the verified content; 1 quickly when the file is not in the archive
    (the normal end of recovery); 3 if the archived copy is corrupt (DEST is not written)."""
    from backup_tool.errors import BackupToolError
    from backup_tool.physical import wal
    from backup_tool.repository.storage import open_repository

    if walspool.take_prefetched(wal_name, destination):
        if inv.common.json:
            inv.out({"name": wal_name, "destination": destination, "from_read_ahead": True}, "")
        return 0
    repo_url = inv.settings.repo_url
    try:
        result = wal.fetch(open_repository(repo_url), wal_name, destination)
    except wal.WalMissingError:
        print(f"backup-tool: {wal_name} is not in the archive (end of archive)", file=sys.stderr)
        return 1
    except BackupToolError as exc:
        if not abort_on_error:
            raise
        print(inv.redact(f"backup-tool: error: {exc}"), file=sys.stderr)
        return 255
    wal.prefetch_in_background(repo_url, wal_name, destination, prefetch)
    if inv.common.json:
        inv.out(result.to_dict(), "")
    return 0


@command(wal_app, "status")
def wal_status_cmd(inv: Invocation) -> int:
    """Show what the WAL archive covers: segments, timelines, newest segment and its age, and gaps
    after the oldest base backup. Exit 3 when any check fails (a gap, nothing archived, the newest
    segment older than the policy's monitoring.wal_max_age_minutes)."""
    from datetime import timedelta

    from backup_tool.physical.wal import format_lsn, repository_health

    health = repository_health(inv.settings)
    minutes = inv.settings.policy.monitoring.wal_max_age_minutes
    checks = health.checks(timedelta(minutes=minutes) if minutes else None)

    def text() -> str:
        newest = health.newest
        lines = [f"repository: {health.repository}",
                 f"segments: {health.segments} on timelines {', '.join(map(str, health.timelines)) or '-'}",
                 f"newest: {newest.name if newest else '-'} (archived {newest.modified if newest else '-'})"]
        for c in health.coverage:
            lines.append(f"timeline {c.timeline}: continuous {c.start_segment} .. {c.last_segment} "
                         f"(to LSN {format_lsn(c.end_lsn)}, archived until {c.archived_until})")
        lines += [f"GAP: {g}" for g in health.gaps]
        lines += [f"{'ok  ' if c.ok else 'FAIL'}  {c.name}  {c.detail}" for c in checks]
        return "\n".join(lines)

    inv.out({**health.to_dict(), "checks": [c.to_dict() for c in checks]}, text)
    return EXIT_VALIDATION if health.gaps or not all(c.ok for c in checks) else 0
