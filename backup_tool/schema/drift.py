"""Schema drift: do the migrations still build what production runs?

The migrations are replayed into a scratch database and its catalog is compared, object by
object, with a reference: a backup's schema (its pg_dump archive restored, pre-data and
post-data, into a second scratch database) or a live database. Scratch databases are
created on a server the caller names, from ``template0``, and always dropped again — on
success, on failure and on interrupt.

What is compared, each object keyed by its quoted qualified name:

- extensions (version, schema), schemas, enums (labels in order), domains, sequences
  (type, start, increment, bounds, cache, cycle, owner column)
- tables (kind, persistence, partitioning), columns (type, default, nullability, identity,
  generated expression, collation), constraints (kind and full definition, NOT VALID
  included), indexes (definition)
- RLS flags (enabled, forced) and policies (command, permissive, roles, USING, WITH CHECK)
- functions and procedures (result, language, volatility, security definer, strictness,
  settings, and the sha256 of ``pg_get_functiondef``), triggers (definition, enabled
  state), views and materialized views (definition hash, options)
- grants on schemas, tables, views, sequences, columns and functions, and default
  privileges, per grantee.

Not compared, because they legitimately differ between a replay and production: owners
(grants to an object's own owner are implicit), column order, comments, statistics and
storage parameters, extension members, and the replay's own bookkeeping schema
(``backup_tool_migrations``). Objects inherited by partitions (columns, cloned
constraints, attached indexes, cloned triggers) are reported once, on the parent; when a
whole table is added or missing, its columns, indexes, policies and grants are not listed
again. A drift entry says whether the object was ``added`` (present in the reference, not
made by the migrations — a manual change), is ``missing`` (made by the migrations, absent
from the reference) or ``changed`` (which fields, with both values).
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from backup_tool.config.policy import Policy
from backup_tool.config.settings import Settings
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.errors import BackupToolError, DatabaseError, NotFoundError
from backup_tool.postgres import connection as postgres
from backup_tool.postgres import deparse, roles, schema
from backup_tool.postgres.connection import ConnInfo, scalar
from backup_tool.repository.catalog import Catalog, DatabaseHint
from backup_tool.repository.manifest import Manifest
from backup_tool.repository.storage import Storage, open_repository
from backup_tool.schema import migrations
from backup_tool.streams import pipeline

KINDS = ("extension", "schema", "enum", "domain", "sequence", "table", "column", "constraint", "index",
         "rls", "policy", "function", "trigger", "view", "grant", "default_privileges")
CONTAINERS = ("table", "view", "function", "sequence", "schema")
ALWAYS_EXCLUDED = (migrations.BOOKKEEPING_SCHEMA,)

ObjectKey = tuple[str, str]


@dataclass(frozen=True)
class SchemaObject:
    kind: str
    name: str
    props: dict[str, Any]
    parent: ObjectKey | None = None


Model = dict[ObjectKey, SchemaObject]


@dataclass(frozen=True)
class Drift:
    kind: str
    name: str
    change: str
    fields: tuple[tuple[str, Any, Any], ...]

    def describe(self) -> str:
        if self.change == "changed":
            return "; ".join(f"{f}: {_show(a)} → {_show(b)}" for f, a, b in self.fields)
        return "; ".join(f"{f}={_show(b if a is None else a)}" for f, a, b in self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "change": self.change,
                "fields": [{"field": f, "migrations": a, "reference": b} for f, a, b in self.fields],
                "detail": self.describe()}


@dataclass(frozen=True)
class DriftReport:
    migrations: str
    files: int
    against: str
    compared: dict[str, int]
    drift: tuple[Drift, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.drift

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.drift:
            counts[d.kind] = counts.get(d.kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "migrations": self.migrations, "files": self.files, "against": self.against,
                "compared": self.compared, "differences": len(self.drift), "by_kind": self.by_kind(),
                "drift": [d.to_dict() for d in self.drift], "seconds": round(self.seconds, 3)}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    text = " ".join(str(value).split())
    return text if len(text) <= 100 else text[:97] + "..."


def _sha(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text is not None else None


# --------------------------------------------------------------------------- reading a catalog

_USER = ("n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'"
         " AND n.nspname NOT LIKE 'pg\\_temp\\_%%' AND n.nspname <> ALL(%(excluded)s)")


def _not_member(catalog: str, oid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = '{catalog}'::regclass"
            f" AND dep.objid = {oid} AND dep.deptype = 'e')")


_RELKIND = "CASE {0} WHEN 'v' THEN 'view' WHEN 'm' THEN 'view' WHEN 'S' THEN 'sequence' ELSE 'table' END"
_GRANTEE = "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END"

QUERIES: dict[str, str] = {
    "extension": """
        SELECT quote_ident(e.extname) AS name, e.extversion AS version, quote_ident(n.nspname) AS schema
          FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace""",
    "schema": f"""
        SELECT quote_ident(n.nspname) AS name FROM pg_namespace n
         WHERE {_USER} AND {_not_member('pg_namespace', 'n.oid')}""",
    "enum": f"""
        SELECT format('%%I.%%I', n.nspname, t.typname) AS name,
               ARRAY(SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder)::text[]
                   AS labels
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype = 'e' AND {_USER} AND {_not_member('pg_type', 't.oid')}""",
    "domain": f"""
        SELECT format('%%I.%%I', n.nspname, t.typname) AS name,
               format_type(t.typbasetype, t.typtypmod) AS type, NOT t.typnotnull AS nullable,
               t.typdefault AS default,
               ARRAY(SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c WHERE c.contypid = t.oid
                      ORDER BY 1)::text[] AS checks
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype = 'd' AND {_USER} AND {_not_member('pg_type', 't.oid')}""",
    "sequence": f"""
        SELECT format('%%I.%%I', n.nspname, c.relname) AS name, format_type(s.seqtypid, NULL) AS type,
               s.seqstart AS start, s.seqincrement AS increment, s.seqmin AS min, s.seqmax AS max,
               s.seqcache AS cache, s.seqcycle AS cycle,
               (SELECT format('%%I.%%I.%%I', tn.nspname, t.relname, a.attname)
                  FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
                  JOIN pg_namespace tn ON tn.oid = t.relnamespace
                  JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.refobjsubid > 0
                   AND d.deptype IN ('a', 'i') LIMIT 1) AS owned_by
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "table": f"""
        SELECT format('%%I.%%I', n.nspname, c.relname) AS name,
               CASE c.relkind WHEN 'p' THEN 'partitioned table' WHEN 'f' THEN 'foreign table' ELSE 'table' END
                   AS kind,
               c.relpersistence = 'u' AS unlogged,
               CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
               (SELECT format('%%I.%%I', pn.nspname, pc.relname) FROM pg_inherits i
                  JOIN pg_class pc ON pc.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                 WHERE i.inhrelid = c.oid AND c.relispartition) AS partition_of,
               CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END AS partition_bound
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'f') AND {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "column": f"""
        SELECT format('%%I.%%I.%%I', n.nspname, c.relname, a.attname) AS name,
               format('%%I.%%I', n.nspname, c.relname) AS parent, 'table' AS parent_kind,
               format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable,
               CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END AS default,
               CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' END AS identity,
               CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS generated,
               CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          LEFT JOIN pg_collation co ON co.oid = a.attcollation
         WHERE c.relkind IN ('r', 'p', 'f') AND a.attnum > 0 AND NOT a.attisdropped AND a.attislocal
           AND {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "constraint": f"""
        SELECT format('%%I.%%I.%%I', n.nspname, c.relname, con.conname) AS name,
               format('%%I.%%I', n.nspname, c.relname) AS parent, 'table' AS parent_kind,
               CASE con.contype WHEN 'p' THEN 'primary key' WHEN 'u' THEN 'unique' WHEN 'f' THEN 'foreign key'
                                WHEN 'c' THEN 'check' WHEN 'x' THEN 'exclusion' END AS type,
               pg_get_constraintdef(con.oid) AS definition
          FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE con.contype IN ('p', 'u', 'f', 'c', 'x') AND con.conparentid = 0 AND con.conislocal
           AND {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "index": f"""
        SELECT format('%%I.%%I', n.nspname, ic.relname) AS name,
               format('%%I.%%I', tn.nspname, tc.relname) AS parent, {_RELKIND.format('tc.relkind')} AS parent_kind,
               pg_get_indexdef(i.indexrelid) AS definition
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = ic.relnamespace
          JOIN pg_class tc ON tc.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
         WHERE {_USER} AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
           AND {_not_member('pg_class', 'tc.oid')}""",
    "rls": f"""
        SELECT format('%%I.%%I', n.nspname, c.relname) AS name,
               format('%%I.%%I', n.nspname, c.relname) AS parent, 'table' AS parent_kind,
               c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "policy": f"""
        SELECT format('%%I.%%I.%%I', n.nspname, c.relname, p.polname) AS name,
               format('%%I.%%I', n.nspname, c.relname) AS parent, 'table' AS parent_kind,
               CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                             WHEN 'd' THEN 'DELETE' ELSE 'ALL' END AS command,
               CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END AS mode,
               ARRAY(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END
                       FROM unnest(p.polroles) r ORDER BY 1)::text[] AS roles,
               pg_get_expr(p.polqual, p.polrelid) AS using,
               pg_get_expr(p.polwithcheck, p.polrelid) AS with_check
          FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE {_USER}""",
    "function": f"""
        SELECT format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)) AS name,
               CASE p.prokind WHEN 'f' THEN 'function' WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate'
                              WHEN 'w' THEN 'window' END AS kind,
               pg_get_function_result(p.oid) AS returns, l.lanname AS language,
               CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END AS volatility,
               p.prosecdef AS security_definer, p.proisstrict AS strict, p.proconfig::text[] AS config,
               CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) END AS definition
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          JOIN pg_language l ON l.oid = p.prolang
         WHERE {_USER} AND {_not_member('pg_proc', 'p.oid')}""",
    "trigger": f"""
        SELECT format('%%I.%%I.%%I', n.nspname, c.relname, t.tgname) AS name,
               format('%%I.%%I', n.nspname, c.relname) AS parent, {_RELKIND.format('c.relkind')} AS parent_kind,
               pg_get_triggerdef(t.oid) AS definition,
               CASE t.tgenabled WHEN 'O' THEN 'enabled' WHEN 'D' THEN 'disabled' WHEN 'R' THEN 'replica'
                                WHEN 'A' THEN 'always' END AS enabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND {_USER}""",
    "view": f"""
        SELECT format('%%I.%%I', n.nspname, c.relname) AS name,
               CASE c.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END AS kind,
               pg_get_viewdef(c.oid) AS definition, c.reloptions::text[] AS options
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('v', 'm') AND {_USER} AND {_not_member('pg_class', 'c.oid')}""",
    "grant": f"""
        SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                              ELSE 'TABLE' END || ' ' || format('%%I.%%I', n.nspname, c.relname) AS object,
               format('%%I.%%I', n.nspname, c.relname) AS parent, {_RELKIND.format('c.relkind')} AS parent_kind,
               {_GRANTEE} AS grantee, a.privilege_type AS privilege, a.is_grantable AS grantable
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
               aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char",
                                                        c.relowner))) a
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND a.grantee <> c.relowner
           AND {_USER} AND {_not_member('pg_class', 'c.oid')}
        UNION ALL
        SELECT 'COLUMN ' || format('%%I.%%I.%%I', n.nspname, c.relname, att.attname),
               format('%%I.%%I', n.nspname, c.relname), {_RELKIND.format('c.relkind')},
               {_GRANTEE}, a.privilege_type, a.is_grantable
          FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(att.attacl) a
         WHERE att.attacl IS NOT NULL AND att.attnum > 0 AND NOT att.attisdropped AND a.grantee <> c.relowner
           AND {_USER} AND {_not_member('pg_class', 'c.oid')}
        UNION ALL
        SELECT 'SCHEMA ' || quote_ident(n.nspname), quote_ident(n.nspname), 'schema',
               {_GRANTEE}, a.privilege_type, a.is_grantable
          FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n'::"char", n.nspowner))) a
         WHERE a.grantee <> n.nspowner AND {_USER} AND {_not_member('pg_namespace', 'n.oid')}
        UNION ALL
        SELECT CASE WHEN p.prokind = 'p' THEN 'PROCEDURE ' ELSE 'FUNCTION ' END
                   || format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
               format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)), 'function',
               {_GRANTEE}, a.privilege_type, a.is_grantable
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace,
               aclexplode(coalesce(p.proacl, acldefault('f'::"char", p.proowner))) a
         WHERE a.grantee <> p.proowner AND {_USER} AND {_not_member('pg_proc', 'p.oid')}""",
    "default_privileges": """
        SELECT CASE WHEN d.defaclnamespace = 0 THEN 'ALL SCHEMAS' ELSE 'IN SCHEMA ' || quote_ident(n.nspname) END
                   || ' ON ' || CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES'
                                     WHEN 'f' THEN 'FUNCTIONS' WHEN 'T' THEN 'TYPES' ELSE 'SCHEMAS' END AS object,
               NULL AS parent, NULL AS parent_kind,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,
               a.privilege_type AS privilege, a.is_grantable AS grantable
          FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace,
               aclexplode(d.defaclacl) a
         WHERE a.grantee <> d.defaclrole AND (n.nspname IS NULL OR n.nspname <> ALL(%(excluded)s))""",
}


