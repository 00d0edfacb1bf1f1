"""Database-level properties: what ``pg_dump --create`` carries beyond the objects inside.

A logical backup records, in its manifest inventory under ``"database"``, the properties of
the backed-up database itself: owner, encoding and locale (collation, ctype, provider, ICU
locale), connection limit, whether it is a template (``IS_TEMPLATE``, which pg_dump
--create carries; absent from manifests older than it, then neither applied nor compared),
comment, its ACL as a set of (grantee, grantor, privilege,
grantable), ``ALTER DATABASE … SET`` settings and ``ALTER ROLE … IN DATABASE … SET``
settings (in their stored order, which is the order pg_dump prints them in). A restore applies them to the target database under its own name (a restore
into ``app_dr`` gets ``app``'s properties), last, so that a setting such as
``default_transaction_read_only`` cannot get in the restore's way. Validation compares the
same record, name excluded.

The rows are text arrays: an array whose first element is a role's ``name`` would be a
``name[]``, cutting every setting to 63 bytes (a long ``search_path`` lost its last schemas,
an ``app.jwt_secret`` its tail, and validation, reading both sides the same way, passed).

Guarantees: the target ends with exactly the backed-up settings and grants (extras on an
existing target are reset or revoked); what cannot be applied, a setting or grant of a
role missing on the target server, or a setting the restoring role may not set (a database
owner restoring ``log_min_messages``: the others are still applied), is returned to the
caller to report, never dropped silently, and validation then fails naming it. Encoding and locale can only be chosen when
the database is created (``--create``); on an existing target a difference is reported by
validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import psycopg
from psycopg import sql

from backup_tool.errors import RefusedError
from backup_tool.postgres.connection import ConnInfo, scalar

# Settings whose value is a list (pg_dump's variable_is_guc_list_quote): each element is
# quoted on its own when the setting is replayed.
LIST_SETTINGS = frozenset({"local_preload_libraries", "search_path", "session_preload_libraries",
                           "shared_preload_libraries", "temp_tablespaces", "unix_socket_directories"})

_PROPERTIES_SQL = """
    SELECT pg_get_userbyid(d.datdba) AS owner, pg_encoding_to_char(d.encoding) AS encoding,
           d.datcollate AS collate, d.datctype AS ctype, d.datlocprovider::text AS locale_provider,
           coalesce(to_jsonb(d) ->> 'datlocale', to_jsonb(d) ->> 'daticulocale') AS icu_locale,
           d.datconnlimit AS connection_limit, d.datistemplate AS is_template,
           (SELECT spcname FROM pg_tablespace WHERE oid = d.dattablespace) AS tablespace,
           shobj_description(d.oid, 'pg_database') AS comment,
           ARRAY(SELECT ARRAY[CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END,
                              pg_get_userbyid(a.grantor)::text, a.privilege_type, a.is_grantable::text]
                   FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                  ORDER BY 1) AS acl,
           ARRAY(SELECT ARRAY[coalesce(pg_get_userbyid(NULLIF(s.setrole, 0))::text, ''), c.setting]
                   FROM pg_db_role_setting s, unnest(s.setconfig) WITH ORDINALITY c(setting, i)
                  WHERE s.setdatabase = d.oid
                  ORDER BY coalesce(pg_get_userbyid(NULLIF(s.setrole, 0)), ''), c.i) AS settings
      FROM pg_database d WHERE d.datname = current_database()"""


def properties(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The current database's properties, in the manifest's JSON shape (lists, no oids)."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    row = cur.execute(_PROPERTIES_SQL).fetchone()
    assert row is not None
    return {**row, "acl": [list(a) for a in row["acl"]], "settings": [list(s) for s in row["settings"]]}


FIXED_AT_CREATION = ("encoding", "collate", "ctype", "locale_provider", "icu_locale")
"""Properties a database gets when it is created and keeps: a restore into an existing
database cannot give it the backup's."""


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two property records, one phrase per difference."""
    found = [_phrase(key, expected, actual) for key in FIXED_AT_CREATION if expected.get(key) != actual.get(key)]
    for key in ("owner", "connection_limit", "comment", "is_template", "tablespace"):
        if key in ("is_template", "tablespace") and key not in expected:
            continue
        if expected.get(key) != actual.get(key):
            found.append(_phrase(key, expected, actual))
    for key, what in (("acl", "grant"), ("settings", "setting")):
        want = {tuple(x) for x in expected.get(key, [])}
        have = {tuple(x) for x in actual.get(key, [])}
        found += [f"missing {what} {_describe(key, x)}" for x in sorted(want - have)]
        found += [f"unexpected {what} {_describe(key, x)}" for x in sorted(have - want)]
    return found


def fixed_differences(expected: dict[str, Any] | None, actual: dict[str, Any]) -> list[str]:
    """Those of :func:`differences` in :data:`FIXED_AT_CREATION`: what a restore into the
    existing database ``actual`` describes cannot make equal to the backup's ``expected``
    (None, or a property it did not record: nothing to say). Pure."""
    if not expected:
        return []
    return [_phrase(key, expected, actual) for key in FIXED_AT_CREATION
            if key in expected and expected[key] != actual.get(key)]


def _phrase(key: str, expected: dict[str, Any], actual: dict[str, Any]) -> str:
    return f"{key.replace('_', ' ')} {actual.get(key)!r}, backup {expected.get(key)!r}"


def _describe(key: str, item: tuple[str, ...]) -> str:
    if key == "acl":
        grantee, grantor, privilege, grantable = item
        return f"{privilege} to {grantee} by {grantor}{' with grant option' if grantable == 'true' else ''}"
    role, setting = item
    return f"{setting}{f' for role {role}' if role else ''}"


@dataclass(frozen=True)
class Unapplied:
    """A backed-up setting or grant that names a role missing on the target server (``role``),
    or a setting the restoring role may not set (``role`` empty, ``reason`` the server's)."""

    what: str
    role: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.what} ({self.reason or f'role {self.role} does not exist on the target server'})"


