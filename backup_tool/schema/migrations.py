"""Migration replay: rebuild a database's schema from the team's migration history.

A migrations folder is either a Supabase project (``DIR/supabase/migrations``) or a folder
of migration files itself. A migration file is named ``<version>_<name>.sql`` where the
version is all digits: Supabase's ``20241201000000_init_schema.sql`` or a plain
``001_init_schema.sql`` (``.up.sql`` is accepted too). **Order rule:** files are applied in
ascending *numeric* order of their version (so ``9_x`` runs before ``10_x``, and zero-padded
or timestamped names sort as they read); two files with the same version are refused as
ambiguous. Files that do not match the pattern — and ``*.down.sql`` rollback scripts — are
skipped and reported, as the Supabase CLI skips them.

What a replay guarantees:

- It runs only into an empty database (no user tables, views, sequences, functions,
  schemas or extensions): it never mixes migrations into existing objects.
- Each file runs in its own transaction, in a fresh session (like ``psql -1 -f FILE``),
  so a file is applied completely or not at all; a file's own top-level ``BEGIN`` /
  ``COMMIT`` are absorbed into that transaction (a top-level ``ROLLBACK`` is refused).
- Replay stops at the first failure, naming the file, the line of the failing statement
  (the exact line when PostgreSQL reports a position) and PostgreSQL's message; the files
  before it stay committed.
- With recording on, every applied file is recorded in
  ``backup_tool_migrations.applied`` (version, name, sha256, statement count, time) *in the
  same transaction as the file*, so the table lists exactly the committed files. Schema
  comparisons (``schema diff``, the audit's drift line) ignore that schema. Replays into
  scratch databases and under ``restore full --schema-from-migrations`` do not record (the
  result lists the files instead), so a restored database holds only the application's schema.

Files are plain SQL, as the Supabase CLI runs them: statements are split the way psql
splits them (quotes, dollar quotes, comments, ``BEGIN ATOMIC`` bodies) and sent one by one,
which is what makes exact line numbers possible; psql meta-commands (``\\i``, ``\\set``) are
refused with their line. Statements that cannot run inside a transaction block (``CREATE
INDEX CONCURRENTLY``, ``VACUUM``) fail with PostgreSQL's own message, as they would under
``supabase db push``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from backup_tool.core.report import NullReporter, Reporter, Unit
from backup_tool.errors import DatabaseError, LockHeldError, RefusedError, UsageError
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import ConnInfo

BOOKKEEPING_SCHEMA = "backup_tool_migrations"
FILE_PATTERN = re.compile(r"^(?P<version>[0-9]+)_(?P<name>.+?)(?:\.up)?\.sql$")
_WORD_START = re.compile(r"[A-Za-z_\u0080-\uffff]")
_WORD = re.compile(r"[A-Za-z0-9_$\u0080-\uffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")
_ABSORBED = re.compile(r"^(BEGIN|START\s+TRANSACTION|COMMIT|END)\b", re.IGNORECASE)
_DISCARDING = re.compile(r"^(ROLLBACK|ABORT)\b(?!\s+TO\b)", re.IGNORECASE)


class MigrationError(DatabaseError):
    """A migration file could not be read or applied; names the file and line."""

    def __init__(self, message: str, hint: str | None = None, file: str = "", line: int = 0,
                 sqlstate: str | None = None) -> None:
        super().__init__(message, hint)
        self.file = file
        self.line = line
        self.sqlstate = sqlstate

    def with_hint(self, hint: str) -> MigrationError:
        return MigrationError(self.message, hint, self.file, self.line, self.sqlstate)


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def file(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class MigrationSet:
    folder: Path
    migrations: tuple[Migration, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class Statement:
    text: str
    line: int


@dataclass(frozen=True)
class AppliedMigration:
    version: str
    name: str
    file: str
    sha256: str
    statements: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name, "file": self.file, "sha256": self.sha256,
                "statements": self.statements, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class ReplayResult:
    folder: str
    target: str
    applied: tuple[AppliedMigration, ...]
    skipped: tuple[str, ...]
    recorded_in: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "target": self.target, "applied": [a.to_dict() for a in self.applied],
                "skipped": list(self.skipped), "recorded_in": self.recorded_in,
                "seconds": round(self.seconds, 3)}


def discover(folder: str | Path) -> MigrationSet:
    """The migration files of ``folder`` (or of its ``supabase/migrations``), in replay order."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"migrations folder {root} does not exist or is not a directory",
                         "pass --migrations DIR: a Supabase project or a folder of <version>_<name>.sql files")
    supabase = root / "supabase" / "migrations"
    where = supabase if supabase.is_dir() else root
    found: list[Migration] = []
    skipped: list[str] = []
    for path in sorted(p for p in where.iterdir() if p.is_file() and p.suffix == ".sql"):
        match = FILE_PATTERN.match(path.name)
        if match is None or path.name.endswith(".down.sql"):
            skipped.append(path.name)
            continue
        found.append(Migration(match["version"], match["name"], path))
    if not found:
        raise UsageError(f"no migration files in {where}",
                         "expected files named <timestamp>_<name>.sql (Supabase) or NNN_<name>.sql")
    found.sort(key=lambda m: (int(m.version), m.file))
    for before, after in pairwise(found):
        if int(before.version) == int(after.version):
            raise UsageError(f"migrations {before.file} and {after.file} have the same version {after.version}: "
                             "their order is ambiguous", "give each migration a unique version prefix")
    return MigrationSet(where, tuple(found), tuple(skipped))


