"""Extensions at the backed-up version.

``pg_dump`` writes ``CREATE EXTENSION IF NOT EXISTS name WITH SCHEMA s`` without a version,
so a plain replay installs the target server's default version: a source still on
``pg_trgm`` 1.5 comes back on 1.6, with different functions and operators. When the
backup's version of an extension differs from the target's default, the pre-data replay is
split around it: everything the archive lists before that extension (its schema included),
then ``CREATE EXTENSION … VERSION`` at the backed-up version, then the rest (whose own
``CREATE EXTENSION IF NOT EXISTS`` is then a no-op). When the target cannot install that
version (its files are missing), the default is installed and ``extensions_present``
reports both versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from backup_tool import pipeline, schema
from backup_tool.postgres import ConnInfo, find_tool

_TOC_EXTENSION = re.compile(r"^\d+; \d+ \d+ EXTENSION - (\S+)")
_WITH_SCHEMA = re.compile(r"CREATE EXTENSION IF NOT EXISTS .* WITH SCHEMA (.+);")


@dataclass(frozen=True)
class Pinned:
    """An extension to create at ``version`` before the rest of the schema."""

    name: str
    version: str
    toc_line: int


def pinned(toc: list[str], backed_up: list[dict[str, Any]], defaults: dict[str, str]) -> list[Pinned]:
    """The extensions of the archive's list ``toc`` whose backed-up version is not the
    target's default, in archive order. Pure."""
    versions = {e["name"]: e["version"] for e in backed_up}
    found = []
    for i, line in enumerate(toc):
        match = _TOC_EXTENSION.match(line)
        if match:
            name = match.group(1)
            if name in versions and name in defaults and versions[name] != defaults[name]:
                found.append(Pinned(name, versions[name], i))
    return found


def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def restore_pre_data(archive_path: Path, target: ConnInfo, major: int,
                     backed_up: list[dict[str, Any]] | None) -> list[str]:
    """Replay the archive's pre-data, extensions at their backed-up versions where the target
    can install them; return the extensions that had to fall back to the default version."""
    with target.connect() as conn:
        defaults = {r[0]: r[1] for r in conn.execute(
            "SELECT name, default_version FROM pg_available_extensions").fetchall()}
    toc = pipeline.run([find_tool("pg_restore", major), "--list", str(archive_path)], target.tool_env(),
                       "pg_restore (list)").decode().splitlines()
    todo = pinned(toc, backed_up or [], defaults)
    if not todo:
        schema.restore_section(archive_path, target, major, "pre-data")
        return []
    fallbacks = []
    start = 0
    for n, ext in enumerate(todo):
        part = _write_list(archive_path.with_suffix(f".list{n}"), toc[start:ext.toc_line])
        schema.restore_section(archive_path, target, major, "pre-data", extra=["--use-list", str(part)])
        one = _write_list(archive_path.with_suffix(f".ext{n}"), [toc[ext.toc_line]])
        text = pipeline.run([find_tool("pg_restore", major), "--use-list", str(one), "--file=-", str(archive_path)],
                            target.tool_env(), "pg_restore (extension)").decode()
        where = _WITH_SCHEMA.search(text)
        with target.connect() as conn:
            try:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} VERSION {}{}").format(
                    sql.Identifier(ext.name), sql.Literal(ext.version),
                    sql.SQL(" SCHEMA {}").format(sql.SQL(where.group(1))) if where else sql.SQL("")))
            except psycopg.Error as exc:
                fallbacks.append(f"{ext.name} {ext.version} ({str(exc).splitlines()[0]})")
        start = ext.toc_line
    rest = _write_list(archive_path.with_suffix(".rest"), toc[start:])
    schema.restore_section(archive_path, target, major, "pre-data", extra=["--use-list", str(rest)])
    return fallbacks
