"""The backup's roles: read from its globals script, created where missing, never altered.

Contract of ``restore --with-roles`` (:func:`ensure`):

- Roles of the backup that the target server lacks are created with exactly the backup's
  attributes, comment, security labels and role-wide ``ALTER ROLE ... SET`` settings.
  Per-database settings (``ALTER ROLE ... IN DATABASE``) are not handled here.
- Memberships are granted only where the member or the granted role was created by this
  restore (and both exist).
- A role that already exists is never altered. Where it differs from the backup
  (attributes, comment, role-wide settings, memberships it holds) one warning per role says so.
- All of it happens in one transaction on the target server (role DDL is transactional): a
  role the backup's schema needs that cannot be created rolls everything back and the
  restore is refused. A role the schema does not need that cannot be created (e.g. a
  SUPERUSER role when restoring as a CREATEROLE role) is skipped with a warning.

Where role definitions come from: the manifest's ``globals`` object, the output of
``pg_dumpall --globals-only --no-role-passwords --no-tablespaces``, for every backup old and
new. pg_dumpall writes one very regular statement per fact (``CREATE ROLE``,
``ALTER ROLE ... WITH``, ``COMMENT ON ROLE``, ``ALTER ROLE ... SET``, ``GRANT ... TO ...``),
so it is split into statements (quote-aware: comments and setting values may hold ``;`` and
line breaks) and classified per role. Reading the script rather than recording roles in the
manifest means old backups need no fallback path, and the live side of every comparison is
read the same way (pg_dumpall on the target), so both sides are rendered by the same
formatter and compare textually; only ``VALID UNTIL`` is normalised (its text follows the
session time zone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import psycopg

from backup_tool.core.report import Reporter
from backup_tool.errors import RefusedError
from backup_tool.postgres import database_level, schema
from backup_tool.postgres.connection import ConnInfo, missing_roles
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.storage import Storage
from backup_tool.streams import pipeline


@dataclass(frozen=True)
class Membership:
    role: str
    member: str
    admin: bool
    statement: str = field(compare=False)

    def describe(self) -> str:
        return f"{self.member} in {self.role}" + (" with admin option" if self.admin else "")


@dataclass(frozen=True)
class Role:
    name: str
    attributes: tuple[str, ...]
    settings: tuple[tuple[str, str], ...]
    comment: str | None
    statements: tuple[str, ...] = field(compare=False)


@dataclass(frozen=True)
class RoleSet:
    """Roles and memberships as a pg_dumpall globals script states them."""

    roles: dict[str, Role]
    memberships: frozenset[Membership]

    def memberships_of(self, name: str, as_granted: bool = False) -> frozenset[Membership]:
        return frozenset(m for m in self.memberships if m.member == name or (as_granted and m.role == name))


@dataclass(frozen=True)
class RoleDifference:
    role: str
    details: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.role}: " + "; ".join(self.details)


@dataclass(frozen=True)
class RolePlan:
    create: tuple[Role, ...]
    grants: tuple[Membership, ...]
    differences: tuple[RoleDifference, ...]


# --------------------------------------------------------------------------- parsing

_TOKEN = re.compile(r"""
    (?P<ident>"(?:[^"]|"")*")
  | (?P<estring>[Ee]'(?:[^'\\]|\\.|'')*')
  | (?P<string>'(?:[^']|'')*')
  | (?P<word>[A-Za-z0-9_$.:+-]+)
  | (?P<punct>[,=()])
  | (?P<space>\s+)