_DEPARSED = frozenset({"default", "generated", "checks", "definition", "partition_key", "partition_bound",
                       "using", "with_check"})
"""The fields holding deparsed SQL, read :func:`backup_tool.postgres.deparse.comparable`: a schema
restored from a backup shows ``EXTRACT(year FROM x)`` where the migrations wrote ``'YEAR'``."""


def read_model(conn: psycopg.Connection[Any], exclude_schemas: Sequence[str] = ()) -> Model:
    """Every compared object of the connected database, read in one snapshot."""
    excluded = [*ALWAYS_EXCLUDED, *exclude_schemas]
    model: Model = {}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SET LOCAL search_path = pg_catalog")
        cur = conn.cursor(row_factory=dict_row)
        for kind, query in QUERIES.items():
            rows = cur.execute(query, {"excluded": excluded}).fetchall()
            if kind in ("grant", "default_privileges"):
                _add_grants(model, kind, rows)
                continue
            for row in rows:
                name = row.pop("name")
                parent = (row.pop("parent_kind"), row.pop("parent")) if "parent" in row else None
                for f in _DEPARSED & row.keys():
                    row[f] = deparse.comparable(row[f])
                if "definition" in row and kind in ("function", "view"):
                    row["definition_sha256"] = _sha(row.pop("definition"))
                model[(kind, name)] = SchemaObject(kind, name, row, parent)
    return model


