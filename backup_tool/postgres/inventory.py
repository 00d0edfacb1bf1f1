"""Catalog inventories of what a schema archive carries besides tables: publications, event
triggers, comments, and privileges (object, column and default ACLs).

Recorded in the manifest at backup time (through :func:`backup_tool.postgres.connection.inventory`) and
read again from the restored database; validation compares the two. Guarantees:

- every object is keyed by a stable identity text (names, or ``pg_identify_object``), never
  by an oid, so a restore into another database or cluster compares equal;
- ACLs are sets: :func:`acl_sql` explodes an ACL (``aclexplode``) into (grantee, grantor,
  privilege, grantable) with roles by name (``PUBLIC`` for the pseudo-role), and
  :func:`normalise_acl` sorts and deduplicates them, so grant order never matters;
- an object ACL equal to its built-in default (``acldefault``) counts as no ACL, since a
  restore legitimately turns an explicit default into NULL;
- objects belonging to an extension (``pg_depend`` deptype ``e``) and objects in system
  schemas are left out: they come from the extension script or the server itself;
- the inventory is read under :data:`READ_WITH` (the settings a backup records it read
  under, which validation reads under again), never under a search_path or
  ``quote_all_identifiers`` a role or database sets: the definitions it records
  (``pg_get_indexdef``, ``pg_get_constraintdef``, policies, triggers) name an object
  without its schema only where the search_path finds it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import psycopg

from backup_tool.postgres.connection import (
    SYSTEM_SCHEMA_FILTER,
    dict_rows,
    foreign_keys,
    indexes,
    locks_released_after,
    settings_within,
)

FIRST_NORMAL_OID = 16384
KEYS = ("publications", "event_triggers", "comments", "object_privileges", "column_privileges",
        "default_privileges")


def acl_sql(acl: str) -> str:
    """A SQL expression: the ACL ``acl`` as a JSON array of [grantee, grantor, privilege, grantable]."""
    return f"""(SELECT coalesce(json_agg(json_build_array(
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                    CASE WHEN a.grantor = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantor) END,
                    a.privilege_type, a.is_grantable)), '[]'::json)
                  FROM aclexplode({acl}) a)"""


def normalise_acl(items: Iterable[Iterable[Any]]) -> list[list[Any]]:
    """The ACL entries as a sorted list without duplicates (lists, so a manifest read back from
    JSON compares equal)."""
    return [list(t) for t in sorted({tuple(i) for i in items})]


def _not_extension_member(classid: str, objid: str) -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = {classid} "
            f"AND dep.objid = {objid} AND dep.deptype = 'e')")


def publications(conn: psycopg.Connection[Any], version: int) -> list[dict[str, Any]]:
    """Publications with their options, tables (column lists, row filters) and schemas."""
    if version >= 150000:
        extra = """' ' || coalesce('(' || (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                                          FROM pg_attribute a WHERE a.attrelid = pr.prrelid
                                           AND a.attnum = ANY(pr.prattrs)) || ')', '*')
                   || coalesce(' WHERE ' || pg_get_expr(pr.prqual, pr.prrelid), '')"""
        schemas = """ARRAY(SELECT n.nspname FROM pg_publication_namespace pn
                             JOIN pg_namespace n ON n.oid = pn.pnnspid
                            WHERE pn.pnpubid = p.oid ORDER BY 1)::text[]"""
    else:
        extra, schemas = "''", "'{}'::text[]"
    return dict_rows(conn, f"""
        SELECT p.pubname AS name, pg_get_userbyid(p.pubowner) AS owner, p.puballtables AS all_tables,
               p.pubinsert AS insert, p.pubupdate AS update, p.pubdelete AS delete,
               p.pubtruncate AS truncate, p.pubviaroot AS via_root,
               ARRAY(SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) || {extra}
                       FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE pr.prpubid = p.oid ORDER BY 1)::text[] AS tables,
               {schemas} AS schemas
          FROM pg_publication p
         WHERE {_not_extension_member("'pg_publication'::regclass", "p.oid")}
         ORDER BY 1""")


def event_triggers(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Event triggers: event, function (schema-qualified with its arguments), tags, state, owner."""
    return dict_rows(conn, f"""
        SELECT e.evtname AS name, e.evtevent AS event,
               quote_ident(n.nspname) || '.' || quote_ident(p.proname)
                   || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS function,
               ARRAY(SELECT t FROM unnest(e.evttags) t ORDER BY 1)::text[] AS tags,
               e.evtenabled::text AS enabled, pg_get_userbyid(e.evtowner) AS owner
          FROM pg_event_trigger e
          JOIN pg_proc p ON p.oid = e.evtfoid JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE {_not_extension_member("'pg_event_trigger'::regclass", "e.oid")}
         ORDER BY 1""")