""", re.VERBOSE | re.DOTALL)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str

    @property
    def name(self) -> str:
        """The identifier or keyword as PostgreSQL reads it."""
        if self.kind == "ident":
            return self.text[1:-1].replace('""', '"')
        return self.text.lower()

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "word" else ""


def _quoted_end(script: str, i: int, backslashes: bool) -> int:
    """Index just past the quoted text opening at ``i`` (doubled quotes, and with
    ``backslashes`` backslash escapes, stay inside)."""
    quote, j, n = script[i], i + 1, len(script)
    while j < n:
        ch = script[j]
        if backslashes and ch == "\\":
            j += 2
        elif ch == quote and script.startswith(quote * 2, j):
            j += 2
        elif ch == quote:
            return j + 1
        else:
            j += 1
    raise ValueError("unterminated quoted text in the roles script")


def split_statements(script: str) -> list[str]:
    """The SQL statements of a psql script: comments and psql meta-commands dropped."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if script.startswith("--", i) or (ch == "\\" and not buf):
            i = script.find("\n", i)
            i = n if i < 0 else i
        elif ch in "'\"":
            escaped = (ch == "'" and bool(buf) and buf[-1] in ("E", "e")
                       and (len(buf) < 2 or not re.match(r"\w", buf[-2])))
            end = _quoted_end(script, i, escaped)
            buf.append(script[i:end])
            i = end
        elif ch == ";":
            if buf:
                out.append("".join(buf).strip())
            buf = []
            i += 1
        else:
            if buf or not ch.isspace():
                buf.append(ch)
            i += 1
    if buf:
        out.append("".join(buf).strip())
    return out


