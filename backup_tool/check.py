"""Preflight checks (``backup-tool check``): is everything in place for the next backup?

Checks the policy, the repository (reachable, writable, manifests readable), the database
(reachable, version, privileges to dump), the PostgreSQL client tools, and — when the
database is set up for point-in-time recovery — WAL archiving: archive_command pushes to
this repository, pg_stat_archiver shows no failure, no gap after the oldest base backup,
and the newest segment is recent. Each check says
what is wrong and what to do, so cron's first run does not have to be the test.
"""

from __future__ import annotations

from typing import Any

from backup_tool import postgres
from backup_tool.catalog import Catalog
from backup_tool.config import Settings
from backup_tool.errors import BackupToolError
from backup_tool.manifest import Manifest
from backup_tool.postgres import ConnInfo
from backup_tool.storage import Storage, open_storage
from backup_tool.storage.encrypted import ALGORITHM, KEY_HINT, encryption_of
from backup_tool.validate import Check, ValidationReport, check_restore_finished


def archive_checks(conn: Any, storage: Storage, settings: Settings, uses_pitr: bool) -> list[Check]:
    """Archiving healthy, when this database is meant to be recoverable to a point in time."""
    from datetime import timedelta

    from backup_tool import wal
    from backup_tool.pitr import repository_health

    server = wal.archiving_checks(conn, storage)
    off = [c for c in server if c.name == "archive_mode" and not c.ok]
    if off and not uses_pitr:
        return [Check("archiving", True, "archive_mode is off and the repository holds no base backup or WAL: "
                                         "logical backups only, no point-in-time recovery")]
    minutes = settings.policy.monitoring.wal_max_age_minutes
    health = repository_health(settings).checks(timedelta(minutes=minutes) if minutes else None)
    return server + [archive_identity_check(conn, storage)] + health


def archive_identity_check(conn: Any, storage: Storage) -> Check:
    """The WAL archive belongs to this cluster (``wal/archive.info``, see :mod:`backup_tool.walidentity`)."""
    from backup_tool.walidentity import ClusterIdentity, mismatch, read_archive_identity

    row = conn.execute("SELECT system_identifier, current_setting('server_version_num')::int / 10000"
                       " FROM pg_control_system()").fetchone()
    assert row is not None
    local = ClusterIdentity(int(row[0]), int(row[1]))
    try:
        recorded = read_archive_identity(storage)
    except BackupToolError as exc:
        return Check("archive_identity", False, exc.message)
    if recorded is None:
        return Check("archive_identity", True, f"no cluster recorded yet in {storage.url}: the first wal push "
                                               f"records this one ({local.describe()})")
    if mismatch(recorded, local):
        return Check("archive_identity", False,
                     f"the WAL archive in {storage.url} belongs to {recorded.describe()}, not to this cluster "
                     f"({local.describe()}): its wal push is refused; give each cluster its own repository")
    return Check("archive_identity", True, f"the WAL archive belongs to this cluster ({local.describe()})")


def encryption_check(storage: Storage, manifests: list[Manifest]) -> Check:
    """Which key new backups will use, and whether it is the one the repository's backups need."""
    key = encryption_of(storage)
    used = sorted({m.encryption_key_id for m in manifests if m.encryption_key_id})
    if key is None:
        if used:
            return Check("encryption", False, f"backups here are encrypted (key id {', '.join(used)}) but no key is "
                         f"configured: backups and 'wal push' refuse to write plaintext here and restores fail — {KEY_HINT}")
        return Check("encryption", True, "off: objects are stored unencrypted "
                                         "(set BACKUP_TOOL_ENCRYPTION_KEY_FILE to encrypt new backups)")
    others = [k for k in used if k != key.key_id]
    return Check("encryption", True, f"{ALGORITHM}, key id {key.key_id}" + (
        f"; older backups use key id {', '.join(others)}: keep that key in BACKUP_TOOL_PREVIOUS_KEYS_FILE until "
        "they expire" if others else ""))


def run_checks(settings: Settings) -> ValidationReport:
    checks = [Check("policy", True, f"{settings.policy.name} ({settings.policy.source})")]
    storage: Storage | None = None
    uses_pitr = False
    try:
        storage = open_storage(settings.repo_url)
        storage.check_writable()
        manifests, problems = Catalog(storage).scan()
        uses_pitr = any(m.kind == "base" for m in manifests) or any(True for _ in storage.list("wal/"))
        if problems:
            checks.append(Check("repository", False, problems[0].message))
        else:
            checks.append(Check("repository", True, f"{storage.url} writable, {len(manifests)} backups"))
        from backup_tool.retention import check_object_lock

        ok, detail = check_object_lock(storage, settings.policy)
        checks.append(Check("object_lock", ok, detail))
        checks.append(encryption_check(storage, manifests))
    except BackupToolError as exc:
        checks.append(Check("repository", False, str(exc)))
    conninfo = ConnInfo(settings.dsn)
    try:
        with conninfo.connect() as conn:
            info = postgres.server_info(conn)
            checks.append(Check("database", True, f"{conninfo.redacted()}: PostgreSQL {info['server_version']}"))
            checks.append(check_restore_finished(conn))
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
            if storage is not None:
                checks.extend(archive_checks(conn, storage, settings, uses_pitr))
    except BackupToolError as exc:
        checks.append(Check("database", False, str(exc)))
    return ValidationReport(conninfo.redacted(), None, tuple(checks))
