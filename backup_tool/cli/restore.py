"""``restore ...``: restores that never overwrite unless told to, ending with validation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from backup_tool.cli.common import (
    DatabaseOption,
    Invocation,
    command,
    render_report,
    restore_app,
)
from backup_tool.errors import UsageError

WAIT_HELP = ("With --target-time: when the WAL archive does not reach the time yet (its first commit "
             "after it is not archived), wait up to SECONDS for it instead of refusing at once")

RESTORE_DSN_HELP = ("Not written to: only names the database 'latest' means when the repository "
                    "holds several, like --database (env DATABASE_URL). The restore goes to --target-dsn")


@command(restore_app, "full", secret_params=("target_dsn",), dsn_help=RESTORE_DSN_HELP, needs_policy=False)
def restore_full_cmd(
    inv: Invocation,
    target_dsn: Annotated[str, typer.Option("--target-dsn", metavar="DSN",
                                            help="Database to restore into (must be empty)")],
    backup: Annotated[str, typer.Option("--backup", metavar="ID|latest", help="Backup to restore")] = "latest",
    create: Annotated[bool, typer.Option("--create", help="Create the target database if it does not exist")] = False,
    with_roles: Annotated[bool, typer.Option("--with-roles", help="Create roles the backup needs that the "
                                             "target server lacks (without passwords)")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", min=1, max=64,
                                                help="Tables loaded in parallel (default: policy backup.jobs)")] = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the final validation")] = False,
    no_analyze: Annotated[bool, typer.Option("--no-analyze", help="Skip ANALYZE after the load (a restored "
                                             "database has no planner statistics until autovacuum runs)")] = False,
    schema_from_migrations: Annotated[Optional[str], typer.Option(
        "--schema-from-migrations", metavar="DIR",
        help="Build the schema by replaying these migrations (a Supabase project or a folder of "
             "<version>_<name>.sql) instead of the backup's schema; refused if it cannot hold the data")] = None,
    restart_unfinished: Annotated[bool, typer.Option(
        "--restart-unfinished",
        help="The target holds an interrupted restore (schema backup_tool_unfinished_restore): drop "
             "everything that restore created and restore again. Never touches a target without that marker")] = False,
    database: DatabaseOption = None,
) -> int:
    """Restore a whole backup into an empty database, then validate it against the manifest (exit 3 if not identical)."""
    from backup_tool.logical.restore import restore_full

    result = restore_full(inv.settings, target_dsn, backup, create=create, with_roles=with_roles,
                          jobs=jobs, run_validation=False if no_validate else None, reporter=inv.reporter,
                          schema_from_migrations=schema_from_migrations, restart_unfinished=restart_unfinished,
                          analyze=not no_analyze,
                          database=inv.database(database))
    inv.out(result.to_dict(), lambda: render_report(result))
    return 0




@command(restore_app, "tables", secret_params=("target_dsn",), dsn_help=RESTORE_DSN_HELP, needs_policy=False)
def restore_tables_cmd(
    inv: Invocation,
    tables: Annotated[str, typer.Option("--tables", metavar="SCHEMA.TABLE[,...]",
                                        help='Tables to restore; a partitioned table brings its partitions; '
                                             'quote mixed case: analytics."UserJourneys"')],
    target_dsn: Annotated[str, typer.Option("--target-dsn", metavar="DSN", help="Database to restore into")],
    backup: Annotated[Optional[str], typer.Option("--backup", metavar="ID|latest",
                                                  help="Backup to take the tables from (default: latest)")] = None,
    target_time: Annotated[Optional[str], typer.Option("--target-time", metavar="TS",
                                                       help="Tables as they were at this time (point-in-time, "
                                                            "from base backup + WAL)")] = None,
    full_layout: Annotated[bool, typer.Option("--full-layout",
                                              help="With --target-time: recover from the whole base backup "
                                                   "instead of just the files the tables need")] = False,
    into_schema: Annotated[Optional[str], typer.Option("--into-schema", metavar="NAME",
                                                       help="Recreate the tables in this new schema, beside the live ones")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace the tables' current contents "
                                          "(one transaction; rolled back if foreign keys would break)")] = False,
    with_roles: Annotated[bool, typer.Option("--with-roles", help="Create missing roles from the backup")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", min=1, max=64,
                                                help="Tables loaded in parallel (default: policy backup.jobs)")] = None,
    wait: Annotated[float, typer.Option("--wait", metavar="SECONDS", min=0,
                                        help=WAIT_HELP)] = 0.0,
    database: DatabaseOption = None,
) -> int:
    """Restore only the named tables: into empty/absent tables, beside them (--into-schema), or over them (--replace)."""
    from backup_tool.cli.entry import resume_collection
    from backup_tool.logical.selection import split_names

    names = split_names(tables)
    if target_time:
        if backup:
            raise UsageError("give --backup or --target-time, not both", "--target-time picks the base backup itself")
        from backup_tool.jobs.table_pitr import restore_tables_at

        resume_collection()
        result = restore_tables_at(inv.settings, target_dsn, names, target_time, into_schema=into_schema,
                                   replace=replace, jobs=jobs, reporter=inv.reporter, wait=wait,
                                   partial_layout=not full_layout)
    else:
        if wait:
            raise UsageError("--wait goes with --target-time", "it waits for the WAL archive to reach that time")
        if full_layout:
            raise UsageError("--full-layout applies only with --target-time")
        from backup_tool.cli import ahead
        from backup_tool.logical.session_ahead import open_session_ahead

        session = open_session_ahead(target_dsn)  # opening while the restore's modules load
        backend = None
        try:
            from backup_tool.logical.restore_tables import restore_tables

            resume_collection()
            backend = ahead.backend_for(inv.settings.repo_url)
            result = restore_tables(inv.settings, target_dsn, names, "latest" if backup is None else backup, into_schema=into_schema,
                                    replace=replace, with_roles=with_roles, jobs=jobs, reporter=inv.reporter,
                                    database=inv.database(database), backend=backend, session=session)
        except BaseException:
            if session is not None:
                session.abandon()
            raise
        finally:
            ahead.stop()
            if backend is not None:
                inv.reporter.event("repository reads made ahead", answered=len(backend.answered),
                                   store_opened=backend.opened)
    inv.out(result.to_dict(), lambda: render_report(result))
    return 0