def _add_grants(model: Model, kind: str, rows: list[dict[str, Any]]) -> None:
    grouped: dict[tuple[str, str], tuple[ObjectKey | None, list[str]]] = {}
    for row in rows:
        key = (row["object"], row["grantee"])
        parent = (row["parent_kind"], row["parent"]) if row["parent"] else None
        privilege = row["privilege"] + (" WITH GRANT OPTION" if row["grantable"] else "")
        grouped.setdefault(key, (parent, []))[1].append(privilege)
    for (obj, grantee), (parent, privileges) in grouped.items():
        name = f"{obj} TO {grantee}"
        model[(kind, name)] = SchemaObject(kind, name, {"privileges": ", ".join(sorted(privileges))}, parent)


# --------------------------------------------------------------------------- comparing


def compare(expected: Model, actual: Model) -> list[Drift]:
    """Drift of ``actual`` (the reference) from ``expected`` (what the migrations build)."""
    found: list[Drift] = []
    for key in expected.keys() | actual.keys():
        exp, act = expected.get(key), actual.get(key)
        if exp is None:
            assert act is not None
            found.append(Drift(key[0], key[1], "added", tuple((f, None, v) for f, v in act.props.items()
                                                              if v not in (None, False, []))))
        elif act is None:
            found.append(Drift(key[0], key[1], "missing", tuple((f, v, None) for f, v in exp.props.items()
                                                                if v not in (None, False, []))))
        else:
            fields = tuple((f, exp.props.get(f), act.props.get(f)) for f in exp.props
                           if exp.props.get(f) != act.props.get(f))
            if fields:
                found.append(Drift(key[0], key[1], "changed", fields))
    whole = {(d.kind, d.name) for d in found if d.change != "changed" and d.kind in CONTAINERS}

    def covered(d: Drift) -> bool:
        obj = expected.get((d.kind, d.name)) or actual.get((d.kind, d.name))
        return obj is not None and obj.parent is not None and obj.parent in whole

    order = {k: i for i, k in enumerate(KINDS)}
    return sorted((d for d in found if not covered(d)), key=lambda d: (order.get(d.kind, 99), d.name))


