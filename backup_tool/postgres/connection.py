"""Everything that talks to PostgreSQL: connections, snapshots, catalog inventory queries,
and the command lines of PostgreSQL's own tools (pg_dump, pg_restore, psql, pg_dumpall).

Sessions opened here pin every setting that changes how values are written as text
(time zone, date and interval style, float digits, bytea format, encoding), so the same
rows always produce the same COPY text and the same content checksum, at backup time and
at validation time; and every setting that changes how that text is read back
(``array_nulls``: off reads an array's NULL element as the string ``'NULL'``; ``xmloption``:
``document`` refuses an xml value that is a content fragment), so a database or role that
sets them for its applications cannot change or refuse the rows a restore loads. Passwords are handed to child processes through ``PGPASSWORD`` in
their environment, never in their arguments.

They also turn off every timeout a role or database may set for its applications (statement,
lock, idle in transaction, idle session, transaction), as pg_dump and pg_restore do: a
database-level ``statement_timeout = '60s'`` must not kill a backup's COPY of a large table,
nor an ``idle_in_transaction_session_timeout`` the snapshot a backup's sessions share, nor a
restored ``default_transaction_read_only`` a restore's writes. They act as the role the DSN
names: a ``role`` a database or role sets (``ALTER DATABASE app SET role = 'web'``, meant for
applications) would have a superuser's backup read, and a restore write, as that role. A value
the caller's DSN sets in its own ``options`` (``-c role=NAME`` to act as another role) still
wins over these; PostgreSQL's programs the tool runs get them too (``PGOPTIONS``).

Names written as text (a ``regclass`` or ``regtype`` value in a row, a foreign key's target,
a function's argument types, a trigger's definition) depend on ``search_path``, which a role
or database may set. A backup's sessions pin it to :data:`NAME_SEARCH_PATH` and record that
in the manifest; a restore or validation against that backup pins the recorded value on its
sessions (:meth:`ConnInfo.with_search_path`), so whichever role runs each side and whatever
path it has, names are written and read back the same way. A backup that recorded none (made
before) keeps the sessions' own path, as it was taken.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import os
import re
import threading
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Format
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import BackupToolError, ConfigError, DatabaseError, RefusedError
from backup_tool.postgres import tools as pg_tools
from backup_tool.repository.manifest import SequenceRecord

T = TypeVar("T")

SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "synchronize_seqscans": "off",
    "row_security": "off",
    "array_nulls": "on",
    "xmloption": "content",
}
NAME_SEARCH_PATH = "public"
"""The ``search_path`` a backup's sessions write names under: PostgreSQL's default path as it
reads for a role without a schema of its own name, so such a backup writes what one taken
before this was pinned did."""
UNFINISHED_RESTORE_SCHEMA = "backup_tool_unfinished_restore"
SYSTEM_SCHEMA_FILTER = (
    "n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"
)


SESSION_DEFAULTS = {
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "default_transaction_read_only": "off",
    "role": "none",
    "lc_monetary": "C",
    "quote_all_identifiers": "off",
    "standard_conforming_strings": "on",
    "jit": "off",
}
"""Settings before the DSN's own ``options`` (which may change them), after the role's and
database's defaults (which they override). ``jit`` is off because nothing the tool runs gains
from compiling, and a database's ``jit_above_cost = 0`` (set to speed up its applications'
analytics) compiled each of its catalog queries: 0.13 s of server CPU for the one every
session opens with."""
RECORDED_PINS = ("lc_monetary", "quote_all_identifiers", "standard_conforming_strings")
"""Settings of :data:`SESSION_DEFAULTS` that change the text a backup stores and that backups
before them left to the database, role or server: ``lc_monetary`` writes and reads money
(``1.234,56 €`` under ``de_DE``, refused by a restore session under ``C``), in rows and in
the schema's defaults and constraints; ``quote_all_identifiers`` and
``standard_conforming_strings`` the schema text (pg_dump quotes every name, or writes its
string constants and ``SET`` lines for the other string syntax). A backup
records the ones its sessions pinned (``options["pinned"]``); sessions restoring or
validating it, or taking an incremental on it, pin the same (:meth:`ConnInfo.pinned_as`)."""
NEWER_TIMEOUTS = ((140000, "idle_session_timeout"), (170000, "transaction_timeout"))
"""Timeouts of newer servers (server version, setting), set to 0 once connected: an older
server refuses an unknown setting in the startup options."""


def session_options(extra: dict[str, str] | None = None) -> str:
    settings = {**SESSION_SETTINGS, **(extra or {})}
    return " ".join(f"-c {k}={v}" for k, v in settings.items())


def _with_defaults(options: str, unpinned: frozenset[str] = frozenset()) -> str:
    return " ".join([*(f"-c {k}={v}" for k, v in SESSION_DEFAULTS.items() if k not in unpinned),
                     *([options] if options else [])])


class _TransparentText(Loader):
    """Text of a SQL_ASCII database, whose bytes carry no encoding: read as UTF-8 (what such
    databases mostly hold), any other byte kept as a lone surrogate (``surrogateescape``), so
    names and definitions are ``str`` and go back to the server as the same bytes. psycopg's
    own loader returns ``bytes`` for such a database, which nothing here expects."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "surrogateescape")


class _TransparentBinaryText(_TransparentText):
    format = Format.BINARY


_TEXT_TYPES = (0, "bpchar", "name", "text", "varchar", '"char"')


CATALOG_FIRST = ("SELECT pg_catalog.set_config('search_path', coalesce((SELECT pg_catalog.string_agg("
                 "pg_catalog.quote_ident(u.s), ', ' ORDER BY u.i) FROM pg_catalog.unnest("
                 "pg_catalog.current_schemas(false)) WITH ORDINALITY AS u(s, i) WHERE u.s OPERATOR(pg_catalog.<>) "
                 "'pg_catalog'), ''), false) WHERE (pg_catalog.current_schemas(true))[1] OPERATOR(pg_catalog.<>) "
                 "'pg_catalog'")
"""Where the session's search_path lists a schema before ``pg_catalog`` (``shadow, public,
pg_catalog``; orafce suggests ``oracle, "$user", public, pg_catalog``), it becomes the schemas
it resolves to without ``pg_catalog`` (``shadow, public``), which PostgreSQL then searches
first, as it does by default; other search_paths are left alone, and objects are created in
the same schema as before. Otherwise that schema's ``count(*)`` or ``hashtextextended`` would
answer the tool's row counts and checksums (a trial database's ``count`` made validation pass
a table with a row added)."""


def _after_connect(conn: psycopg.Connection[Any]) -> None:
    """Set this server's newer timeouts (:data:`NEWER_TIMEOUTS`) to 0 for the session, unless
    the DSN's ``options`` named them, and :data:`CATALOG_FIRST`; on a SQL_ASCII database read
    text as :class:`_TransparentText` (a client encoding of UTF8 would have the server refuse
    every non-UTF-8 byte it sends). Leaves no transaction open."""
    version = conn.info.server_version
    named = conn.info.get_parameters().get("options", "")
    statements = [f"SET {name} = 0" for since, name in NEWER_TIMEOUTS if version >= since and name not in named]
    statements.append(CATALOG_FIRST)
    if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
        for name in _TEXT_TYPES:
            conn.adapters.register_loader(name, _TransparentText)
            conn.adapters.register_loader(name, _TransparentBinaryText)
    set_json_loads(functools.partial(_json_in_session_encoding, conn.info), conn)
    conn.execute("; ".join(statements))
    if not conn.autocommit:
        conn.commit()


def _json_in_session_encoding(info: Any, data: str | bytes) -> Any:
    """A json or jsonb value read in the session's client encoding, as the text beside it:
    psycopg's own loader reads the bytes as UTF-8, and a name outside ASCII in a LATIN1
    database (a column naïve in the catalog reads that build JSON) failed to decode."""
    if not isinstance(data, str):
        data = bytes(data).decode(info.encoding, "surrogateescape")
    return json.loads(data)