def _read(migration: Migration) -> tuple[str, str]:
    """The file's SQL text (BOM stripped) and the sha256 of its bytes."""
    try:
        raw = migration.path.read_bytes()
    except OSError as exc:
        raise MigrationError(f"cannot read migration {migration.file}: {exc.strerror}", file=migration.file) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise MigrationError(f"migration {migration.file} line {line} is not valid UTF-8",
                             "save the file as UTF-8", migration.file, line) from None
    return text.removeprefix("\ufeff"), hashlib.sha256(raw).hexdigest()


class _Unterminated(Exception):
    """A scanner ran off the end of the text; ``what`` names the construct left open."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _block_comment_end(text: str, i: int) -> int:
    """The index just past the ``/* ... */`` comment starting at ``i`` (they nest)."""
    depth, j, n = 0, i, len(text)
    while j < n:
        if text.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif text.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    raise _Unterminated("unterminated /* comment")


def _quoted_end(text: str, i: int) -> int:
    """The index just past the string or quoted identifier opening at ``i``: a doubled quote
    stays inside; backslash escapes count only in ``E'...'`` strings."""
    ch, n = text[i], len(text)
    escapes = ch == "'" and i > 0 and text[i - 1] in "eE" and (
        i < 2 or not re.match(r"[A-Za-z0-9_$\u0080-\uffff]", text[i - 2]))
    j = i + 1
    while j < n:
        if escapes and text[j] == "\\":
            j += 2
            continue
        if text[j] == ch:
            if j + 1 < n and text[j + 1] == ch:
                j += 2
                continue
            return j + 1
        j += 1
    raise _Unterminated(f"unterminated {'string' if ch == chr(39) else 'quoted identifier'}")


def _dollar_quoted_end(text: str, i: int) -> int | None:
    """The index just past the dollar-quoted string opening at ``i``; None when the ``$`` at
    ``i`` does not open one (a parameter such as ``$1``, or part of an identifier)."""
    if i > 0 and re.match(r"[A-Za-z0-9_$\u0080-\uffff]", text[i - 1]):
        return None
    tag = _DOLLAR_TAG.match(text, i)
    if not tag:
        return None
    close = text.find(tag.group(), tag.end())
    if close < 0:
        raise _Unterminated(f"unterminated dollar-quoted string {tag.group()}")
    return close + len(tag.group())


def split_statements(text: str, file: str = "<sql>") -> list[Statement]:
    """Split SQL text into statements the way psql does, each with the line it starts on.

    Comments before a statement are not part of it; semicolons inside quotes, dollar
    quotes, comments, parentheses and ``BEGIN ... END`` / ``CASE ... END`` blocks do not end
    a statement. Raises MigrationError for an unterminated quote or comment and for psql
    meta-commands. The loop below is the state machine (statement start, nesting depth);
    the scanners above skip over one lexical construct each.
    """
    statements: list[Statement] = []
    n = len(text)
    i = 0
    line = 1
    start: int | None = None
    start_line = 0
    parens = 0
    blocks = 0
    words = 0

    def fail(what: str, at_line: int) -> MigrationError:
        return MigrationError(f"migration {file} line {at_line}: {what}", "fix the file", file, at_line)

    def skip_to(end: int) -> None:
        nonlocal i, line
        line += text.count("\n", i, end)
        i = end

    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch.isspace():
            i += 1
            continue
        try:
            if text.startswith("--", i):
                end = text.find("\n", i)
                skip_to(n if end < 0 else end)
                continue
            if text.startswith("/*", i):
                skip_to(_block_comment_end(text, i))
                continue
            if start is None:
                start, start_line, parens, blocks, words = i, line, 0, 0, 0
            if ch in "'\"":
                skip_to(_quoted_end(text, i))
                continue
            if ch == "$" and (close := _dollar_quoted_end(text, i)) is not None:
                skip_to(close)
                continue
        except _Unterminated as exc:
            raise fail(exc.what, line) from None
        if ch == ";" and parens == 0 and blocks == 0:
            statements.append(Statement(text[start:i + 1], start_line))
            start = None
            i += 1
            continue
        if ch == "\\":
            raise fail(f"psql meta-command {text[i:i + 12].split()[0]!r} is not SQL; migration files must be plain SQL",
                       line)
        if _WORD_START.match(ch):
            word = _WORD.match(text, i + 1)
            end = word.end() if word else i + 1
            token = text[i:end].lower()
            words += 1
            if token in ("begin", "case") and words > 1:
                blocks += 1
            elif token == "end" and blocks > 0:
                blocks -= 1
            i = end
            continue
        if ch == "(":
            parens += 1
        elif ch == ")" and parens > 0:
            parens -= 1
        i += 1
    if start is not None:
        statements.append(Statement(text[start:].rstrip(), start_line))
    return statements


def _describe_error(exc: psycopg.Error, migration: Migration, stmt: Statement) -> MigrationError:
    diag = exc.diag
    message = diag.message_primary or str(exc).splitlines()[0]
    line = stmt.line
    if diag.statement_position:
        line += stmt.text[:max(int(diag.statement_position) - 1, 0)].count("\n")
    context = (diag.context or "").splitlines()
    where = f" ({context[0]})" if context and not diag.statement_position else ""
    state = f" [SQLSTATE {diag.sqlstate}]" if diag.sqlstate else ""
    detail = f" — {diag.message_detail}" if diag.message_detail else ""
    return MigrationError(f"migration {migration.file} failed at line {line}: {message}{where}{detail}{state}",
                          None, migration.file, line, diag.sqlstate)


def plain_connect(conninfo: ConnInfo) -> psycopg.Connection[Any]:
    """A session with the server's own defaults (no pinned settings), as psql would open it."""
    params = dict(conninfo.params)
    params.setdefault("application_name", "backup-tool migrations")
    params.setdefault("connect_timeout", "15")
    try:
        return psycopg.connect(make_conninfo(**params), autocommit=True)
    except psycopg.OperationalError as exc:
        raise postgres.describe_connect_error(exc, f"PostgreSQL at {conninfo.redacted()}") from None