def comments(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every comment in the database (not on the database itself, a shared object), keyed by
    ``pg_identify_object``'s type and identity. A comment whose object cannot be identified
    (a leftover no dump carries, e.g. on a subscription of another database) is left out."""
    rows = dict_rows(conn, f"""
        SELECT i.type || ' ' || i.identity AS object, d.description AS comment
          FROM pg_description d
         CROSS JOIN LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) i
          LEFT JOIN pg_namespace n ON quote_ident(n.nspname) = i.schema
         WHERE i.identity IS NOT NULL AND (i.schema IS NULL OR ({SYSTEM_SCHEMA_FILTER}))
           AND (d.objoid >= {FIRST_NORMAL_OID} OR d.classoid = 'pg_namespace'::regclass)
           AND NOT (d.classoid = 'pg_namespace'::regclass AND d.objoid IN (
                   SELECT n2.oid FROM pg_namespace n2 WHERE n2.nspname IN ('pg_catalog', 'information_schema')
                       OR n2.nspname LIKE 'pg\\_toast%' OR n2.nspname LIKE 'pg\\_temp\\_%'))
           AND {_not_extension_member("d.classoid", "d.objoid")}
         ORDER BY 1""")
    return rows


def _object_acl_queries() -> list[str]:
    """One SELECT per kind of object with an ACL: identity, its ACL and its default ACL."""
    def select(classid: str, oid: str, acl: str, default: str, source: str, where: str) -> str:
        return f"""
            SELECT i.type || ' ' || i.identity AS object, {acl_sql(acl)} AS acl,
                   {acl_sql(default)} AS default_acl
              FROM {source}
             CROSS JOIN LATERAL pg_identify_object({classid}, {oid}, 0) i
             WHERE {acl} IS NOT NULL AND {where} AND {_not_extension_member(classid, oid)}"""

    return [
        select("'pg_class'::regclass", "c.oid", "c.relacl",
               "acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::\"char\", c.relowner)",
               "pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
               f"c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {SYSTEM_SCHEMA_FILTER}"),
        select("'pg_proc'::regclass", "p.oid", "p.proacl", "acldefault('f', p.proowner)",
               "pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace", SYSTEM_SCHEMA_FILTER),
        select("'pg_namespace'::regclass", "n.oid", "n.nspacl", "acldefault('n', n.nspowner)",
               "pg_namespace n", SYSTEM_SCHEMA_FILTER),
        select("'pg_type'::regclass", "t.oid", "t.typacl", "acldefault('T', t.typowner)",
               "pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace", SYSTEM_SCHEMA_FILTER),
        select("'pg_language'::regclass", "l.oid", "l.lanacl", "acldefault('l', l.lanowner)",
               "pg_language l", f"l.oid >= {FIRST_NORMAL_OID}"),
        select("'pg_foreign_data_wrapper'::regclass", "w.oid", "w.fdwacl", "acldefault('F', w.fdwowner)",
               "pg_foreign_data_wrapper w", "true"),
        select("'pg_foreign_server'::regclass", "s.oid", "s.srvacl", "acldefault('S', s.srvowner)",
               "pg_foreign_server s", "true"),
    ]


def object_privileges(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Objects whose ACL differs from the built-in default, with the ACL as a set."""
    result = []
    for query in _object_acl_queries():
        for row in dict_rows(conn, query):
            acl = normalise_acl(row["acl"])
            if acl != normalise_acl(row["default_acl"]):
                result.append({"object": row["object"], "acl": acl})
    return sorted(result, key=lambda r: r["object"])