def describe_connect_error(exc: Exception, target: str) -> DatabaseError:
    """One line saying why libpq could not connect: its whole first error (the reason and its
    explanation, e.g. "Connection refused Is the server running on that host...?", or "server
    closed the connection unexpectedly This probably means..."), not only its last line; the
    per-host repetition psycopg appends after several addresses were tried is dropped."""
    text = str(exc).strip()
    lines = []
    for line in text.splitlines():
        if line.startswith("Multiple connection attempts failed"):
            break
        if line.strip():
            lines.append(line.strip())
    detail = " ".join(" ".join(lines).split()) or text
    detail = re.sub(r"^connection failed:\s*", "", detail)
    if "password authentication failed" in text or "no password supplied" in text:
        hint = "check the password (in the DSN, PGPASSWORD or ~/.pgpass)"
    elif "does not exist" in text and "database" in text:
        hint = ("check the database name; to restore into a new database add --create "
                "(restore full), or create it first with createdb")
    elif "Connection refused" in text or "could not translate host" in text or "resolve host" in text \
            or "timeout" in text:
        hint = "check the host and port in --dsn / DATABASE_URL and that the server is running"
    elif "socket" in text and "No such file or directory" in text:
        hint = ("no server listens on that local socket (libpq's default when no host is given): name the "
                "server's host and port in --dsn / DATABASE_URL (or PGHOST/PGPORT), or start the server")
    elif "too many clients" in text or "connection slots are reserved" in text:
        hint = ("the server has no free connection slot: each of --jobs is a session of its own; lower "
                "--jobs, wait for other sessions to end, or raise max_connections")
    elif "closed the connection unexpectedly" in text:
        hint = "the server (or a proxy or pooler in front of it) dropped the connection: check its log and sslmode"
    else:
        hint = "check --dsn / DATABASE_URL"
    return DatabaseError(f"cannot connect to {target}: {detail}", hint)