def _record(conn: psycopg.Connection[Any], applied: AppliedMigration) -> None:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BOOKKEEPING_SCHEMA}")
    conn.execute(f"""CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.applied (
        version text PRIMARY KEY, name text NOT NULL, file text NOT NULL, sha256 text NOT NULL,
        statements integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute(f"INSERT INTO {BOOKKEEPING_SCHEMA}.applied (version, name, file, sha256, statements)"
                 " VALUES (%s, %s, %s, %s, %s)",
                 (applied.version, applied.name, applied.file, applied.sha256, applied.statements))


def apply_file(target: ConnInfo, migration: Migration, record: bool) -> AppliedMigration:
    """Apply one migration file in one transaction of a fresh session; all or nothing."""
    text, digest = _read(migration)
    statements = split_statements(text, migration.file)
    for stmt in statements:
        if _DISCARDING.match(stmt.text):
            raise MigrationError(f"migration {migration.file} line {stmt.line}: a top-level ROLLBACK would discard "
                                 "the migration", "remove it: each file already runs in its own transaction",
                                 migration.file, stmt.line)
    started = time.monotonic()
    executed = 0
    with plain_connect(target) as conn:
        try:
            with conn.transaction():
                for stmt in statements:
                    if _ABSORBED.match(stmt.text):
                        continue
                    try:
                        conn.execute(stmt.text.encode())
                    except psycopg.Error as exc:
                        raise _describe_error(exc, migration, stmt) from None
                    executed += 1
                applied = AppliedMigration(migration.version, migration.name, migration.file, digest, executed,
                                           time.monotonic() - started)
                if record:
                    _record(conn, applied)
        except psycopg.OperationalError as exc:
            raise MigrationError(f"migration {migration.file}: connection lost ({str(exc).splitlines()[0]})",
                                 None, migration.file) from None
    return applied


def replay(target: ConnInfo, migrations: MigrationSet, record: bool = True,
           reporter: Reporter | None = None) -> ReplayResult:
    """Apply ``migrations`` in order to the empty database ``target``; stop at the first failure."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    for name in migrations.skipped:
        reporter.warning(f"skipped {name}: not a <version>_<name>.sql migration", file=name)
    with target.connect() as control:
        if not postgres.try_advisory_lock(control, f"backup-tool:replay:{target.redacted()}"):
            raise LockHeldError(f"another replay into {target.redacted()} is running", "wait for it to finish")
        existing = postgres.user_objects(control)
        if existing:
            raise RefusedError(f"target database {target.redacted()} is not empty ({', '.join(existing[:3])}"
                               f"{' ...' if len(existing) > 3 else ''})",
                               "replay into a new, empty database")
        reporter.event("replay started", folder=str(migrations.folder), files=len(migrations.migrations),
                       target=target.redacted())
        progress = reporter.task("replaying migrations", total=len(migrations.migrations), unit=Unit.ITEMS)
        applied: list[AppliedMigration] = []
        for migration in migrations.migrations:
            try:
                applied.append(apply_file(target, migration, record))
            except MigrationError as exc:
                progress.finish()
                committed = (f"{len(applied)} earlier file(s) were committed (up to {applied[-1].file}); "
                             if applied else "nothing was committed; ")
                raise exc.with_hint(committed + "fix the file, then replay into a new empty database") from None
            reporter.event("migration applied", file=migration.file, statements=applied[-1].statements)
            progress.advance(1)
        progress.finish()
    result = ReplayResult(str(migrations.folder), target.redacted(), tuple(applied), migrations.skipped,
                          f"{BOOKKEEPING_SCHEMA}.applied" if record else None, time.monotonic() - started)
    reporter.event("replay finished", files=len(applied), seconds=round(result.seconds, 2))
    return result


def replay_folder(folder: str | Path, target_dsn: str | ConnInfo, record: bool = True,
                  reporter: Reporter | None = None) -> ReplayResult:
    """``schema replay``: discover the folder's migrations and replay them into ``target_dsn``."""
    target = target_dsn if isinstance(target_dsn, ConnInfo) else ConnInfo(target_dsn)
    return replay(target, discover(folder), record=record, reporter=reporter)
