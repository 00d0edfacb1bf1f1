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
from typing import Any, Sequence

import psycopg
from psycopg import sql

from backup_tool.errors import RefusedError
from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo, find_tool
from backup_tool.streams import pipeline

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


def missing_extensions(needed: Sequence[str], available: Sequence[str]) -> RefusedError | None:
    """The refusal for extensions a backup uses that the target server cannot install (no
    control file: its package is missing there), or None. Pure."""
    missing = sorted(set(needed) - set(available))
    if not missing:
        return None
    return RefusedError(f"the backup uses extension{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which "
                        "the target server cannot install (not in pg_available_extensions)",
                        "install their packages on the target server (on Debian e.g. postgresql-15-postgis-3 "
                        "for postgis), then run the restore again")


def refuse_missing_extensions(conn: psycopg.Connection[Any], backed_up: Sequence[dict[str, Any]]) -> None:
    """Raise :func:`missing_extensions`' refusal for the server ``conn`` is on, if any, or a
    refusal naming the extensions the server will not create in this database (pg_cron only
    installs in ``cron.database_name``; each is tried in a rolled-back transaction): before
    anything is created, not half-way through the schema."""
    available = [r[0] for r in conn.execute("SELECT name FROM pg_catalog.pg_available_extensions").fetchall()]
    if refusal := missing_extensions([str(e["name"]) for e in backed_up], available):
        raise refusal
    refused = [f"{name} ({why})" for name, why in
               schema.uncreatable_extensions(conn, [str(e["name"]) for e in backed_up]).items()]
    if refused:
        raise RefusedError(f"the target database cannot create extension{'s' if len(refused) > 1 else ''} "
                           f"{', '.join(refused)}",
                           "set up the target server as the source's was (shared_preload_libraries; pg_cron "
                           "installs only in the database its cron.database_name names), then restore again")


def _write_list(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


class PreDataReplay:
    """Replays the archive's pre-data section, whole or a list of its TOC lines at a time,
    creating each pinned extension at its backed-up version when its entry comes up.

    ``fallbacks`` collects the extensions the target could not install at that version.
    Callable as ``replay(lines)`` (None: the whole section), which is how
    :mod:`backup_tool.postgres.column_order` hands it the parts between the tables it creates.
    """

    def __init__(self, archive_path: Path, target: ConnInfo, major: int,
                 backed_up: list[dict[str, Any]] | None) -> None:
        self.archive_path, self.target, self.major = archive_path, target, major
        self.fallbacks: list[str] = []
        self._parts = 0
        with target.connect() as conn:
            defaults = {r[0]: r[1] for r in conn.execute(
                "SELECT name, default_version FROM pg_available_extensions").fetchall()}
        self.toc = pipeline.run([find_tool("pg_restore", major), "--list", str(archive_path)], target.tool_env(),
                                "pg_restore (list)").decode("utf-8", "surrogateescape").splitlines()
        self._pins = {self.toc[p.toc_line]: p for p in pinned(self.toc, backed_up or [], defaults)}

    def _list(self, lines: Sequence[str]) -> Path:
        self._parts += 1
        return _write_list(self.archive_path.with_suffix(f".part{self._parts}"), lines)

    def _replay(self, lines: Sequence[str] | None) -> None:
        schema.restore_section(self.archive_path, self.target, self.major, "pre-data", listing=lines,
                               lock_bounded=True)

    def __call__(self, lines: Sequence[str] | None = None) -> None:
        if not any(line in self._pins for line in (self.toc if lines is None else lines)):
            self._replay(lines)
            return
        pending: list[str] = []
        for line in self.toc if lines is None else lines:
            pin = self._pins.get(line)
            if pin is None:
                pending.append(line)
                continue
            if pending:
                self._replay(pending)
                pending = []
            self._create(pin, line)
            pending.append(line)
        if pending:
            self._replay(pending)

    def _create(self, pin: Pinned, line: str) -> None:
        text = pipeline.run([find_tool("pg_restore", self.major), "--use-list", str(self._list([line])),
                             "--file=-", str(self.archive_path)],
                            self.target.tool_env(), "pg_restore (extension)").decode()
        where = _WITH_SCHEMA.search(text)
        with self.target.connect() as conn:
            try:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} VERSION {}{}").format(
                    sql.Identifier(pin.name), sql.Literal(pin.version),
                    sql.SQL(" SCHEMA {}").format(sql.SQL(where.group(1))) if where else sql.SQL("")))
            except psycopg.Error as exc:
                self.fallbacks.append(f"{pin.name} {pin.version} ({str(exc).splitlines()[0]})")