def split_guc_list(value: str) -> list[str] | None:
    """The elements of a list setting as the server stores it (``"$user", public``,
    ``"app, public"``): comma-separated, spaces around elements ignored, a double-quoted element
    taken whole (commas and spaces included, ``""`` for a quote), an unquoted one verbatim; None
    where the text is not such a list. PostgreSQL's own ``SplitGUCList`` rules, which pg_dump
    applies before quoting each element; splitting on every comma would turn the one schema
    ``"app, public"`` into two. Pure."""
    items: list[str] = []
    i, n = 0, len(value)
    while i < n and value[i].isspace():
        i += 1
    if i == n:
        return items
    while True:
        if value[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                end = value.find('"', i)
                if end < 0:
                    return None
                chars.append(value[i:end])
                if value[end + 1:end + 2] != '"':
                    i = end + 1
                    break
                chars.append('"')
                i = end + 2
            items.append("".join(chars))
        else:
            start = i
            while i < n and value[i] != "," and not value[i].isspace():
                i += 1
            if i == start:
                return None
            items.append(value[start:i])
        while i < n and value[i].isspace():
            i += 1
        if i == n:
            return items
        if value[i] != ",":
            return None
        i += 1
        while i < n and value[i].isspace():
            i += 1


PRELOAD_SETTINGS = frozenset({"session_preload_libraries", "local_preload_libraries"})
"""Settings naming libraries the server loads when a session starts: one it cannot load fails
every connection to the database (or of the role) that sets it."""


def library_path(setting: str, library: str) -> str:
    """``library`` as the server loads it for ``setting``: ``local_preload_libraries``' names
    without a directory are looked up in ``$libdir/plugins``. Pure."""
    return f"$libdir/plugins/{library}" if setting.lower() == "local_preload_libraries" and "/" not in library \
        else library


def preloaded_libraries(wanted: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(whose setting, setting name, library as the server loads it) for each library the
    backed-up database's settings preload. Pure."""
    found = []
    for role, setting in (wanted or {}).get("settings", []):
        name, _, value = setting.partition("=")
        if name.lower() in PRELOAD_SETTINGS:
            found += [(f"the database{f' for role {role}' if role else ''}", name, library_path(name, library))
                      for library in split_guc_list(value) or [value]]
    return found


def refuse_unloadable_libraries(target: ConnInfo, libraries: Sequence[tuple[str, str, str]], whose: str) -> None:
    """Refuse, before a restore creates anything, settings (``libraries``, as
    :func:`preloaded_libraries` lists them) that preload a library the ``target`` server
    cannot load: applied, such a setting fails every connection it applies to (the restored
    database's, the restore's validation first; or a created role's). Each library is loaded
    (``LOAD``) in a session of its own, closed at once; one the restoring role may not load
    is left to the setting's own check (only a superuser may set it)."""
    if not libraries:
        return
    failed = []
    with target.connect() as probe:
        for scope, name, library in libraries:
            try:
                probe.execute(sql.SQL("LOAD {}").format(sql.Literal(library)))
            except psycopg.errors.InsufficientPrivilege:
                continue
            except psycopg.Error as exc:
                failed.append(f"{name} of {scope} names {library!r} ({(exc.diag.message_primary or str(exc)).strip()})")
    if failed:
        raise RefusedError(f"the backup's {whose} preload {'a library' if len(failed) == 1 else 'libraries'} "
                           f"the target server cannot load: {'; '.join(failed)}",
                           "install it on the target server, then restore again: once set, every connection "
                           "it applies to would fail")


def _set_clause(setting: str) -> sql.Composable:
    """``SET name TO value`` that stores ``setting`` (``name=value`` as the catalog holds it)
    again unchanged: a list setting's elements each as one literal, as pg_dump writes them."""
    name, _, value = setting.partition("=")
    items = split_guc_list(value) if name.lower() in LIST_SETTINGS else None
    if items:
        rendered: sql.Composable = sql.SQL(", ").join(sql.Literal(v) for v in items)
    else:
        rendered = sql.Literal(value)
    return sql.SQL("SET {} TO {}").format(sql.Identifier(name), rendered)


def _roles_present(conn: psycopg.Connection[Any], names: Sequence[str]) -> set[str]:
    rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(names),)).fetchall()
    return {r[0] for r in rows} | {"PUBLIC"}