def column_privileges(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Columns with a non-empty column-level ACL (``attacl``), as sets."""
    rows = dict_rows(conn, f"""
        SELECT i.identity AS object, {acl_sql("a.attacl")} AS acl
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL pg_identify_object('pg_class'::regclass, c.oid, a.attnum) i
         WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {SYSTEM_SCHEMA_FILTER}
           AND {_not_extension_member("'pg_class'::regclass", "c.oid")}
         ORDER BY 1""")
    return [{"object": r["object"], "acl": normalise_acl(r["acl"])} for r in rows if r["acl"]]


def default_privileges(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """``ALTER DEFAULT PRIVILEGES`` entries per (role, schema, object type), ACLs as sets."""
    rows = dict_rows(conn, f"""
        SELECT 'for role ' || quote_ident(pg_get_userbyid(d.defaclrole))
                   || coalesce(' in schema ' || quote_ident(n.nspname), '')
                   || ' on ' || CASE d.defaclobjtype WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences'
                                    WHEN 'f' THEN 'functions' WHEN 'T' THEN 'types'
                                    WHEN 'n' THEN 'schemas' ELSE d.defaclobjtype::text END AS object,
               {acl_sql("d.defaclacl")} AS acl
          FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
         WHERE {_not_extension_member("'pg_default_acl'::regclass", "d.oid")}
         ORDER BY 1""")
    return [{"object": r["object"], "acl": normalise_acl(r["acl"])} for r in rows]


def roles_used(inv: dict[str, list[dict[str, Any]]]) -> set[str]:
    """Roles these inventories name (ACL grantees and grantors, owners): a restore needs them."""
    names = {r["owner"] for key in ("publications", "event_triggers") for r in inv.get(key, [])}
    names |= {e[i] for key in ("object_privileges", "column_privileges", "default_privileges")
              for r in inv.get(key, []) for e in r["acl"] for i in (0, 1)}
    return names - {"PUBLIC"}


def _more(conn: psycopg.Connection[Any]) -> dict[str, list[dict[str, Any]]]:
    """The inventories of this module's own queries, under the manifest keys in :data:`KEYS`."""
    row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    version = int(row[0]) if row else 0
    return {
        "publications": publications(conn, version),
        "event_triggers": event_triggers(conn),
        "comments": comments(conn),
        "object_privileges": object_privileges(conn),
        "column_privileges": column_privileges(conn),
        "default_privileges": default_privileges(conn),
    }


READ_WITH = {"search_path": "pg_catalog", "quote_all_identifiers": "off"}
"""The settings :func:`inventory` is read under; a backup records them in its manifest
(``options["inventory_read_with"]``). A search_path set for the role backing up on the
source only made validation report every definition naming an object of that path changed
(found on a trial database); ``pg_catalog`` alone also keeps a schema listed before it from
shadowing the functions and operators the queries call."""


def inventory(conn: psycopg.Connection[Any], read_with: Mapping[str, str] | None = READ_WITH) -> dict[str, Any]:
    """What validation compares: RLS flags, policies, FKs, indexes, functions, triggers, extensions,
    and this module's own (publications, event triggers, comments, privileges), read under
    ``read_with`` (:data:`READ_WITH`; None: the session's settings, as backups that recorded
    none were read)."""
    with settings_within(conn, read_with):
        return _inventory(conn)


def _inventory(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    extra = _more(conn)

    def q(query: str) -> list[dict[str, Any]]:
        return dict_rows(conn, query)

    found: dict[str, Any] = {
        "rls": q(f"""
            SELECT n.nspname AS schema, c.relname AS table, c.relrowsecurity AS enabled,
                   c.relforcerowsecurity AS forced
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMA_FILTER}
               AND (c.relrowsecurity OR c.relforcerowsecurity)
             ORDER BY 1, 2"""),
        "policies": q("""
            SELECT schemaname AS schema, tablename AS table, policyname AS name, permissive,
                   roles::text[] AS roles, cmd, qual, with_check
              FROM pg_policies ORDER BY 1, 2, 3"""),
        "foreign_keys": foreign_keys(conn),
        "indexes": indexes(conn),
        "functions": q(f"""
            SELECT n.nspname AS schema, p.proname AS name,
                   pg_get_function_identity_arguments(p.oid) AS arguments,
                   p.prokind::text AS kind, md5(coalesce(p.prosrc, '')) AS source_md5
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE {SYSTEM_SCHEMA_FILTER}
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                 AND d.objid = p.oid AND d.deptype = 'e')
             ORDER BY 1, 2, 3"""),
        "triggers": q(f"""
            SELECT n.nspname AS schema, c.relname AS table, t.tgname AS name,
                   pg_get_triggerdef(t.oid) AS definition, t.tgenabled::text AS enabled
              FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE NOT t.tgisinternal AND {SYSTEM_SCHEMA_FILTER}
             ORDER BY 1, 2, 3"""),
        "extensions": q("SELECT extname AS name, extversion AS version FROM pg_extension ORDER BY 1"),
        "roles": [r["name"] for r in q(f"""
            SELECT DISTINCT r.rolname AS name FROM pg_roles r WHERE r.oid IN (
                SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
                  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT n.nspowner FROM pg_namespace n WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n
                 WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT (aclexplode(p.proacl)).grantee FROM pg_proc p
                  JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                 WHERE {SYSTEM_SCHEMA_FILTER}
                UNION SELECT unnest(polroles) FROM pg_policy
                UNION SELECT lomowner FROM pg_largeobject_metadata
                UNION SELECT (aclexplode(lomacl)).grantee FROM pg_largeobject_metadata
                UNION SELECT datdba FROM pg_database WHERE datname = current_database()
                UNION SELECT (aclexplode(datacl)).grantee FROM pg_database WHERE datname = current_database())
              AND r.oid <> 0 ORDER BY 1""")],
        **extra,
    }
    found["roles"] = sorted(set(found["roles"]) | roles_used(extra) | _owners_elsewhere(conn))
    return found


def _owners_elsewhere(conn: psycopg.Connection[Any]) -> set[str]:
    """Roles that own, or are granted, any other object of this database (collations,
    operators, text search objects, statistics, foreign-data wrappers and servers, user
    mappings, ...), as the shared dependencies record them; pg_restore needs each (an object
    of an extension is the extension's, a temporary table nobody's)."""
    with locks_released_after(conn):
        rows = conn.execute("""
            SELECT DISTINCT r.rolname FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid
             WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND s.refclassid = 'pg_authid'::regclass AND s.deptype IN ('o', 'a', 'r')
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = s.classid AND d.objid = s.objid
                                 AND d.deptype = 'e')
               AND NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE s.classid = 'pg_class'::regclass AND c.oid = s.objid
                                  AND n.nspname ~ '^pg_(toast_)?temp_')""").fetchall()
    return {str(r[0]) for r in rows}