def _tokens(statement: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(statement):
        m = _TOKEN.match(statement, pos)
        if m is None:
            raise ValueError(f"unexpected text in the roles script: {statement[pos:pos + 40]!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            toks.append(_Tok("string" if kind == "estring" else kind, m.group()))
        pos = m.end()
    return toks


def _valid_until(literal: str) -> str:
    """A VALID UNTIL literal as an instant in UTC (pg_dumpall writes it in the session zone)."""
    text = literal[1:-1].replace("''", "'")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return text
    if stamp.tzinfo is None:
        return text
    return stamp.astimezone(timezone.utc).isoformat()


def _attributes(toks: Sequence[_Tok]) -> tuple[str, ...]:
    attrs: list[str] = []
    i = 0
    while i < len(toks):
        word = toks[i].upper
        if word == "CONNECTION" and i + 2 < len(toks):
            attrs.append(f"CONNECTION LIMIT {toks[i + 2].text}")
            i += 3
        elif word == "VALID" and i + 2 < len(toks):
            attrs.append(f"VALID UNTIL {_valid_until(toks[i + 2].text)}")
            i += 3
        elif word in ("PASSWORD", "ENCRYPTED"):
            i += 2 if word == "PASSWORD" else 1
        else:
            attrs.append(toks[i].text.upper())
            i += 1
    return tuple(sorted(attrs))


@dataclass
class _Draft:
    name: str
    attributes: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)
    comment: str | None = None
    statements: list[str] = field(default_factory=list)

    def freeze(self) -> Role:
        return Role(self.name, self.attributes, tuple(sorted(self.settings.items())), self.comment,
                    tuple(self.statements))


def parse_globals(script: str) -> RoleSet:
    """Roles and memberships of a ``pg_dumpall --globals-only`` script.

    Statements about anything else (session SETs, per-database role settings) are ignored.
    """
    drafts: dict[str, _Draft] = {}
    memberships: set[Membership] = set()

    def draft(name: str) -> _Draft:
        return drafts.setdefault(name, _Draft(name))

    for stmt in split_statements(script):
        toks = _tokens(stmt)
        words = [t.upper for t in toks]
        if words[:2] == ["CREATE", "ROLE"] and len(toks) >= 3:
            d = draft(toks[2].name)
            d.statements.insert(0, stmt)
        elif words[:2] == ["ALTER", "ROLE"] and len(toks) >= 4:
            d = draft(toks[2].name)
            if words[3] == "WITH":
                d.attributes = _attributes(toks[4:])
                d.statements.append(stmt)
            elif words[3] == "SET" and len(toks) >= 6:
                value = " ".join(t.text for t in toks[6:]) if words[5] == "TO" or toks[5].text == "=" else ""
                d.settings[toks[4].name] = value
                d.statements.append(stmt)
        elif words[:3] == ["COMMENT", "ON", "ROLE"] and len(toks) >= 6:
            d = draft(toks[3].name)
            d.comment = toks[5].text if toks[5].kind == "string" else None
            d.statements.append(stmt)
        elif words[:2] == ["SECURITY", "LABEL"] and "ROLE" in words:
            d = draft(toks[words.index("ROLE") + 1].name)
            d.statements.append(stmt)
        elif words[:1] == ["GRANT"] and "TO" in words and "ON" not in words:
            to = words.index("TO")
            granted = [t.name for t in toks[1:to] if t.kind != "punct"]
            member = toks[to + 1].name
            admin = "ADMIN" in words[to + 2:]
            for role in granted:
                memberships.add(Membership(role, member, admin, stmt))
    return RoleSet({name: d.freeze() for name, d in drafts.items()}, frozenset(memberships))


# --------------------------------------------------------------------------- decisions

def compare_role(backup: RoleSet, live: RoleSet, name: str, as_granted: bool = False) -> RoleDifference | None:
    """How ``name`` on the server differs from the backup (None: it does not).

    Memberships are those ``name`` holds (``as_granted``: and those in it); a backed-up one
    whose other role is absent from the server cannot exist there and is not counted.
    """
    want, have = backup.roles[name], live.roles[name]
    details: list[str] = []
    if want.attributes != have.attributes:
        here = " ".join(sorted(set(have.attributes) - set(want.attributes))) or "none"
        there = " ".join(sorted(set(want.attributes) - set(have.attributes))) or "none"
        details.append(f"attributes {here} here, {there} in the backup")
    ws, hs = dict(want.settings), dict(have.settings)
    for key in sorted(ws.keys() | hs.keys()):
        if ws.get(key) != hs.get(key):
            details.append(f"setting {key} is {hs.get(key, '(unset)')} here, {ws.get(key, '(unset)')} in the backup")
    if want.comment != have.comment:
        details.append("comment differs")
    both = live.roles.keys()
    wm = frozenset(m for m in backup.memberships_of(name, as_granted) if {m.role, m.member} <= both)
    hm = live.memberships_of(name, as_granted)
    for m in sorted(wm - hm, key=Membership.describe):
        details.append(f"membership {m.describe()} missing here")
    for m in sorted(hm - wm, key=Membership.describe):
        details.append(f"membership {m.describe()} not in the backup")
    return RoleDifference(name, tuple(details)) if details else None


def preloaded_libraries(roles: Iterable[Role]) -> list[tuple[str, str, str]]:
    """(whose setting, setting name, library as the server loads it) for each library the
    ``roles``' own settings preload (``ALTER ROLE app SET session_preload_libraries = ...``). Pure."""
    return [(f"role {role.name}", name, database_level.library_path(name, library))
            for role in roles for name, value in role.settings if name.lower() in database_level.PRELOAD_SETTINGS
            for library in _literals(value)]


def _literals(value: str) -> list[str]:
    """The string constants of a setting's value as pg_dumpall writes it (``'a', 'b'``)."""
    return [t.text[1:-1].replace("''", "'") for t in _tokens(value) if t.kind == "string"]


def plan(backup: RoleSet, live: RoleSet) -> RolePlan:
    """What ``--with-roles`` does: create what is missing, grant its memberships, report the rest."""
    create = tuple(backup.roles[n] for n in sorted(backup.roles.keys() - live.roles.keys()))
    created = {r.name for r in create}
    known = backup.roles.keys() | live.roles.keys()
    grants = tuple(sorted((m for m in backup.memberships
                           if (m.role in created or m.member in created) and {m.role, m.member} <= known),
                          key=Membership.describe))
    differences = tuple(d for n in sorted(backup.roles.keys() & live.roles.keys())
                        if (d := compare_role(backup, live, n)) is not None)
    return RolePlan(create, grants, differences)


@dataclass(frozen=True)
class RolesVerdict:
    ok: bool
    detail: str


def verdict(backup: RoleSet, live: RoleSet, needed: Iterable[str], created: frozenset[str] | None) -> RolesVerdict:
    """The ``roles_created_match`` verdict.

    Fails when a role this restore created (``created``) differs from the backup (attributes,
    settings, comment, memberships on either side), or a role the backup's schema needs is
    missing. Roles that existed before (or, with ``created`` None, any role: the database may
    not have been restored by us) are never altered by a restore, so their differences are
    listed without failing.
    """
    created = created or frozenset()
    missing = sorted(n for n in set(needed) | created if n not in live.roles and n in backup.roles)
    failing = [d for n in sorted(created & live.roles.keys() & backup.roles.keys())
               if (d := compare_role(backup, live, n, as_granted=True)) is not None]
    noted = [d for n in sorted((backup.roles.keys() & live.roles.keys()) - created)
             if (d := compare_role(backup, live, n)) is not None]
    if missing or failing:
        parts = ([f"missing roles: {', '.join(missing)}"] if missing else []) + \
                [f"created role {d.describe()}" for d in failing]
        return RolesVerdict(False, "; ".join(parts))
    present = len(backup.roles.keys() & live.roles.keys())
    detail = f"{len(created)} created roles match the backup, {present} of {len(backup.roles)} backed-up roles present"
    if noted:
        detail += (f"; {len(noted)} pre-existing roles differ and were left unchanged: "
                   + ", ".join(d.role for d in noted[:5]) + (" ..." if len(noted) > 5 else ""))
    return RolesVerdict(True, detail)


# --------------------------------------------------------------------------- I/O

def server_roles(conninfo: ConnInfo, major: int) -> RoleSet:
    """The server's roles, read the way backups read them (so both sides compare textually)."""
    return parse_globals(schema.dump_globals(conninfo, major).decode())


def _execute(conn: psycopg.Connection[Any], statement: str) -> None:
    conn.execute(statement)  # statements parsed from pg_dumpall output, never user input


def _first_line(exc: psycopg.Error) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def apply(conn: psycopg.Connection[Any], the_plan: RolePlan, needed: Iterable[str],
          reporter: Reporter) -> frozenset[str]:
    """Carry out ``the_plan`` in one transaction; return the names of the roles created.

    A needed role that cannot be created rolls everything back (RefusedError); any other
    role or membership that fails is skipped with a warning.
    """
    needed = set(needed)
    for diff in the_plan.differences:
        reporter.warning(f"role {diff.role} already exists and differs from the backup; left unchanged",
                         role=diff.role, differences=list(diff.details))
    created: set[str] = set()
    with conn.transaction():
        for role in the_plan.create:
            try:
                with conn.transaction():
                    for stmt in role.statements:
                        _execute(conn, stmt)
                created.add(role.name)
            except psycopg.Error as exc:
                if role.name in needed:
                    raise RefusedError(f"could not create role {role.name} on the target server: {_first_line(exc)}",
                                       "create it by hand (needs CREATEROLE, or SUPERUSER for its attributes) "
                                       "and rerun") from None
                reporter.warning(f"role {role.name} not created: {_first_line(exc)}", role=role.name)
        granted = 0
        for m in the_plan.grants:
            if not ({m.role, m.member} & created):
                continue
            try:
                with conn.transaction():
                    _execute(conn, m.statement)
                granted += 1
            except psycopg.Error as exc:
                reporter.warning(f"membership {m.describe()} not granted: {_first_line(exc)}",
                                 role=m.role, member=m.member)
    if created:
        reporter.event("roles created", roles=sorted(created), memberships=granted)
    return frozenset(created)


def ensure_roles(conn: psycopg.Connection[Any], conninfo: ConnInfo, storage: Storage,
                 manifest: Manifest, major: int, with_roles: bool, reporter: Reporter) -> frozenset[str]:
    """Refuse if roles the backup needs are missing; with ``with_roles`` create the backup's
    missing roles first (see :mod:`backup_tool.postgres.roles`). Returns the roles created."""
    needed = manifest.inventory.get("roles", [])
    missing = missing_roles(conn, needed)
    if not with_roles or manifest.globals is None:
        if missing:
            raise RefusedError(f"roles missing on the target server: {', '.join(missing)}",
                               "create them, or rerun with --with-roles to create them from the backup")
        return frozenset()
    backup = parse_globals(pipeline.read_object(storage, manifest.globals).decode())
    the_plan = plan(backup, server_roles(conninfo, major))
    database_level.refuse_unloadable_libraries(conninfo, preloaded_libraries(the_plan.create), "role settings")
    created = apply(conn, the_plan, needed, reporter)
    still = missing_roles(conn, missing)
    if still:
        raise RefusedError(f"could not create roles {', '.join(still)} on the target server",
                           "create them by hand (needs CREATEROLE) and rerun")
    return created
