"""``backup base`` and ``restore pitr``: physical base backups and point-in-time recovery."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool.cli.common import (
    Invocation,
    backup_app,
    command,
    human_size,
    human_time,
    render_report,
    restore_app,
)
from backup_tool.cli.restore import WAIT_HELP
from backup_tool.errors import EXIT_VALIDATION


@command(backup_app, "base")
def backup_base_cmd(
    inv: Invocation,
    fast_checkpoint: Annotated[Optional[bool], typer.Option(
        "--fast-checkpoint/--spread-checkpoint",
        help="Start with an immediate checkpoint, or wait for a spread one (minutes) "
             "(default: policy backup.fast_checkpoint)")] = None,
    method: Annotated[str, typer.Option(
        "--method", metavar="auto|direct|pg_basebackup",
        help="Read the data directory directly (on the database host, when it is provably this "
             "cluster's), or stream through pg_basebackup; auto picks direct when it can")] = "auto",
    data_directory: Annotated[Optional[str], typer.Option(
        "--data-directory", metavar="DIR",
        help="Where the cluster's data directory is seen from here, for --method direct/auto "
             "(default: the server's data_directory setting)")] = None,
) -> int:
    """Take a physical base backup of the whole cluster for point-in-time recovery, reading the
    data directory directly on the database host or through pg_basebackup (which needs a role
    with REPLICATION and a pg_hba.conf 'replication' line), with WAL archiving into this
    repository (archive_command = 'backup-tool wal push %p')."""
    from pathlib import Path

    from backup_tool.errors import UsageError
    from backup_tool.physical.basebackup import BaseMethod, backup_base

    try:
        chosen = BaseMethod(method)
    except ValueError:
        raise UsageError(f"--method {method} is not one of auto, direct, pg_basebackup",
                         "auto reads the data directory when it can, else runs pg_basebackup") from None
    manifest = backup_base(inv.settings, inv.reporter, fast_checkpoint, chosen,
                           Path(data_directory) if data_directory else None)
    entry = manifest.summary()
    inv.out(entry, lambda: f"base backup {entry['id']} complete: {human_size(entry['raw_bytes'])} stored as "
                           f"{human_size(entry['size_bytes'])}, WAL {entry['start_lsn']} .. {entry['stop_lsn']} "
                           f"on timeline {entry['timeline']}, {entry['checkpoint']} checkpoint, "
                           f"{entry.get('method', 'pg_basebackup')}, "
                           f"expires {human_time(entry['expires_at'])}")
    return 0


@command(restore_app, "pitr", needs_policy=False)
def restore_pitr_cmd(
    inv: Invocation,
    pgdata: Annotated[str, typer.Option("--pgdata", metavar="DIR",
                                        help="Data directory to create (must be empty or absent)")],
    target_time: Annotated[Optional[str], typer.Option("--target-time", metavar="TS",
                                                       help="Recover to this time (ISO 8601; no zone = UTC)")] = None,
    target_lsn: Annotated[Optional[str], typer.Option("--target-lsn", metavar="LSN",
                                                      help="Recover to this WAL location (e.g. 0/3000060)")] = None,
    target_name: Annotated[Optional[str], typer.Option("--target-name", metavar="NAME",
                                                       help="Recover to a restore point made with "
                                                            "pg_create_restore_point(NAME)")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Recover everything the archive holds")] = False,
    target_timeline: Annotated[str, typer.Option("--target-timeline", metavar="N|latest",
                                                 help="Timeline to follow")] = "latest",
    port: Annotated[Optional[int], typer.Option("--port", metavar="PORT", min=1, max=65535,
                                                help="Port for the restored server (written to its "
                                                     "postgresql.auto.conf; default: the backed-up one, which the source "
                                                     "server holds if it runs on this machine)")] = None,
    start: Annotated[bool, typer.Option("--start/--no-start",
                                        help="Start the server, wait for recovery, validate, and leave it "
                                             "running (--no-start: only lay out the data directory)")] = True,
    os_user: Annotated[Optional[str], typer.Option("--os-user", metavar="USER",
                                                   help="OS user to own and run the server when run as root "
                                                        "(default: owner of --pgdata, else postgres)")] = None,
    archive: Annotated[bool, typer.Option("--archive/--no-archive",
                                          help="Keep the backed-up archive_mode (the new timeline is archived "
                                               "into the repository), or switch archiving off for a "
                                               "throwaway copy")] = True,
    server_command: Annotated[Optional[str], typer.Option(
        "--server-command", metavar="CMD",
        help="How the server's OS user runs this tool in restore_command (default: from the backed-up "
             "archive_command, env BACKUP_TOOL_SERVER_COMMAND, or this executable)")] = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the final validation")] = False,
    timeout: Annotated[Optional[float], typer.Option("--timeout", metavar="SECONDS",
                                                     help="Give up if recovery takes longer")] = None,
    database: Annotated[Optional[str], typer.Option(
        "--database", metavar="NAME",
        help="Use only base backups of a cluster that held this database (a base backup restores "
             "the whole cluster)")] = None,
    wait: Annotated[float, typer.Option("--wait", metavar="SECONDS", min=0, help=WAIT_HELP)] = 0.0,
    only_database: Annotated[Optional[str], typer.Option(
        "--only-database", metavar="NAME",
        help="Restore this database alone (with postgres and the templates): the others are laid out "
             "as sparse files and dropped after recovery")] = None,
) -> int:
    """Point-in-time recovery into a new data directory: the newest base backup before the target plus
    archived WAL. With --start (default) the server recovers privately, promotes at the target, is
    validated, then runs with its own configuration. A target outside what the repository covers is
    refused, naming the covered window."""
    from backup_tool.physical.pitr import make_target, restore_pitr

    target = make_target(target_time, target_lsn, target_name, latest, target_timeline)
    result = restore_pitr(inv.settings, target, pgdata, port=port, start=start, os_user=os_user,
                          archive=archive, server_command=server_command,
                          run_validation=False if no_validate else None, timeout=timeout,
                          reporter=inv.reporter, database=database, wait=wait, only_database=only_database)

    def text() -> str:
        d = result.to_dict()
        held = f"databases {', '.join(d['databases'])}; " if d["databases"] else ""
        lines = [f"restored base backup {d['backup_id']} ({held}finished {d['backup_finished_at']}) into "
                 f"{d['pgdata']} (owner {d['os_user']}), target {target.describe()}"]
        if result.only_database:
            lines.append(f"only database {result.only_database} kept ({result.layout} lay-out); dropped: "
                         f"{', '.join(result.dropped) or 'none'}")
        r = d["recovered_to"]
        if r:
            lines.append(f"recovered to: {r['stop_reason']}; last transaction {r['time']}, LSN {r['lsn']}, "
                         f"new timeline {r['timeline']} ({r['segments_restored']} WAL segments replayed)")
            lines.append(f"server running{' on port ' + str(d['port']) if d['port'] else ''}; took "
                         f"{d['seconds']['total']}s")
        else:
            lines.append(f"not started: start it as {d['os_user']} with 'pg_ctl -D {d['pgdata']} start'; it "
                         "replays WAL from the repository to the target and promotes")
        if result.validation is not None:
            lines.append(render_report(result.validation))
        return "\n".join(lines)

    inv.out(result.to_dict(), text)
    return 0 if result.ok else EXIT_VALIDATION
