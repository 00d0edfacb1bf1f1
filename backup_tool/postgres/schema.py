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
import re
from pathlib import Path
from typing import Callable

from backup_tool.postgres.connection import ConnInfo, find_tool
from backup_tool.streams import pipeline


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


def normalize_v1(text: str) -> str:
    """The normalisation of backups written before ACL order was ignored (their stored
    fingerprints come from it)."""
    return "\n".join(_kept_lines(text)) + "\n"


def normalize(text: str) -> str:
    """The comparable text: varying parts removed and the privilege statements (GRANT,
    REVOKE, ALTER DEFAULT PRIVILEGES) of each object in a canonical order.

    PostgreSQL keeps an ACL as a list whose order follows the history of the grants, and
    pg_dump writes one statement per entry in that order; two databases with the same
    privileges can list them differently. Within each run of consecutive privilege
    statements on the same object, the statements (a grant made under ``SET SESSION
    AUTHORIZATION`` together with its SET/RESET, so the grantor stays attached) are sorted.
    Every statement is kept, so any difference in the set of privileges still shows. The
    role list of ``CREATE POLICY ... TO`` (which pg_dump writes in role OID order, so it
    depends on when each role was created on the server) is sorted likewise.
    """
    units: list[tuple[str | None, list[str]]] = []
    lines = [_sorted_policy_roles(ln) for ln in _kept_lines(text)]
    i = 0
    while i < len(lines):
        if lines[i].startswith("SET SESSION AUTHORIZATION "):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("RESET SESSION AUTHORIZATION")),
                       len(lines) - 1)
            block = lines[i:end + 1]
            keys = [_acl_object(ln) for ln in block[1:-1]]
            units.append((keys[0] if keys and len(set(keys)) == 1 else None, block))
            i = end + 1
        else:
            units.append((_acl_object(lines[i]), [lines[i]]))
            i += 1
    out: list[str] = []
    run: list[list[str]] = []
    run_key: str | None = None
    for key, block in units:
        if key is None or key != run_key:
            out.extend(ln for b in sorted(run) for ln in b)
            run = []
        run.append(block)
        run_key = key
    out.extend(ln for b in sorted(run) for ln in b)
    return "\n".join(out) + "\n"


_ACL_STATEMENT = re.compile(
    r"^(?P<scope>ALTER DEFAULT PRIVILEGES .*?)?(?:GRANT|REVOKE) .*? ON (?P<object>.+) (?:TO|FROM) ")


def _acl_object(line: str) -> str | None:
    """The object a one-line privilege statement is about (None: not such a statement)."""
    m = _ACL_STATEMENT.match(line)
    if m is None or not line.endswith(";"):
        return None
    return (m.group("scope") or "") + m.group("object")


_IDENT = r'(?:"(?:[^"]|"")*"|[^\s",;()])+'
_POLICY = re.compile(rf"^(CREATE POLICY {_IDENT} ON {_IDENT}(?: AS \w+)?(?: FOR \w+)? TO )"
                     rf"({_IDENT}(?:, {_IDENT})*)((?: USING | WITH CHECK |;$).*)$")


def _sorted_policy_roles(line: str) -> str:
    m = _POLICY.match(line)
    if m is None:
        return line
    roles = re.findall(_IDENT, m.group(2))
    return m.group(1) + ", ".join(sorted(roles)) + m.group(3)


def _kept_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))]


def fingerprint(normalized: str) -> str:
    return hashlib.sha256(normalized.encode()).hexdigest()


def live_schema(conninfo: ConnInfo, major: int) -> str:
    """The normalized schema text of a live database, produced the way backups produce it."""
    return normalize(schema_text(dump_schema(conninfo, major), major))


def section_ids(archive_path: Path, major: int, section: str) -> set[str]:
    """The table-of-contents ids of the objects one section of the schema archive holds."""
    listing = pipeline.run([find_tool("pg_restore", major), "--list", f"--section={section}", str(archive_path)],
                           dict(os.environ), "pg_restore (list)")
    return {line.split(";", 1)[0].strip() for line in listing.decode("utf-8", "replace").splitlines()
            if line and not line.startswith(";")}


def section_items(archive_path: Path, major: int, section: str) -> int:
    """How many objects one section of the schema archive holds."""
    return len(section_ids(archive_path, major, section))


# An item is done when pg_restore says so: serially "processing item N" (then it creates it), in
# parallel "finished item N" from a worker, or "processing item N" / "processing missed item N"
# from the leader, which restores some items itself before and after the workers (which ones
# depends on timing). Each item is counted once, by its table-of-contents id.
_ITEM_DONE = re.compile(r"^pg_restore: (?:processing item|processing missed item|finished item) (\d+) ")


def restore_section(archive_path: Path, conninfo: ConnInfo, major: int, section: str,
                    jobs: int = 1, extra: list[str] | None = None,
                    on_item: Callable[[], None] | None = None) -> None:
    """Replay one section (pre-data or post-data) of the schema archive into the target;
    ``on_item`` is called as pg_restore reports each object it creates (with ``--jobs``:
    each one finished)."""
    argv = [find_tool("pg_restore", major), f"--section={section}", "--exit-on-error",
            "--dbname", conninfo.tool_conninfo(), *(extra or [])]
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    else:
        argv.append("--single-transaction")
    if on_item is None:
        argv.append(str(archive_path))
        pipeline.run(argv, conninfo.tool_env(), f"pg_restore ({section})")
        return
    counted: set[str] = set()
    wanted = section_ids(archive_path, major, section)

    def seen(line: str) -> None:
        found = _ITEM_DONE.match(line)
        if found and found.group(1) in wanted and found.group(1) not in counted:
            counted.add(found.group(1))
            on_item()

    argv += ["--verbose", str(archive_path)]
    pipeline.run_watching(argv, conninfo.tool_env(), f"pg_restore ({section})", seen)
