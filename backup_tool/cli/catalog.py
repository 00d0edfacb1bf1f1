"""``list``, ``show``, ``verify``: the repository as a catalog, read from the repository alone."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool import __version__
from backup_tool.cli.common import (
    DatabaseOption,
    Invocation,
    app,
    command,
    render_entries,
    render_report,
    render_show,
)
from backup_tool.errors import EXIT_VALIDATION


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    print(f"backup-tool {__version__}")


def _print_version(value: bool) -> None:
    if value:
        print(f"backup-tool {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Options of 'backup-tool' itself (the help text is the app's)."""


@command(app, "list", needs_policy=False)
def list_cmd(inv: Invocation) -> int:
    """List every complete backup in the repository, oldest first (needs no local state)."""
    from backup_tool.repository.catalog import REFUSED, Catalog
    from backup_tool.repository.storage import open_repository

    indexed, problems = Catalog(open_repository(inv.settings.repo_url)).entries()
    for p in problems:
        inv.reporter.warning(f"{'refused' if isinstance(p, REFUSED) else 'unreadable'} manifest skipped: {p.message}")
    entries = [dict(e.summary) for e in indexed]
    inv.out(entries, lambda: render_entries(entries) if entries else f"no backups in {inv.settings.repo_url}")
    return EXIT_VALIDATION if problems else 0


@command(app, "show", needs_policy=False)
def show_cmd(inv: Invocation, backup_id: Annotated[str, typer.Argument(metavar="ID", help="Backup id, unique prefix or 'latest'")],
             database: DatabaseOption = None) -> int:
    """Show one backup's manifest summary: tables, rows, objects, checksums."""
    from backup_tool.repository.catalog import Catalog
    from backup_tool.repository.manifest import inventory_counts
    from backup_tool.repository.storage import open_repository

    m = Catalog(open_repository(inv.settings.repo_url)).resolve(backup_id, database=inv.database(database))
    data = {**m.summary(), "system_identifier": m.system_identifier, "snapshot_lsn": m.snapshot_lsn,
            "schema_fingerprint": m.schema_fingerprint, "policy": m.policy, "options": m.options,
            "server_major": m.server_major, "client_tools": m.client_tools,
            "tables": [{"table": t.full_name, "kind": t.relkind, "parent": t.parent, "rows": t.rows,
                        "checksum": t.checksum, "object": t.stored[0].key if t.stored else None,
                        "size_bytes": sum(o.size for o in t.stored),
                        **({"parts": [o.key for o in t.parts]} if t.parts else {})} for t in m.tables],
            "objects": [{"key": o.key, "size": o.size, "sha256": o.sha256, "raw_size": o.raw_size}
                        for o in m.objects()],
            "inventory": inventory_counts(m.inventory),
            **({"databases": list(m.physical.databases)} if m.physical else {})}

    inv.out(data, lambda: render_show(data))
    return 0


@command(app, "verify", needs_policy=False)
def verify_cmd(
    inv: Invocation,
    which: Annotated[str, typer.Argument(metavar="[ID|latest|all]", help="Which backups to verify")] = "latest",
    restore_test: Annotated[bool, typer.Option("--restore-test", help="Also restore into a scratch database "
                                               "and validate it (then drop it)")] = False,
    scratch_dsn: Annotated[Optional[str], typer.Option("--scratch-dsn", metavar="DSN",
                                                       help="Server for --restore-test (default: the --dsn server)")] = None,
    database: DatabaseOption = None,
) -> int:
    """Re-read every object of the backup(s) and check its sha256; exit 3 naming any bad object."""
    from backup_tool.jobs.verify import verify

    report = verify(inv.settings, which, restore_test, scratch_dsn or "", inv.reporter, inv.database(database))
    inv.out(report.to_dict(), lambda: render_report(report))
    return 0 if report.ok else EXIT_VALIDATION


