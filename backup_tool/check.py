"""Preflight checks (``backup-tool check``): is everything in place for the next backup?

Checks the policy, the repository (reachable, writable, manifests readable), the database
(reachable, version, privileges to dump) and the PostgreSQL client tools. Each check says
what is wrong and what to do, so cron's first run does not have to be the test.
"""

from __future__ import annotations

from backup_tool import postgres
from backup_tool.catalog import Catalog
from backup_tool.config import Settings
from backup_tool.errors import BackupToolError
from backup_tool.postgres import ConnInfo
from backup_tool.storage import open_storage
from backup_tool.validate import Check, ValidationReport


def run_checks(settings: Settings) -> ValidationReport:
    checks = [Check("policy", True, f"{settings.policy.name} ({settings.policy.source})")]
    try:
        storage = open_storage(settings.repo_url)
        storage.check_writable()
        manifests, problems = Catalog(storage).scan()
        if problems:
            checks.append(Check("repository", False, problems[0].message))
        else:
            checks.append(Check("repository", True, f"{storage.url} writable, {len(manifests)} backups"))
        from backup_tool.retention import check_object_lock

        ok, detail = check_object_lock(storage, settings.policy)
        checks.append(Check("object_lock", ok, detail))
    except BackupToolError as exc:
        checks.append(Check("repository", False, str(exc)))
    conninfo = ConnInfo(settings.dsn)
    try:
        with conninfo.connect() as conn:
            info = postgres.server_info(conn)
            checks.append(Check("database", True, f"{conninfo.redacted()}: PostgreSQL {info['server_version']}"))
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE NOT has_table_privilege(c.oid, 'SELECT'))"
                "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                f" WHERE c.relkind IN ('r', 'p', 'S') AND {postgres.SYSTEM_SCHEMA_FILTER}").fetchone()
            unreadable = row[0] if row else 0
            checks.append(Check("privileges", not unreadable,
                                "can read every table" if not unreadable else
                                f"{unreadable} tables/sequences not readable by this user: grant SELECT or use the owner"))
            major = info["server_version_num"] // 10000
            tools = [postgres.find_tool(t, major) for t in ("pg_dump", "pg_restore", "psql", "pg_dumpall")]
            checks.append(Check("client_tools", True, ", ".join(tools)))
    except BackupToolError as exc:
        checks.append(Check("database", False, str(exc)))
    return ValidationReport(conninfo.redacted(), None, tuple(checks))
