"""``restore ...``: restores that never overwrite unless told to, ending with validation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool.cli.common import (
    Invocation,
    command,
    render_report,
    restore_app,
)


@command(restore_app, "full", secret_params=("target_dsn",))
def restore_full_cmd(
    inv: Invocation,
    target_dsn: Annotated[str, typer.Option("--target-dsn", metavar="DSN",
                                            help="Database to restore into (must be empty)")],
    backup: Annotated[str, typer.Option("--backup", metavar="ID|latest", help="Backup to restore")] = "latest",
    create: Annotated[bool, typer.Option("--create", help="Create the target database if it does not exist")] = False,
    with_roles: Annotated[bool, typer.Option("--with-roles", help="Create roles the backup needs that the "
                                             "target server lacks (without passwords)")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, max=64,
                                                help="Tables loaded in parallel (default: policy backup.jobs)")] = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the final validation")] = False,
) -> int:
    """Restore a whole backup into an empty database, then validate it against the manifest (exit 3 if not identical)."""
    from backup_tool.restore import restore_full

    result = restore_full(inv.settings, target_dsn, backup, create=create, with_roles=with_roles,
                          jobs=jobs, run_validation=False if no_validate else None, reporter=inv.reporter)
    inv.out(result.to_dict(), lambda: render_report(result))
    return 0