# --------------------------------------------------------------------------- scratch databases


@contextmanager
def scratch_database(server: ConnInfo, encoding: str = "UTF8", purpose: str = "scratch") -> Iterator[ConnInfo]:
    """A new empty database on ``server`` (from template0), dropped on exit whatever happens."""
    name = f"backup_tool_{purpose}_{secrets.token_hex(4)}"
    admin = server.with_database("postgres")
    try:
        with admin.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {}").format(
                sql.Identifier(name), sql.Literal(encoding)))
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create a scratch database on {admin.redacted()}: "
                            f"{str(exc).splitlines()[0]}",
                            "connect as a role with CREATEDB, or name another server with --scratch-dsn") from None
    try:
        yield server.with_database(name)
    finally:
        with admin.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def replayed_model(found: migrations.MigrationSet, server: ConnInfo, encoding: str,
                   exclude_schemas: Sequence[str], reporter: Reporter) -> Model:
    """Replay the migrations into a scratch database and read its catalog."""
    with scratch_database(server, encoding, "replay") as scratch:
        try:
            migrations.replay(scratch, found, record=False, reporter=reporter)
        except migrations.MigrationError as exc:
            raise exc.with_hint("fix the file; the scratch database was dropped") from None
        with scratch.connect() as conn:
            return read_model(conn, exclude_schemas)