REPOSITORY_SECRETS = ("BACKUP_TOOL_ENCRYPTION_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                      "AWS_SECURITY_TOKEN")


class ConnInfo:
    """A parsed libpq connection string (URL or key=value), with libpq's PG* variables as fallback."""

    def __init__(self, dsn: str = "") -> None:
        try:
            self.params: dict[str, Any] = conninfo_to_dict(dsn or "")
        except psycopg.ProgrammingError:
            raise ConfigError("the DSN is not a valid PostgreSQL connection string",
                              "use postgresql://user@host:port/dbname or 'host=... dbname=...'") from None
        self.unpinned: frozenset[str] = frozenset()

    def with_search_path(self, path: str | None) -> "ConnInfo":
        """The same, with every session it opens (and every client tool it runs) on ``path``
        (None: unchanged), over the role's, the database's and the DSN's own ``options``."""
        if path is None:
            return self
        other = self._copy()
        own = str(self.params.get("options") or "")
        pinned = "-c search_path=" + path.replace("\\", "\\\\").replace(" ", "\\ ")
        other.params["options"] = f"{own} {pinned}".strip()
        return other

    def as_written(self, options: Mapping[str, Any]) -> "ConnInfo":
        """This connection as the backup whose manifest ``options`` these are was written: the
        text settings it pinned (:meth:`pinned_as`) and the search_path it wrote names under
        (:meth:`with_search_path`), each as the sessions' own where it recorded none."""
        return self.pinned_as(options.get("pinned")).with_search_path(options.get("search_path"))

    def with_database(self, dbname: str) -> "ConnInfo":
        other = self._copy()
        other.params["dbname"] = dbname
        return other

    def pinned_as(self, recorded: Sequence[str] | None) -> "ConnInfo":
        """This connection, its sessions and programs pinning of :data:`RECORDED_PINS` only
        what a backup recorded it pinned (``options["pinned"]``; None: a backup from before
        they were recorded, which pinned none of them)."""
        other = self._copy()
        other.unpinned = frozenset(RECORDED_PINS) - frozenset(recorded or ())
        return other

    def _copy(self) -> "ConnInfo":
        other = ConnInfo.__new__(ConnInfo)
        other.params = dict(self.params)
        other.unpinned = self.unpinned
        return other

    @property
    def dbname(self) -> str | None:
        return self.params.get("dbname") or os.environ.get("PGDATABASE")

    def redacted(self) -> str:
        """Host, port, user and database, never the password."""
        p = self.params
        host = p.get("host") or os.environ.get("PGHOST") or "localhost"
        port = p.get("port") or os.environ.get("PGPORT") or "5432"
        user = p.get("user") or os.environ.get("PGUSER") or ""
        return f"{user + '@' if user else ''}{host}:{port}/{self.dbname or ''}"

    def connect(self, autocommit: bool = True, settings: dict[str, str] | None = None,
                application: str = "backup-tool") -> psycopg.Connection[Any]:
        params = dict(self.params)
        own = str(params.get("options") or "")
        options = session_options(settings)
        params["options"] = f"{_with_defaults(own, self.unpinned)} {options}"
        params.setdefault("application_name", application)
        params.setdefault("connect_timeout", "15")
        try:
            conn = psycopg.connect(make_conninfo(**params), autocommit=autocommit)
        except psycopg.OperationalError as exc:
            raise describe_connect_error(exc, f"PostgreSQL at {self.redacted()}") from None
        try:
            _after_connect(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def tool_conninfo(self) -> str:
        """Connection string for a child tool's ``-d``: everything but the password and the
        ``options``, which :meth:`tool_env` carries (an ``options`` in the connection string
        would make libpq ignore ``PGOPTIONS``, and with it the session settings and defaults)."""
        params = {k: v for k, v in self.params.items() if k not in ("password", "options")}
        return make_conninfo(**params) if params else ""

    def tool_env(self, settings: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a PostgreSQL client tool run with :meth:`tool_conninfo`: the password
        in PGPASSWORD (never in its arguments), none of the repository's secrets, which those
        tools never need, and in ``PGOPTIONS`` :data:`SESSION_DEFAULTS`, then the DSN's own
        ``options`` (or, where it has none, the caller's own ``PGOPTIONS``), then, given
        ``settings``, :data:`SESSION_SETTINGS` and them, as :meth:`connect` orders them. The
        DSN's ``options`` stay out of the connection string: there libpq would let them replace
        ``PGOPTIONS`` whole."""
        env = {k: v for k, v in os.environ.items() if k not in REPOSITORY_SECRETS}
        if self.params.get("password"):
            env["PGPASSWORD"] = str(self.params["password"])
        own = str(self.params.get("options") or "")
        if settings is not None:
            env["PGOPTIONS"] = f"{_with_defaults(own, self.unpinned)} {session_options(settings)}"
        else:
            env["PGOPTIONS"] = _with_defaults(own or env.get("PGOPTIONS", ""), self.unpinned)
        return env


def database_of(dsn: str) -> str | None:
    """The database a DSN (or libpq's PGDATABASE) names; None when the DSN does not parse or names none."""
    try:
        return ConnInfo(dsn).dbname
    except BackupToolError:
        return None


def find_tool(name: str, major: int) -> str:
    """Path of the PostgreSQL program ``name`` to run against a server of ``major``
    (client tools of that major or newer, physical programs of exactly it; see
    :mod:`backup_tool.postgres.tools`)."""
    return str(pg_tools.find(name, major).path)


def tool_versions(major: int, names: Sequence[str] = pg_tools.CLIENT_TOOLS) -> dict[str, str]:
    """``{"pg_dump": "17.10", ...}``: the versions of the programs that serve ``major``
    (probed at once, one thread per program); the first program's error if one is missing."""
    with cf.ThreadPoolExecutor(max(len(names), 1), thread_name_prefix="tool-version") as pool:
        tools = list(pool.map(lambda name: pg_tools.find(name, major), names))
    return {tool.name: tool.version for tool in tools}


def tools_major(conn: psycopg.Connection[Any], backup_major: int) -> int:
    """The major the tools restoring a ``backup_major`` backup into ``conn``'s server must
    reach: the newer of the two (an older pg_restore or psql may not know what the
    target needs)."""
    return max(backup_major, server_info(conn)["server_version_num"] // 10000)


def _local_server_bindir(conn: psycopg.Connection[Any]) -> Path | None:
    """The bin directory the connected server runs from, when it runs on this machine:
    the backend's executable, else the server's ``pg_config`` view (superusers), kept only
    if the directory exists here and holds ``postgres``."""
    host = conn.info.host or ""
    if host and not host.startswith("/") and host not in ("localhost", "::1") and not host.startswith("127."):
        return None
    found: Path | None = None
    pid = conn.info.backend_pid
    try:
        exe = Path(os.readlink(f"/proc/{pid}/exe"))
        if exe.name in ("postgres", "postmaster"):
            found = exe.parent
    except OSError:
        pass
    if found is None:
        found = configured_bindir(conn)
    return found if found is not None and (found / "postgres").is_file() else None


def configured_bindir(conn: psycopg.Connection[Any]) -> Path | None:
    """The server's ``pg_config`` BINDIR, when this role may read that view (superusers
    and those granted it); None otherwise, without an error in the session."""
    allowed = conn.execute("SELECT has_table_privilege('pg_catalog.pg_config', 'SELECT')").fetchone()
    if not (allowed and allowed[0]):
        return None
    row = conn.execute("SELECT setting FROM pg_config WHERE name = 'BINDIR'").fetchone()
    return Path(row[0]) if row and row[0] else None


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quoted_table(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


@dataclass(frozen=True)
class TableInfo:
    oid: int
    schema: str
    name: str
    relkind: str
    parent: str | None
    columns: tuple[str, ...]
    size: int

    @property
    def qualified(self) -> str:
        return quoted_table(self.schema, self.name)

    @property
    def has_data(self) -> bool:
        return self.relkind == "r"


def selected_tables(tables: list[TableInfo], only: set[tuple[str, str]] | None) -> list[TableInfo]:
    """``tables`` limited to ``only`` (all of them when None) and the partitions, at any
    depth, of partitioned tables among them."""
    if only is None:
        return tables
    chosen = set(only)
    grew = True
    while grew:
        names = {f"{s}.{n}" for s, n in chosen}
        extra = {(t.schema, t.name) for t in tables if t.parent in names} - chosen
        chosen |= extra
        grew = bool(extra)
    return [t for t in tables if (t.schema, t.name) in chosen]


def server_info(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    row = conn.execute(
        "SELECT current_database(), current_setting('server_version'),"
        " current_setting('server_version_num')::int, current_setting('server_encoding'),"
        " (SELECT system_identifier FROM pg_control_system())::text,"
        " pg_is_in_recovery()"
    ).fetchone()
    assert row is not None
    bindir = _local_server_bindir(conn)
    if bindir is not None:
        pg_tools.note_server_bindir(row[2] // 10000, bindir)
    return {
        "database": row[0],
        "server_version": row[1],
        "server_version_num": row[2],
        "encoding": row[3],
        "system_identifier": row[4],
        "in_recovery": row[5],
        "host": f"{conn.info.host}:{conn.info.port}",
    }


@contextmanager
def locks_released_after(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Reads in ``conn``'s open transaction whose locks go when the block ends: they run in a
    savepoint that is then rolled back (PostgreSQL releases the locks taken after a savepoint
    rolled back to). A backup's snapshot session holds every table's lock to its end; the
    catalogs and other relations it reads for the manifest need not hold a slot of the
    server's lock table that long (a backup needs no more of them than pg_dump). What was
    read stays read; an error inside still propagates."""
    with conn.transaction():
        yield
        raise psycopg.Rollback()


LOCK_PATIENCE_MS = 2000
"""How long a backup or restore waits for a table's lock before it says who holds it (then
waits on)."""


@contextmanager
def settings_within(conn: psycopg.Connection[Any], settings: Mapping[str, str] | None) -> Iterator[None]:
    """A transaction (a savepoint inside an open one) in which ``settings`` hold; when the block
    succeeds, what it did is kept and the settings are as before it (on an error the savepoint
    is rolled back, the settings with it). None: the session's own settings."""
    with conn.transaction():
        before = [(name, conn.execute("SELECT pg_catalog.current_setting(%s), pg_catalog.set_config(%s, %s, true)",
                                      (name, name, value)).fetchone()) for name, value in (settings or {}).items()]
        yield
        for name, row in before:
            assert row is not None
            conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", (name, row[0]))


def lock_patience(conn: psycopg.Connection[Any]) -> AbstractContextManager[None]:
    """A savepoint in ``conn``'s open transaction in which a lock wait gives up after
    :data:`LOCK_PATIENCE_MS` (``LockNotAvailable`` propagates, the savepoint rolled back,
    nothing of it kept); when the block succeeds, what it locked stays locked and
    ``lock_timeout`` is as before."""
    return settings_within(conn, {"lock_timeout": f"{LOCK_PATIENCE_MS}ms"})


def patiently(conn: psycopg.Connection[Any], attempt: Callable[[], T], waiting: Callable[[], str],
              on_wait: Callable[[str], None]) -> T:
    """``attempt()`` under :func:`lock_patience`; when a lock keeps it waiting longer than
    that, ``on_wait`` is told ``waiting()`` (who holds what) once, and ``attempt()`` runs again
    under the transaction's own ``lock_timeout``."""
    try:
        with lock_patience(conn):
            return attempt()
    except psycopg.errors.LockNotAvailable:
        on_wait(waiting())
    return attempt()


def lock_for_writing(conn: psycopg.Connection[Any], schema_name: str, name: str, truncating: bool,
                     on_wait: Callable[[str], None]) -> None:
    """Lock the table in ``conn``'s open transaction against other writers (``SHARE ROW
    EXCLUSIVE``) or, when it is to be truncated, against everyone (``ACCESS EXCLUSIVE``). If
    other sessions hold it for longer than :data:`LOCK_PATIENCE_MS`, ``on_wait`` is told
    once which (pid, user, application, state and since when), and the lock is then waited
    for as long as it takes, as pg_restore does: at 3 a.m. a restore that stands still says
    why. The transaction's own ``lock_timeout`` is left as it was."""
    target = qualified(schema_name, name)
    lock = sql.SQL("LOCK TABLE ONLY {} IN {} MODE").format(
        target, sql.SQL("ACCESS EXCLUSIVE" if truncating else "SHARE ROW EXCLUSIVE"))

    def waiting() -> str:
        oid = int(scalar(conn, "SELECT %s::regclass::oid", (quoted_table(schema_name, name),)))
        return (f"{schema_name}.{name} is held by {lock_holders(conn, [oid])}; waiting for it (Ctrl-C stops the "
                "restore and leaves the table as it was)")

    patiently(conn, lambda: conn.execute(lock), waiting, on_wait)


def lock_holders(conn: psycopg.Connection[Any], oids: Sequence[int] | None, modes: Sequence[str] = ()) -> str:
    """The other sessions holding a lock (of one of ``modes``, e.g. ``AccessExclusiveLock``;
    any mode when empty) on any of the relations ``oids`` (None: any relation of this
    database), one phrase each: pid, user, application, state and since when."""
    rows = conn.execute("""
        SELECT format('pid %%s (%%s%%s, %%s since %%s)', a.pid, a.usename,
                      CASE WHEN a.application_name <> '' THEN ', ' || a.application_name ELSE '' END,
                      a.state, to_char(coalesce(a.xact_start, a.backend_start) AT TIME ZONE 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
          FROM pg_stat_activity a
         WHERE a.pid <> pg_backend_pid()
           AND a.pid IN (SELECT l.pid FROM pg_locks l
                          WHERE l.locktype = 'relation' AND l.granted
                            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                            AND (%s::oid[] IS NULL OR l.relation = ANY(%s::oid[]))
                            AND (cardinality(%s::text[]) = 0 OR l.mode = ANY(%s::text[])))
         ORDER BY a.pid""", (oids and list(oids), oids and list(oids), list(modes), list(modes))).fetchall()
    return ", ".join(str(r[0]) for r in rows) or "another session"


def refuse_non_ascii_names(conn: psycopg.Connection[Any]) -> None:
    """A SQL_ASCII database's names must be ASCII here: psycopg can only send such a
    database's text as ASCII, so a table or schema named with other bytes could be read but
    not named again in a statement. Refused up front, naming them (its data, comments and
    definitions may hold any bytes)."""
    rows = conn.execute(f"""
        SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {SYSTEM_SCHEMA_FILTER} AND c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')
           AND (n.nspname || c.relname) ~ '[^\x01-\x7f]'
         UNION SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname) FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {SYSTEM_SCHEMA_FILTER} AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname::text ~ '[^\x01-\x7f]'
         ORDER BY 1 LIMIT 6""").fetchall()
    if rows:
        names = [str(r[0]) for r in rows]
        raise RefusedError(f"this SQL_ASCII database names tables or columns with non-ASCII bytes "
                           f"({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}), which backup-tool "
                           "cannot address in such a database",
                           "rename them to ASCII names, or convert the database to UTF8 (pg_dump, then "
                           "restore into a database created WITH ENCODING 'UTF8')")


def refuse_unchecked_bytes(conn: psycopg.Connection[Any], backup_encoding: str, backup_id: str,
                           target: str) -> None:
    """A SQL_ASCII backup is restored only into a SQL_ASCII database. Its text is bytes of no
    known encoding, loaded with ``client_encoding`` SQL_ASCII, under which PostgreSQL's COPY
    checks nothing: a database of another encoding would be left holding text invalid in it
    (Bacula's catalog keeps file names as such bytes). Refused before anything is written."""
    have = conn.info.parameter_status("server_encoding") or ""
    if backup_encoding.upper() == "SQL_ASCII" and have.upper() != "SQL_ASCII":
        raise RefusedError(f"backup {backup_id} is of a SQL_ASCII database, whose text PostgreSQL would "
                           f"store unchecked in {target}, a {have} database, where any byte not valid "
                           f"in {have} makes its text unreadable",
                           "restore into a SQL_ASCII database: --create makes one with the backup's "
                           "encoding (restore full), or CREATE DATABASE ... ENCODING 'SQL_ASCII' "
                           "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")


def list_tables(conn: psycopg.Connection[Any]) -> list[TableInfo]:
    """Ordinary and partitioned tables outside system schemas and extensions, biggest first."""
    rows = conn.execute(f"""
        SELECT c.oid, n.nspname, c.relname, c.relkind,
               (SELECT pn.nspname || '.' || pc.relname FROM pg_inherits i
                  JOIN pg_class pc ON pc.oid = i.inhparent
                  JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                 WHERE i.inhrelid = c.oid AND c.relispartition),
               ARRAY(SELECT a.attname FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attgenerated = '' ORDER BY a.attnum),
               pg_table_size(c.oid)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMA_FILTER}
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')
         ORDER BY pg_table_size(c.oid) DESC, n.nspname, c.relname""").fetchall()
    return [TableInfo(r[0], r[1], r[2], r[3], r[4], tuple(r[5]), r[6]) for r in rows]


CHECKSUM_MODULUS = 2**64


def unsigned_64_sql(total: str) -> str:
    """SQL of ``total`` (a sum of signed 64-bit hashes) as a non-negative number modulo 2^64."""
    return f"({total} % {CHECKSUM_MODULUS} + {CHECKSUM_MODULUS}) % {CHECKSUM_MODULUS}"


def hash_sum_sql(row_hash: str) -> str:
    """SQL of the order-independent checksum every content check uses: the sum of a signed
    64-bit hash over rows, modulo 2^64 (0 without rows)."""
    return unsigned_64_sql(f"coalesce(sum({row_hash}), 0)")


CHECKSUM_SQL = ("SELECT n, " + unsigned_64_sql("s") + " FROM (SELECT count(*) AS n, coalesce(sum({}), 0) AS s"
                " FROM ONLY {} AS t{}) AS agg")

BlockRange = tuple[int | None, int | None]
"""A range of a table's heap blocks, [start, stop): None leaves that end open."""


def block_ranges(blocks: int, parts: int) -> list[BlockRange]:
    """``parts`` contiguous ranges of about equal block counts covering a heap of ``blocks``
    blocks and anything beyond it: the first is open below, the last open above, so rows in
    blocks added after the size was read still belong to exactly one range. Pure."""
    parts = max(1, min(parts, blocks))
    cuts = [blocks * i // parts for i in range(1, parts)]
    return list(zip([None, *cuts], [*cuts, None], strict=True))


def ctid_condition(blocks: BlockRange) -> str:
    """SQL condition selecting the rows stored in ``blocks`` (a TID range scan on PostgreSQL
    14 and later: only those blocks are read); empty for the whole table."""
    start, stop = blocks
    terms = ([f"ctid >= '({int(start)},0)'::tid"] if start is not None else []) + \
            ([f"ctid < '({int(stop)},0)'::tid"] if stop is not None else [])
    return " AND ".join(terms)


def combine_checksums(parts: Sequence[tuple[int, str]]) -> tuple[int, str]:
    """The (rows, checksum) of a table from those of parts that hold each of its rows once:
    counts add up, and the checksum is a sum of row hashes modulo 2**64. Pure."""
    rows = sum(n for n, _ in parts)
    total = sum(int(digest, 16) for _, digest in parts) % CHECKSUM_MODULUS
    return rows, f"{total:016x}"


@dataclass(frozen=True)
class ColumnType:
    """A column as the checksum sees it: name, type oid and type modifier (pg_attribute)."""

    name: str
    type_oid: int
    typmod: int = -1


NATIVE_HASHES: dict[int, str] = {
    16: "{}",                       # bool: hashchar of the byte; text 't'/'f'
    17: "{}",                       # bytea: hash of every byte; text is their hex (pinned)
    21: "{}",                       # int2: hash of the value widened to 32 bits
    23: "{}",                       # int4
    26: "{}",                       # oid
    1082: "{}",                     # date: hash of the day number; text (DateStyle ISO) follows from it
    2950: "{}",                     # uuid: hash of the 16 bytes
    25: '{} COLLATE "C"',           # text: bytes hashed as such under a deterministic collation
    1043: '{} COLLATE "C"',         # varchar: as text
    1042: '{} COLLATE "C"',         # bpchar(n): bytes without trailing blanks, plus n (below)
    20: "int8send({})",             # int8, timestamp, timestamptz: their own hash folds 64 bits
    1114: "timestamp_send({})",     # into 32 (1 and 2^32 hash equal); their 8-byte send form is
    1184: "timestamptz_send({})",   # hashed whole instead (text under TimeZone UTC follows from it)
}
"""Built-in types (oids are fixed across majors) whose hash, as written here, determines the
value's text form, so hashing them natively keeps the checksum's guarantee. Everything else
(numeric, interval, float4/8, json/jsonb, arrays, ranges, composites, domains, enums, citext,
unbounded bpchar...) has values of different text that hash equal, or no hash at all, and goes
through its text form."""


def _natively_hashed(col: ColumnType) -> bool:
    return col.type_oid in NATIVE_HASHES and (col.type_oid != 1042 or col.typmod >= 0)


SEEDED_HASHES: dict[int, str] = {
    16: "hashint4extended({}::int4, {})",          # bool: 0 or 1
    21: "hashint2extended({}, {})",
    23: "hashint4extended({}, {})",
    26: "hashoidextended({}, {})",
    2950: "uuid_hash_extended({}, {})",
    25: 'hashtextextended({} COLLATE "C", {})',
    1043: 'hashtextextended({} COLLATE "C", {})',
    1042: 'hashbpcharextended({} COLLATE "C", {})',  # bounded only; the key carries the length
    20: "hashtextextended({}::text, {})",           # int8: its decimal text (int8out), not the folding hash
}
"""``typed-column``: natively hashed types (:data:`NATIVE_HASHES`) with a seeded hash function
callable on their own, as ``(value, key)`` templates. The rest of :data:`NATIVE_HASHES`
(bytea, date, timestamp, timestamptz) has no such function and is hashed together in one
``hash_record_extended``, as ``typed-row`` does."""

POSITION_BITS = 11
"""Column positions (at most 1600) fit below this bit; a bpchar(n) key holds n above it."""


def _typed_column_sql(columns: Sequence[ColumnType]) -> sql.Composable:
    """``typed-column``: the XOR of one 64-bit hash per column, each keyed by the column's
    position (and a bpchar's declared length), mixed by ``hashtextextended('', xor)``.

    Injective as far as 64-bit hashes go: a value is hashed by a function that determines its
    text form (:data:`SEEDED_HASHES`, or its output function called by ``concat``, never a cast
    to text, which for bpchar, inet or bool differs from the output); the position key tells
    columns apart; a NULL becomes a constant of its position (``-position``); the columns
    hashed in ``hash_record_extended`` are one term (its NULLs are part of it). The final keyed
    hash mixes the XOR per row, so values swapped between rows change the sum. Pure."""
    def ref(c: ColumnType) -> sql.Composable:
        return sql.SQL("t.{}").format(sql.Identifier(c.name))

    terms: list[sql.Composable] = []
    grouped: list[sql.Composable] = []
    for position, c in enumerate(columns, start=1):
        if c.type_oid in SEEDED_HASHES and _natively_hashed(c):
            key = (c.typmod << POSITION_BITS) | position if c.type_oid == 1042 else position
            hashed = sql.SQL(SEEDED_HASHES[c.type_oid]).format(ref(c), sql.Literal(key))
            terms.append(sql.SQL("coalesce({}, {})").format(hashed, sql.Literal(-position)))
        elif _natively_hashed(c):
            grouped.append(sql.SQL(NATIVE_HASHES[c.type_oid]).format(ref(c)))
        else:
            terms.append(sql.SQL('CASE WHEN {c} IS NULL THEN {n} ELSE hashtextextended(concat({c}) COLLATE "C", {k}) END')
                         .format(c=ref(c), n=sql.Literal(-position), k=sql.Literal(position)))
    if grouped:
        terms.append(sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(grouped)))
    combined = sql.SQL(" # ").join(sql.SQL("({})").format(term) for term in terms) if terms else sql.SQL("0")
    return sql.SQL("hashtextextended('', {})").format(combined)


def row_hash_sql(method: ChecksumMethod, columns: Sequence[ColumnType]) -> sql.Composable:
    """The SQL expression of one row's 64-bit hash (the row aliased ``t``). Pure.

    ``row-text``: ``hashtextextended(ROW(columns)::text, 0)``. ``typed-row``: the natively
    hashed columns (:data:`NATIVE_HASHES`) and the declared lengths of their bpchar(n) columns
    go through ``hash_record_extended``, whose result seeds ``hashtextextended`` over the text
    form of the other columns (``ROW(...)::text``, as injective as today's). The seed matters:
    ``hash_record_extended`` combines column hashes linearly, so summed over rows it would not
    notice values swapped between rows; the keyed text hash mixes them per row. A column changes
    the row's hash whichever part it is in; a table without natively hashed columns gets the
    ``row-text`` value. ``typed-column``: see :func:`_typed_column_sql`."""
    def ref(c: ColumnType) -> sql.Composable:
        return sql.SQL("t.{}").format(sql.Identifier(c.name))

    if method is ChecksumMethod.ROW_TEXT:
        return sql.SQL("hashtextextended(ROW({})::text, 0)").format(sql.SQL(", ").join(ref(c) for c in columns))
    if method is ChecksumMethod.TYPED_COLUMN:
        return _typed_column_sql(columns)
    native = [c for c in columns if _natively_hashed(c)]
    others = [c for c in columns if not _natively_hashed(c)]
    lengths = [sql.Literal(c.typmod) for c in native if c.type_oid == 1042]
    parts = [sql.SQL(NATIVE_HASHES[c.type_oid]).format(ref(c)) for c in native] + lengths
    seed = sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(parts)) if native \
        else sql.SQL("0")
    return sql.SQL('hashtextextended((ROW({})::text) COLLATE "C", {})').format(
        sql.SQL(", ").join(ref(c) for c in others), seed)


def column_types(conn: psycopg.Connection[Any], schema: str, name: str,
                 columns: Sequence[str]) -> list[ColumnType]:
    """``columns`` of the table with their types, in the order given; a column the table lacks
    keeps an unknown type (the checksum query then fails on it, as a missing column should)."""
    return column_types_named(conn, {(schema, name): columns})[(schema, name)]


def column_types_of(conn: psycopg.Connection[Any],
                    tables: Mapping[int, Sequence[str]]) -> dict[int, list[ColumnType]]:
    """:func:`column_types` of many tables (key: table oid, value: its columns) in one
    catalog query: a backup of 3,000 partitions read them with 3,000 before."""
    rows = conn.execute("SELECT attrelid, attname, atttypid, atttypmod FROM pg_attribute"
                        " WHERE attrelid = ANY(%s) AND attnum > 0 AND NOT attisdropped",
                        (list(tables),)).fetchall()
    found: dict[int, dict[str, tuple[int, int]]] = {oid: {} for oid in tables}
    for oid, n, type_oid, mod in rows:
        found[int(oid)][str(n)] = (int(type_oid), int(mod))
    return {oid: [ColumnType(c, *found[oid].get(c, (0, -1))) for c in columns] for oid, columns in tables.items()}


def column_types_named(conn: psycopg.Connection[Any],
                       tables: Mapping[tuple[str, str], Sequence[str]]) -> dict[tuple[str, str], list[ColumnType]]:
    """:func:`column_types` of many tables (key: (schema, name), value: its columns) in one
    catalog query; a table not found has its columns' types unknown."""
    keys = list(tables)
    rows = conn.execute("SELECT q.i, a.attname, a.atttypid, a.atttypmod"
                        " FROM unnest(%s::text[]) WITH ORDINALITY AS q(t, i)"
                        " JOIN pg_attribute a ON a.attrelid = to_regclass(q.t)"
                        " WHERE a.attnum > 0 AND NOT a.attisdropped", (_regclasses(keys),)).fetchall()
    found: dict[int, dict[str, tuple[int, int]]] = {i: {} for i in range(len(keys))}
    for i, n, type_oid, mod in rows:
        found[int(i) - 1][str(n)] = (int(type_oid), int(mod))
    return {key: [ColumnType(c, *found[i].get(c, (0, -1))) for c in tables[key]] for i, key in enumerate(keys)}


def _jit_off_at_start(conn: psycopg.Connection[Any]) -> bool:
    """Whether the session's startup ``options`` leave JIT off (as :data:`SESSION_DEFAULTS`
    has every session :meth:`ConnInfo.connect` opens, unless the DSN's own ``options`` turn
    it on): they override the role's and database's ``jit``, and nothing the tool runs
    turns it on again. Read from the connection's parameters, without a round trip."""
    tokens = conn.info.get_parameters().get("options", "").split()
    value = None
    for i, token in enumerate(tokens):
        setting = tokens[i + 1] if token == "-c" and i + 1 < len(tokens) else \
            token[2:] if token.startswith(("-c", "--")) else ""
        name, _, given = setting.partition("=")
        if name.strip().lower().replace("-", "_") == "jit":
            value = given.strip().lower()
    return value in ("off", "false", "no", "0", "of", "f", "n")


def table_checksum(conn: psycopg.Connection[Any], schema: str, name: str, columns: Sequence[str],
                   method: ChecksumMethod, blocks: BlockRange = (None, None),
                   types: Sequence[ColumnType] | None = None) -> tuple[int, str]:
    """Row count and an order-independent content checksum (sum of per-row 64-bit hashes).

    Order-independent so that a table rewritten by VACUUM FULL or loaded in another order
    still matches; computed over ``columns`` (the dumped, non-generated ones) by ``method``
    (see :func:`row_hash_sql`) under the pinned session settings, so a copy of the table
    elsewhere (another schema, extra columns) compares equal when it holds the same rows.
    Guaranteed: a table whose rows' text forms differ (as a multiset) gets another checksum,
    up to a 64-bit collision. ``blocks`` restricts it to the rows of a range of heap blocks
    (see :func:`combine_checksums`); ``types``, ``columns`` with their types as
    :func:`column_types_of` read them (else read here). Raises :class:`DatabaseError` when
    the server is too old for ``method``.

    The session's JIT is turned off first unless its startup options did (until the session
    or its transaction ends): the
    query is one scan calling hash functions, which JIT does not speed up, while compiling
    it costs a big table's query up to seconds of server CPU (inlining and optimization
    start at a plan cost of 500000, a table of a few GB). Results are the same
    either way.
    """
    _check_server(conn, method)
    typed = _hashed_types(conn, method, schema, name, columns, types)
    if not _jit_off_at_start(conn):
        conn.execute("SET jit = off")
    condition = ctid_condition(blocks)
    where = sql.SQL(" WHERE " + condition) if condition else sql.SQL("")
    row = conn.execute(sql.SQL(CHECKSUM_SQL).format(row_hash_sql(method, typed), qualified(schema, name),
                                                    where)).fetchone()
    assert row is not None
    return int(row[0]), f"{int(row[1]):016x}"


def _hashed_types(conn: psycopg.Connection[Any], method: ChecksumMethod, schema: str, name: str,
                  columns: Sequence[str], types: Sequence[ColumnType] | None) -> list[ColumnType]:
    """The columns as ``method`` hashes them: by name alone for ``row-text``, else with their
    types (``types`` when the caller read them, else read here)."""
    if method is ChecksumMethod.ROW_TEXT:
        return [ColumnType(c, 0) for c in columns]
    return list(types) if types is not None else column_types(conn, schema, name, columns)


def _check_server(conn: psycopg.Connection[Any], method: ChecksumMethod) -> None:
    major = conn.info.server_version // 10000
    if major < method.min_server_major:
        raise DatabaseError(f"the backup's content checksums ({method}) need PostgreSQL "
                            f"{method.min_server_major} or later; this server is {major}",
                            "validate against a server of that major or later")


ChecksumTarget = tuple[str, str, Sequence[str], Sequence[ColumnType] | None]
"""A whole table to checksum: schema, name, columns and (or None: read here) their types."""


def table_checksums(conn: psycopg.Connection[Any], targets: Sequence[ChecksumTarget],
                    method: ChecksumMethod) -> list[tuple[int, str]]:
    """:func:`table_checksum` of each whole table of ``targets``, in their order, in one
    statement: one ``UNION ALL`` branch per table, each its own count and sum over its own
    rows (the same query :func:`table_checksum` runs, numbered). One round trip for many
    small tables instead of one each; the statement locks them all until the transaction
    ends."""
    _check_server(conn, method)
    if not targets:
        return []
    branches = []
    for i, (schema, name, columns, types) in enumerate(targets):
        typed = _hashed_types(conn, method, schema, name, columns, types)
        branches.append(sql.SQL("SELECT {} AS i, * FROM ({}) AS one").format(
            sql.Literal(i), sql.SQL(CHECKSUM_SQL).format(row_hash_sql(method, typed), qualified(schema, name),
                                                         sql.SQL(""))))
    if not _jit_off_at_start(conn):
        conn.execute("SET jit = off")
    found = {int(i): (int(n), f"{int(s):016x}")
             for i, n, s in conn.execute(sql.SQL(" UNION ALL ").join(branches)).fetchall()}
    return [found[i] for i in range(len(targets))]


def heap_blocks(conn: psycopg.Connection[Any], oids: Sequence[int]) -> dict[int, int]:
    """Blocks in each table's main fork now (read after a snapshot is taken, it covers every
    row the snapshot sees: a heap only shrinks under a lock the backup's share lock excludes)."""
    rows = conn.execute("SELECT c.oid, pg_relation_size(c.oid, 'main') / current_setting('block_size')::bigint"
                        " FROM pg_class c WHERE c.oid = ANY(%s)", (list(oids),)).fetchall()
    return {int(oid): int(blocks) for oid, blocks in rows}


def _regclasses(tables: Sequence[tuple[str, str]]) -> list[str]:
    return [quoted_table(schema, name) for schema, name in tables]


_WANTED = "(SELECT to_regclass(q)::oid FROM unnest(%(tables)s::text[]) q)"
_SYSTEM_SCHEMA_FILTER_PARAMS = SYSTEM_SCHEMA_FILTER.replace("%", "%%")


def _system_filter(scoped: bool) -> str:
    """:data:`SYSTEM_SCHEMA_FILTER`, its ``%`` doubled in a query that takes parameters."""
    return _SYSTEM_SCHEMA_FILTER_PARAMS if scoped else SYSTEM_SCHEMA_FILTER


def sequences(conn: psycopg.Connection[Any], owned_by: Sequence[tuple[str, str]] | None = None,
              named: Sequence[tuple[str, str]] = ()) -> list[SequenceRecord]:
    """Every sequence with its current value and the column that owns it, if any; with
    ``owned_by``, only the sequences owned by a column (or identity) of those tables plus the
    ``named`` ones, found from the tables through the catalog's indexes: the cost follows
    those tables, not the database (the values read :data:`SEQUENCES_PER_STATEMENT` at a time)."""
    scope = "" if owned_by is None else f"""
           AND c.oid IN (SELECT d.objid FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                            AND d.refobjid IN {_WANTED} AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')
                         UNION ALL
                         SELECT to_regclass(q)::oid FROM unnest(%(named)s::text[]) q)"""
    params = {} if owned_by is None else {"tables": _regclasses(owned_by), "named": _regclasses(named)}
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, s.seqincrement,
               (SELECT json_build_object('schema', tn.nspname, 'table', t.relname,
                                         'column', a.attname)
                  FROM pg_depend d
                  JOIN pg_class t ON t.oid = d.refobjid
                  JOIN pg_namespace tn ON tn.oid = t.relnamespace
                  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
                   AND d.deptype IN ('a', 'i') LIMIT 1)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_sequence s ON s.seqrelid = c.oid
         WHERE c.relkind = 'S' AND {_system_filter(bool(scope))}{scope}
         ORDER BY 1, 2""", params or None).fetchall()
    values: dict[int, tuple[int, bool]] = {}
    for start in range(0, len(rows), SEQUENCES_PER_STATEMENT):
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}::int, last_value, is_called FROM {}").format(sql.Literal(i), qualified(row[0], row[1]))
            for i, row in enumerate(rows[start:start + SEQUENCES_PER_STATEMENT], start))
        values.update((int(i), (int(last), bool(called))) for i, last, called in conn.execute(query))
    result: list[SequenceRecord] = []
    for i, (schema, name, increment, owner) in enumerate(rows):
        last_value, is_called = values[i]
        result.append({"schema": schema, "name": name, "last_value": last_value,
                       "is_called": is_called, "increment": int(increment),
                       "owned_by": owner})
    return result


SEQUENCES_PER_STATEMENT = 100
"""Sequences whose values :func:`sequences` reads in one statement (``UNION ALL``): one round
trip per sequence cost a database of 3,000 serial columns 3,000 statements in each backup
and each validation."""


FORCE_STATS_FLUSH = "SELECT pg_catalog.pg_stat_force_next_flush()"
"""Asks the server to write this session's pending activity counts (rows inserted, changed
since the last ANALYZE...) to the shared statistics as soon as the current statement ends,
instead of up to a second later (PostgreSQL 15 and later)."""


def can_force_stats_flush(conn: psycopg.Connection[Any]) -> bool:
    """Whether sessions of this role on this server may run :data:`FORCE_STATS_FLUSH`."""
    if conn.info.server_version < 150000:
        return False
    return bool(scalar(conn, "SELECT pg_catalog.has_function_privilege("
                             "'pg_catalog.pg_stat_force_next_flush()', 'EXECUTE')"))


def scalar(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    """The first column of the first row of ``query``; DatabaseError when it returns no row."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise DatabaseError("a catalog query returned no row", "report this as a bug")
    return row[0]


def dict_rows(conn: psycopg.Connection[Any], query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    return list(cur.execute(query, params).fetchall())


def foreign_keys(conn: psycopg.Connection[Any], touching: Sequence[tuple[str, str]] | None = None
                 ) -> list[dict[str, Any]]:
    """Every user foreign key (partition clones left out) with its columns and MATCH rule: what
    orphan counts and restore-time checks need, without the rest of :func:`inventory`. With
    ``touching``, only the keys of those tables or referencing them, found through the
    constraints' dependencies on them (cost follows those tables, not the database)."""
    scope = "" if touching is None else f"""
               AND (con.conrelid IN {_WANTED} OR con.confrelid IN {_WANTED})
               AND con.oid IN (SELECT d.objid FROM pg_depend d
                                WHERE d.classid = 'pg_constraint'::regclass
                                  AND d.refclassid = 'pg_class'::regclass AND d.refobjid IN {_WANTED})"""
    return dict_rows(conn, f"""
            SELECT n.nspname AS schema, c.relname AS table, con.conname AS name,
                   fn.nspname AS ref_schema, f.relname AS ref_table,
                   ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                          ORDER BY k.i)::text[] AS columns,
                   ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                           JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                          ORDER BY k.i)::text[] AS ref_columns,
                   con.confmatchtype::text AS match, con.convalidated AS validated,
                   pg_get_constraintdef(con.oid) AS definition
              FROM pg_constraint con
              JOIN pg_class c ON c.oid = con.conrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_class f ON f.oid = con.confrelid
              JOIN pg_namespace fn ON fn.oid = f.relnamespace
             WHERE con.contype = 'f' AND con.conparentid = 0 AND {_system_filter(bool(scope))}{scope}
             ORDER BY 1, 2, 3""", None if touching is None else {"tables": _regclasses(touching)})


def indexes(conn: psycopg.Connection[Any], of: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every user index with its definition and valid/ready state; with ``of``, only those
    tables' indexes (looked up by table: cost follows those tables, not the database)."""
    scope = "" if of is None else f" AND i.indrelid IN {_WANTED}"
    return dict_rows(conn, f"""
            SELECT n.nspname AS schema, t.relname AS table, c.relname AS name,
                   pg_get_indexdef(c.oid) AS definition, i.indisvalid AS valid,
                   i.indisready AS ready
              FROM pg_index i
              JOIN pg_class c ON c.oid = i.indexrelid
              JOIN pg_class t ON t.oid = i.indrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE {_system_filter(bool(scope))}{scope}
             ORDER BY 1, 2, 3""", None if of is None else {"tables": _regclasses(of)})


def user_objects(conn: psycopg.Connection[Any]) -> list[str]:
    """Names of what makes a database non-empty: user tables, views, sequences, functions, types
    (the marker schema of an unfinished restore, see :mod:`backup_tool.postgres.restore_marker`, is not one)."""
    rows = conn.execute(f"""
        SELECT kind || ' ' || name FROM (
            SELECT 'relation' AS kind, n.nspname || '.' || c.relname AS name
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {SYSTEM_SCHEMA_FILTER}
            UNION ALL
            SELECT 'function', n.nspname || '.' || p.proname
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE {SYSTEM_SCHEMA_FILTER}
            UNION ALL
            SELECT 'schema', n.nspname FROM pg_namespace n
             WHERE {SYSTEM_SCHEMA_FILTER} AND n.nspname NOT IN ('public', '{UNFINISHED_RESTORE_SCHEMA}')
            UNION ALL
            SELECT 'extension', extname FROM pg_extension WHERE extname <> 'plpgsql'
        ) o ORDER BY 1 LIMIT 20""").fetchall()
    return [r[0] for r in rows]


def missing_roles(conn: psycopg.Connection[Any], roles: Sequence[str]) -> list[str]:
    if not roles:
        return []
    rows = conn.execute("SELECT r FROM unnest(%s::text[]) r WHERE r NOT IN (SELECT rolname FROM pg_roles)",
                        (list(roles),)).fetchall()
    return [r[0] for r in rows]


class Snapshot:
    """An exported snapshot held open by a REPEATABLE READ transaction (pg_export_snapshot).

    Every session that imports ``snapshot_id`` sees exactly the same data, so parallel
    per-table dumps and pg_dump's schema dump form one consistent backup. The snapshot
    lives as long as this object's connection; tables are share-locked so that no
    concurrent DDL can drop or rewrite them while the backup runs. On a hot standby
    ``wal_lsn`` is the last WAL location replayed.
    """

    def __init__(self, conninfo: ConnInfo, lock_timeout: str = "5min",
                 session: psycopg.Connection[Any] | None = None) -> None:
        """``session``: the connection :meth:`open_session` opened for it ahead of time (its
        backend started while the caller did other work); else one is opened here."""
        self.conn = _repeatable_read(session if session is not None else self.open_session(conninfo, lock_timeout))
        row = self.conn.execute("SELECT pg_export_snapshot(), (CASE WHEN pg_is_in_recovery()"
                                " THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, now()").fetchone()
        assert row is not None
        self.snapshot_id: str = row[0]
        self.wal_lsn: str = row[1]
        self.taken_at = row[2]

    @staticmethod
    def open_session(conninfo: ConnInfo, lock_timeout: str = "5min") -> psycopg.Connection[Any]:
        """A connection for a snapshot not taken yet (no transaction open)."""
        return conninfo.connect(autocommit=False, settings={"lock_timeout": lock_timeout})

    def list_tables(self, on_wait: Callable[[str], None] = lambda _: None) -> list[TableInfo]:
        """:func:`list_tables` in the snapshot (whose sizes take each table's share lock, kept
        to the end), telling ``on_wait`` who holds an exclusive lock when that waits longer
        than :data:`LOCK_PATIENCE_MS`."""
        return self._patiently(lambda: list_tables(self.conn), None, on_wait)

    def lock_tables(self, tables: Sequence[TableInfo], on_wait: Callable[[str], None] = lambda _: None) -> None:
        """Share-lock the tables, after checking this role may read them and every sequence.
        Where another session's exclusive lock (DDL, VACUUM FULL) keeps them waiting longer
        than :data:`LOCK_PATIENCE_MS`, ``on_wait`` is told which sessions hold which tables,
        once, and the wait goes on up to the snapshot's ``lock_timeout``."""
        with locks_released_after(self.conn):
            self._check_readable(tables)
        for start in range(0, len(tables), 200):
            part = tables[start:start + 200]
            lock = sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                sql.SQL(", ").join(qualified(t.schema, t.name) for t in part))
            self._patiently(functools.partial(self.conn.execute, lock), [t.oid for t in part], on_wait)

    def _patiently(self, attempt: Callable[[], T], oids: list[int] | None, on_wait: Callable[[str], None]) -> T:
        """:func:`patiently`, naming who holds an exclusive lock on ``oids`` (None: any table);
        a wait past the snapshot's ``lock_timeout`` fails the backup with a hint."""
        try:
            return patiently(self.conn, attempt, lambda: "tables to back up are locked exclusively by "
                             f"{lock_holders(self.conn, oids, ['AccessExclusiveLock'])}; waiting for them", on_wait)
        except psycopg.errors.LockNotAvailable as exc:
            raise DatabaseError(f"could not lock the tables to back up: {exc}",
                                "a long-running DDL or VACUUM FULL holds a lock; retry later") from None

    def _check_readable(self, tables: Sequence[TableInfo]) -> None:
        """Refuse tables this role may not read whole: no SELECT, or row security filtering."""
        denied = self.conn.execute(sql.SQL(f"""
            SELECT current_user, format('%I.%I', n.nspname, c.relname)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE (c.oid = ANY({{oids}}) OR (c.relkind = 'S' AND {SYSTEM_SCHEMA_FILTER}))
               AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
             ORDER BY 2""").format(oids=sql.Literal([t.oid for t in tables]))).fetchall()
        if denied:
            user, unreadable = denied[0][0], [row[1] for row in denied]
            raise DatabaseError(f"role {user} may not read {len(unreadable)} of the tables and sequences to back "
                                f"up ({', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''})",
                                f"grant {user} USAGE on their schemas and SELECT on them, or back up as "
                                "their owner or a superuser")
        hidden = [row[0] for row in self.conn.execute(sql.SQL("""
            SELECT format('%I.%I', n.nspname, c.relname)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = ANY({oids}) AND c.relrowsecurity
               AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user)
               AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
             ORDER BY 1""").format(oids=sql.Literal([t.oid for t in tables]))).fetchall()]
        if hidden:
            raise DatabaseError(f"row-level security would hide rows of {len(hidden)} of the tables to back up from "
                                f"role {scalar(self.conn, 'SELECT current_user')} ({', '.join(hidden[:3])}"
                                f"{' ...' if len(hidden) > 3 else ''}); a backup must hold every row",
                                "back up as a superuser or a role with BYPASSRLS, or as the tables' owner where "
                                "they do not FORCE ROW LEVEL SECURITY")

    def close(self) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


def _repeatable_read(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """``conn`` with its next transaction REPEATABLE READ READ ONLY: psycopg opens it with the
    first statement (an explicit BEGIN after psycopg's own only drew a server warning)."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def import_snapshot(conn: psycopg.Connection[Any], snapshot_id: str) -> None:
    """Open ``conn``'s next transaction (REPEATABLE READ READ ONLY) in ``snapshot_id``."""
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))


def renew_snapshot(conn: psycopg.Connection[Any], snapshot_id: str) -> None:
    """End ``conn``'s transaction, letting go of the locks it took, and import ``snapshot_id``
    again in a new one: the same data, for as long as the exporting transaction lasts."""
    conn.rollback()
    import_snapshot(conn, snapshot_id)


@contextmanager
def snapshot_session(conninfo: ConnInfo, snapshot_id: str,
                     settings: dict[str, str] | None = None) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose open transaction imports ``snapshot_id``."""
    conn = _repeatable_read(conninfo.connect(autocommit=False, settings=settings))
    try:
        import_snapshot(conn, snapshot_id)
        yield conn
    finally:
        try:
            conn.rollback()
        finally:
            conn.close()


class SessionPool:
    """Sessions reused from one task to the next, at most one per thread at a time (a database
    of thousands of small tables would otherwise start a server backend per table: ~5 ms of
    server CPU each with 3,000 partitions). A session goes back to the pool only after its
    task succeeded, with ``RESET ALL`` (unless ``reset`` is False: the tasks set nothing): what
    a task set is undone, the ``settings`` it was opened with stay. A task whose last query
    ends with :data:`RESET_ALL` says so with :meth:`was_reset`, which spares the round trip."""

    RESET_ALL = "RESET ALL"

    def __init__(self, conninfo: ConnInfo, settings: dict[str, str] | None = None, reset: bool = True) -> None:
        self.conninfo = conninfo
        self.settings = settings
        self.reset = reset
        self._idle: list[psycopg.Connection[Any]] = []
        self._reset_by_task: set[int] = set()
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        conn = conn or self.conninfo.connect(settings=self.settings)
        try:
            yield conn
            with self._lock:
                reset = self.reset and id(conn) not in self._reset_by_task
            if reset:
                conn.execute(self.RESET_ALL)
        except BaseException:
            conn.close()
            raise
        finally:
            with self._lock:
                self._reset_by_task.discard(id(conn))
        with self._lock:
            self._idle.append(conn)

    def was_reset(self, conn: psycopg.Connection[Any]) -> None:
        """``conn``'s task ran :data:`RESET_ALL` last, set nothing after it, and succeeded so far."""
        with self._lock:
            self._reset_by_task.add(id(conn))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def try_advisory_lock(conn: psycopg.Connection[Any], name: str) -> bool:
    """Take a session-level advisory lock named by ``name``; False if someone else holds it."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (name,)).fetchone()
    return bool(row and row[0])


def advisory_lock(conn: psycopg.Connection[Any], name: str, wait_seconds: float = 0.0) -> bool:
    """Take a session-level advisory lock, waiting up to ``wait_seconds`` for its holder to
    let go (the server queues waiters fairly); False if it is still held then."""
    if wait_seconds <= 0:
        return try_advisory_lock(conn, name)
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(wait_seconds * 1000)}ms",))
    try:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (name,))
        return True
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        conn.execute("RESET lock_timeout")


def copy_out_command(conninfo: ConnInfo, major: int, snapshot_id: str, table: TableInfo,
                     blocks: BlockRange = (None, None), binary: bool = False) -> list[str]:
    """psql command line that writes one table's rows as COPY text to stdout, in the snapshot
    (a table without columns yields one empty line per row); ``blocks``: only the rows stored
    in that range of heap blocks, in the same text form; ``binary``: in COPY's binary format
    instead (for a table of the same column types on a server of the same major only)."""
    return [
        find_tool("psql", major), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo.tool_conninfo(),
        "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        "-c", f"SET TRANSACTION SNAPSHOT '{snapshot_id}'",
        "-c", copy_out_sql(table, blocks, binary),
        "-c", "COMMIT",
    ]


def copy_out_sql(table: TableInfo, blocks: BlockRange = (None, None), binary: bool = False) -> str:
    """The COPY ... TO STDOUT statement of :func:`copy_out_command`, for a session of our own."""
    condition = ctid_condition(blocks)
    if condition:
        columns = ", ".join(quote_ident(c) for c in table.columns)
        copy = f"COPY (SELECT {columns} FROM ONLY {table.qualified} WHERE {condition}) TO STDOUT"
    else:
        columns = f" ({', '.join(quote_ident(c) for c in table.columns)})" if table.columns else ""
        copy = f"COPY {table.qualified}{columns} TO STDOUT"
    if binary:
        copy += " (FORMAT binary)"
    return copy


def copy_in_statement(schema: str, name: str, columns: Sequence[str], freeze: bool = False,
                      binary: bool = False) -> sql.Composed:
    """COPY FROM STDIN over ``columns``; with none (a table without columns, which can still
    hold rows: one empty line each) the column list is left out, as COPY's syntax requires.
    ``binary``: the rows come in COPY's binary format."""
    column_list = sql.SQL(" ({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in columns)) \
        if columns else sql.SQL("")
    options = [*(["FORMAT binary"] if binary else []), *(["FREEZE"] if freeze else [])]
    return sql.SQL("COPY {}{} FROM STDIN{}").format(
        qualified(schema, name), column_list, sql.SQL(f" WITH ({', '.join(options)})" if options else ""))


def truncate_statement(schema: str, name: str) -> sql.Composed:
    return sql.SQL("TRUNCATE ONLY {}").format(qualified(schema, name))
