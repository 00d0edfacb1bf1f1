"""``schema replay`` and ``schema diff``: rebuild a schema from migrations, and check for drift."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool.cli.common import DatabaseOption, Invocation, command, schema_app
from backup_tool.errors import EXIT_VALIDATION, UsageError

MIGRATIONS_HELP = ("Migrations folder: a Supabase project (uses supabase/migrations) or a folder of "
                   "<version>_<name>.sql files, applied in numeric version order")


@command(schema_app, "replay", secret_params=("target_dsn",))
def replay_cmd(
    inv: Invocation,
    migrations: Annotated[str, typer.Option("--migrations", metavar="DIR", help=MIGRATIONS_HELP)],
    target_dsn: Annotated[str, typer.Option("--target-dsn", metavar="DSN", help="Database to build (must be empty)")],
    no_record: Annotated[bool, typer.Option("--no-record", help="Do not record the applied files in the "
                                            "target's backup_tool_migrations schema")] = False,
) -> int:
    """Apply the migrations in order to an empty database, each file in its own transaction; stop at the
    first failure naming the file, line and PostgreSQL's message (exit 1)."""
    from backup_tool.schema.migrations import replay_folder

    result = replay_folder(migrations, target_dsn, record=not no_record, reporter=inv.reporter)

    def text() -> str:
        lines = [f"applied  {a.file}  ({a.statements} statements, {a.seconds:.2f}s)" for a in result.applied]
        lines += [f"skipped  {name}  (not a <version>_<name>.sql migration)" for name in result.skipped]
        where = f"; recorded in {result.recorded_in}" if result.recorded_in else ""
        lines.append(f"replayed {len(result.applied)} migrations from {result.folder} into {result.target} "
                     f"in {result.seconds:.1f}s{where}")
        return "\n".join(lines)

    inv.out(result.to_dict(), text)
    return 0


@command(schema_app, "diff", secret_params=("scratch_dsn",))
def diff_cmd(
    inv: Invocation,
    migrations: Annotated[str, typer.Option("--migrations", metavar="DIR", help=MIGRATIONS_HELP)],
    against: Annotated[Optional[str], typer.Option("--against", metavar="ID|latest",
                                                   help="Compare with this backup's schema "
                                                        "(default: with the live --dsn database)")] = None,
    scratch_dsn: Annotated[Optional[str], typer.Option("--scratch-dsn", metavar="DSN",
                                                       help="Server for the scratch databases (created and dropped); "
                                                            "default: the --dsn / DATABASE_URL server")] = None,
    with_roles: Annotated[bool, typer.Option("--with-roles", help="Create roles the backup's schema needs "
                                             "that the scratch server lacks (without passwords)")] = False,
    exclude_schema: Annotated[Optional[list[str]], typer.Option(
        "--exclude-schema", metavar="NAME",
        help="Leave this schema out of the comparison (repeatable), e.g. platform-managed schemas")] = None,
    database: DatabaseOption = None,
) -> int:
    """Replay the migrations into a scratch database and compare its schema object by object (tables,
    columns, constraints, indexes, RLS, policies, functions, triggers, enums, extensions, grants) with a
    backup's schema (--against) or the live database (--dsn). Exit 3 on drift."""
    from backup_tool.schema.drift import diff

    if against is not None and inv.common.dsn:
        raise UsageError("give --against ID or --dsn DSN, not both",
                         "--against compares with a backup's schema, --dsn with a live database; "
                         "--scratch-dsn names the server for scratch databases")
    report = diff(inv.settings, migrations, against=against, scratch_dsn=scratch_dsn, with_roles=with_roles,
                  exclude_schemas=tuple(exclude_schema or ()), reporter=inv.reporter,
                  database=inv.database(database))

    def text() -> str:
        lines = [f"migrations: {report.migrations} ({report.files} files)   reference: {report.against}"]
        if report.drift:
            kind_w = max(len(d.kind) for d in report.drift)
            name_w = min(max(len(d.name) for d in report.drift), 60)
            lines.append(f"{'KIND':<{kind_w}}  {'OBJECT':<{name_w}}  {'CHANGE':<8}  DETAIL")
            lines += [f"{d.kind:<{kind_w}}  {d.name:<{name_w}}  {d.change:<8}  {d.describe()}" for d in report.drift]
            kinds = ", ".join(f"{n} {k}" for k, n in report.by_kind().items())
            lines.append(f"verdict: DRIFT — {len(report.drift)} difference(s) ({kinds}); "
                         "added = in the reference only, missing = in the migrations only")
        else:
            lines.append(f"verdict: no drift — {sum(report.compared.values())} objects match")
        return "\n".join(lines)

    inv.out(report.to_dict(), text)
    return 0 if report.ok else EXIT_VALIDATION