def backup_model(manifest: Manifest, storage: Storage, server: ConnInfo, with_roles: bool,
                 exclude_schemas: Sequence[str], reporter: Reporter) -> Model:
    """Restore the backup's schema archive into a scratch database and read its catalog."""

    if manifest.schema is None:
        raise NotFoundError(f"backup {manifest.id} ({manifest.kind}) has no schema archive to compare with",
                            "choose a full or incremental backup")
    with server.with_database("postgres").connect() as conn:
        major = postgres.tools_major(conn, manifest.server_version_num // 10000)
        roles.ensure_roles(conn, server.with_database("postgres"), storage, manifest, major, with_roles, reporter)
    with tempfile.TemporaryDirectory(prefix="backup-tool-") as tmp:
        archive = Path(tmp) / "schema.pgdump"
        archive.write_bytes(pipeline.read_object(storage, manifest.schema))
        with scratch_database(server, manifest.encoding, "schema") as scratch:
            schema.replay_into_scratch(archive, scratch, major)
            with scratch.connect() as conn:
                return read_model(conn, exclude_schemas)


def diff(settings: Settings, migrations_dir: str | Path, against: str | None = None,
         scratch_dsn: str | None = None, with_roles: bool = False, exclude_schemas: Sequence[str] = (),
         reporter: Reporter | None = None, database: DatabaseHint | None = None) -> DriftReport:
    """``schema diff``: compare what the migrations build with a backup's schema (``against``)
    or, without ``against``, with the live database ``settings.dsn``.

    Scratch databases go to ``scratch_dsn``'s server, else to the ``settings.dsn`` server.
    """
    reporter = reporter or NullReporter()
    started = time.monotonic()
    found = migrations.discover(migrations_dir)
    server = ConnInfo(scratch_dsn if scratch_dsn else settings.dsn)
    if against is not None:
        storage = open_repository(settings.repo_url)
        hint = database or DatabaseHint(dsn=ConnInfo(settings.dsn).dbname)
        manifest = Catalog(storage).resolve(against, database=hint)
        label = f"backup {manifest.id}"
        reporter.event("reading the backup's schema", id=manifest.id)
        reference = backup_model(manifest, storage, server, with_roles, exclude_schemas, reporter)
        encoding = manifest.encoding
    else:
        live = ConnInfo(settings.dsn)
        label = f"database {live.redacted()}"
        with live.connect() as conn:
            encoding = scalar(conn, "SELECT current_setting('server_encoding')")
            reference = read_model(conn, exclude_schemas)
    reporter.event("replaying migrations into a scratch database", files=len(found.migrations))
    built = replayed_model(found, server, encoding, exclude_schemas, reporter)
    compared: dict[str, int] = {}
    for kind, _ in built.keys() | reference.keys():
        compared[kind] = compared.get(kind, 0) + 1
    differences = compare(built, reference)
    report = DriftReport(str(found.folder), len(found.migrations), label,
                         {k: compared[k] for k in KINDS if k in compared}, tuple(differences),
                         time.monotonic() - started)
    reporter.event("schema compared", against=label, differences=len(differences))
    return report


# --------------------------------------------------------------------------- audit


def policy_migrations(policy: Policy) -> Path | None:
    """The policy's ``[schema] migrations`` folder; relative paths are relative to the policy file."""
    configured = policy.schema.migrations
    if not configured:
        return None
    path = Path(configured).expanduser()
    if not path.is_absolute() and policy.source not in ("", "built-in"):
        path = Path(policy.source).resolve().parent / path
    return path


def summary_for_audit(settings: Settings, reporter: Reporter | None = None) -> dict[str, Any]:
    """The audit report's "schema drift" line: migrations vs the newest backup's schema.

    Never raises: when the check cannot run (no backup, no server for scratch databases,
    a migration fails) the result says so with ``ok: None`` and ``error``.
    """
    folder = policy_migrations(settings.policy)
    if folder is None:
        return {"configured": False, "ok": None,
                "line": "schema drift: not checked (no [schema] migrations in the policy)"}
    result: dict[str, Any] = {"configured": True, "migrations": str(folder), "against": None, "ok": None,
                              "differences": None, "by_kind": {}, "drift": [], "error": None}
    try:
        report = diff(settings, folder, against="latest", reporter=reporter)
    except pipeline.Cancelled:
        raise
    except (BackupToolError, psycopg.Error, OSError) as exc:
        message = exc.message if isinstance(exc, BackupToolError) else str(exc).splitlines()[0]
        return {**result, "error": message, "line": f"schema drift: NOT CHECKED — {message}"}
    result.update(against=report.against, ok=report.ok, differences=len(report.drift), by_kind=report.by_kind(),
                  files=report.files, drift=[d.to_dict() for d in report.drift[:20]])
    if report.ok:
        result["line"] = (f"schema drift: none — the {report.files} migrations in {folder} reproduce "
                          f"the schema of {report.against}")
    else:
        kinds = ", ".join(f"{n} {k}" for k, n in report.by_kind().items())
        result["line"] = (f"schema drift: {len(report.drift)} difference(s) between the migrations in {folder} "
                          f"and {report.against} ({kinds})")
    return result

