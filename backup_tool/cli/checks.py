"""``validate`` and ``check``: health checks of a database and of the configuration."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool.cli.common import (
    DatabaseOption,
    Invocation,
    app,
    command,
    human_time,
    render_report,
)
from backup_tool.errors import EXIT_VALIDATION


@command(app, "validate")
def validate_cmd(
    inv: Invocation,
    against: Annotated[Optional[str], typer.Option("--against", metavar="ID|latest",
                                                   help="Compare with this backup: a restore's check (without it, no row or schema comparison)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", min=1, max=64, help="Parallel checksum sessions")] = 2,
    database: DatabaseOption = None,
) -> int:
    """Run the health checks on the --dsn database; with --against, also compare it with a backup.
    Alone: foreign keys hold, indexes valid, RLS on where policies are, sequences not behind.
    --against adds the schema, privileges, roles, rows and content checksums... of that backup.
    Exit 3 if any fails."""
    from backup_tool.postgres.connection import ConnInfo
    from backup_tool.repository.catalog import Catalog
    from backup_tool.repository.storage import open_repository
    from backup_tool.validation.validate import validate

    settings = inv.settings
    manifest = storage = None
    if against is not None:
        storage = open_repository(settings.repo_url)
        manifest = Catalog(storage).resolve(against, database=inv.database(database))
    report = validate(ConnInfo(settings.dsn), manifest, storage, jobs=jobs, reporter=inv.reporter)

    def text() -> str:
        body = render_report(report, uncompared=manifest is None)
        if manifest is None:
            return body
        from backup_tool.repository.manifest import utc_iso

        return (f"compared {report.target} with backup {manifest.id} of database {manifest.database} "
                f"(taken {human_time(utc_iso(manifest.started_at))})\n{body}")

    inv.out(report.to_dict(), text)
    return 0 if report.ok else EXIT_VALIDATION


@command(app, "check")
def check_cmd(inv: Invocation) -> int:
    """Check configuration, database connectivity and privileges, client tools, and that the repository is writable."""
    from backup_tool.jobs.check import run_checks

    report = run_checks(inv.settings)
    inv.out(report.to_dict(), lambda: render_report(report))
    return 0 if report.ok else EXIT_VALIDATION
