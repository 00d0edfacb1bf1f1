"""The schema half of a backup: pg_dump's schema archive, its text form and fingerprint,
the cluster globals (roles), and replaying archive sections with pg_restore.

The schema is kept as a custom-format archive so pg_restore can replay it in sections
(pre-data before the table data, post-data after it) and pick single objects for
selective restores. The fingerprint is the sha256 of the archive's SQL text with the
parts that legitimately vary removed: comments and the random ``\\restrict`` keys that
pg_dump 15.14+ writes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from backup_tool import pipeline
from backup_tool.postgres import ConnInfo, find_tool


def dump_schema(conninfo: ConnInfo, major: int, snapshot_id: str | None = None) -> bytes:
    argv = [find_tool("pg_dump", major), "--format=custom", "--compress=0", "--schema-only",
            "--dbname", conninfo.tool_conninfo()]
    if snapshot_id:
        argv.append(f"--snapshot={snapshot_id}")
    return pipeline.run(argv, conninfo.tool_env(), "pg_dump (schema)")


def dump_globals(conninfo: ConnInfo, major: int) -> bytes:
    """Roles and memberships (no passwords: role password hashes are secrets)."""
    argv = [find_tool("pg_dumpall", major), "--globals-only", "--no-role-passwords",
            "--no-tablespaces", "--dbname", conninfo.tool_conninfo()]
    return pipeline.run(argv, conninfo.tool_env(), "pg_dumpall (roles)")


def schema_text(archive: bytes, major: int) -> str:
    argv = [find_tool("pg_restore", major), "--schema-only", "--file=-"]
    return pipeline.run(argv, dict(os.environ), "pg_restore (schema text)", input_bytes=archive).decode()


def normalize(text: str) -> str:
    kept = []
    for line in text.splitlines():
        if line.startswith(("--", "\\restrict", "\\unrestrict")) or not line.strip():
            continue
        kept.append(line.rstrip())
    return "\n".join(kept) + "\n"


def fingerprint(normalized: str) -> str:
    return hashlib.sha256(normalized.encode()).hexdigest()


def live_schema(conninfo: ConnInfo, major: int) -> str:
    """The normalized schema text of a live database, produced the way backups produce it."""
    return normalize(schema_text(dump_schema(conninfo, major), major))


def restore_section(archive_path: Path, conninfo: ConnInfo, major: int, section: str,
                    jobs: int = 1, extra: list[str] | None = None) -> None:
    """Replay one section (pre-data or post-data) of the schema archive into the target."""
    argv = [find_tool("pg_restore", major), f"--section={section}", "--exit-on-error",
            "--dbname", conninfo.tool_conninfo(), *(extra or [])]
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    else:
        argv.append("--single-transaction")
    argv.append(str(archive_path))
    pipeline.run(argv, conninfo.tool_env(), f"pg_restore ({section})")