def apply(conn: psycopg.Connection[Any], wanted: dict[str, Any], create: bool) -> list[Unapplied]:
    """Make the current database's properties equal ``wanted``; return what could not be applied.

    Encoding and locale are not changed here (see :func:`create_options`). ``create``: the
    database was just created by this restore, so its connection limit is set too.
    """
    db = sql.Identifier(scalar(conn, "SELECT current_database()"))
    roles = [wanted["owner"], *(a[0] for a in wanted["acl"]), *(a[1] for a in wanted["acl"]),
             *(s[0] for s in wanted["settings"] if s[0])]
    present = _roles_present(conn, roles)
    unapplied: list[Unapplied] = []
    with conn.transaction():
        if wanted["owner"] in present:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, sql.Identifier(wanted["owner"])))
        else:
            unapplied.append(Unapplied("owner of the database", wanted["owner"]))
        if create or wanted.get("connection_limit") is not None:
            conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
                db, sql.Literal(wanted.get("connection_limit", -1))))
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(wanted.get("comment"))))
        if "is_template" in wanted:
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE {}").format(db, sql.Literal(bool(wanted["is_template"]))))
        have = properties(conn)
        for role, setting in sorted({tuple(s) for s in have["settings"]} - {tuple(s) for s in wanted["settings"]}):
            name = sql.Identifier(setting.partition("=")[0])
            if role:
                conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET {}").format(sql.Identifier(role), db, name))
            else:
                conn.execute(sql.SQL("ALTER DATABASE {} RESET {}").format(db, name))
        for role, setting in wanted["settings"]:
            if role and role not in present:
                unapplied.append(Unapplied(f"setting {setting}", role))
                continue
            statement = sql.SQL("ALTER ROLE {} IN DATABASE {} {}").format(sql.Identifier(role), db, _set_clause(setting)) \
                if role else sql.SQL("ALTER DATABASE {} {}").format(db, _set_clause(setting))
            try:
                with conn.transaction():
                    conn.execute(statement)
            except psycopg.errors.InsufficientPrivilege as exc:
                unapplied.append(Unapplied(f"setting {setting}{f' for role {role}' if role else ''}", "",
                                           f"{exc.diag.message_primary or exc}: only a superuser, or a role "
                                           "granted SET on it, may set it"))
        want_acl = {tuple(a) for a in wanted["acl"]}
        have_acl = {tuple(a) for a in have["acl"]}
        for grantee, _grantor, privilege, _grantable in sorted(have_acl - want_acl):
            conn.execute(sql.SQL("REVOKE {} ON DATABASE {} FROM {} CASCADE").format(
                sql.SQL(privilege), db, _grantee(grantee)))
        for grantee, grantor, privilege, grantable in sorted(want_acl - have_acl):
            if grantee not in present or grantor not in present:
                unapplied.append(Unapplied(f"grant of {privilege} on the database",
                                           grantee if grantee not in present else grantor))
                continue
            switch = grantor != wanted["owner"]
            if switch:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(grantor)))
            conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), db, _grantee(grantee),
                sql.SQL(" WITH GRANT OPTION" if grantable == "true" else "")))
            if switch:
                conn.execute("RESET ROLE")
    return unapplied


def _grantee(name: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if name == "PUBLIC" else sql.Identifier(name)


def create_options(wanted: dict[str, Any] | None, encoding: str) -> sql.Composable:
    """The ``CREATE DATABASE`` options that reproduce the backed-up encoding, locale and
    default tablespace (where the database's tables live unless they name another one)."""
    if not wanted:
        return sql.SQL("ENCODING {}").format(sql.Literal(encoding))
    parts: list[sql.Composable] = [sql.SQL("ENCODING {}").format(sql.Literal(wanted["encoding"])),
             sql.SQL("LC_COLLATE {}").format(sql.Literal(wanted["collate"])),
             sql.SQL("LC_CTYPE {}").format(sql.Literal(wanted["ctype"]))]
    if wanted.get("locale_provider") == "i":
        parts += [sql.SQL("LOCALE_PROVIDER icu"), sql.SQL("ICU_LOCALE {}").format(sql.Literal(wanted["icu_locale"]))]
    if wanted.get("tablespace") not in (None, "pg_default"):
        parts.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(wanted["tablespace"])))
    return sql.SQL(" ").join(parts)


def drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    """``DROP DATABASE IF EXISTS name WITH (FORCE)`` on an autocommit connection, clearing
    ``IS_TEMPLATE`` first: PostgreSQL refuses to drop a template, and restoring a template
    database's backup (or recovering a cluster holding one) makes one."""
    if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s AND datistemplate", (name,)).fetchone():
        admin.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(name)))
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
