"""Extension configuration tables and sequences (``pg_extension_config_dump``): backed up,
restored and validated.

An extension's objects come from its script, so every inventory leaves them out; but an
extension may mark some of its tables as holding the user's configuration (PostGIS's
``spatial_ref_sys``, pg_partman's ``part_config``...), and pg_dump dumps the rows of such a
table that match the extension's filter (``extcondition``: the rows its script does not
insert), and the value of such a sequence. A backup records in the manifest inventory under
``extension_config``, per relation, the extension, schema and name, the filter, and for a
table the matching rows' count and order-independent checksum; for a sequence its value.
The rows themselves are user data: they go into a stored object of the backup
(:data:`ROWS_OBJECT`, encrypted like the tables; manifests are not), which :func:`rows_document`
writes and :func:`restore` reads. A restore copies the rows in (and sets the sequences) before
the tables are loaded, on top of what ``CREATE EXTENSION`` inserted: an extension's types may
read its configuration to take a value in (pointcloud's ``pcpatch`` input looks its format up in
``pointcloud_formats``), and in an order where a table comes after the configuration tables
its foreign keys reference, as pg_dump orders them (pgagent's ``pga_job`` references
``pga_jobclass``; the inventory lists them by name). Validation compares count, checksum and
value per relation.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import psycopg
from psycopg import sql

from backup_tool.errors import DatabaseError
from backup_tool.postgres.connection import hash_sum_sql

_CONFIG_RELATIONS = """
    SELECT e.extname, n.nspname, c.relname, c.relkind,
           coalesce(e.extcondition[array_position(e.extconfig, c.oid)], '') AS condition
      FROM pg_extension e
      CROSS JOIN LATERAL unnest(e.extconfig) AS cfg(oid)
      JOIN pg_class c ON c.oid = cfg.oid
      JOIN pg_namespace n ON n.oid = c.relnamespace
     ORDER BY 1, 2, 3"""


_REFERENCES = """
    SELECT n.nspname, c.relname, fn.nspname, f.relname
      FROM pg_constraint k
      JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_class f ON f.oid = k.confrelid JOIN pg_namespace fn ON fn.oid = f.relnamespace
     WHERE k.contype = 'f' AND k.conrelid <> k.confrelid"""


def load_order(items: list[dict[str, Any]],
               references: list[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """``items`` with each after the items its foreign keys reference (``references``: rows of
    referencing schema and table, referenced schema and table), otherwise in their order; items
    in a cycle keep their order. Pure."""
    keys = [(i["schema"], i["name"]) for i in items]
    needs = {k: {(rs, rn) for s, n, rs, rn in references if (s, n) == k and (rs, rn) in keys and (rs, rn) != k}
             for k in keys}
    out: list[dict[str, Any]] = []
    placed: set[tuple[str, str]] = set()
    pending = list(zip(keys, items, strict=True))
    while pending:
        ready = [(k, i) for k, i in pending if needs[k] <= placed]
        for k, i in ready or pending[:1]:
            out.append(i)
            placed.add(k)
        pending = [(k, i) for k, i in pending if k not in placed]
    return out


ONLY = "only"
"""``scope`` of a table item read without its inheritance children, as pg_dump dumps it: pgq's
``event_template`` is a configuration table whose children (``pgq.event_1_0``...) are the
user's tables, backed up as such. Items written before this was recorded carry no ``scope``:
their rows and summary included the children's rows, and are read back the same way."""


def _rows_query(schema: str, name: str, condition: str, select: sql.Composable, only: bool) -> sql.Composed:
    return sql.SQL("SELECT {} FROM {}{} AS t {}").format(select, sql.SQL("ONLY " if only else ""),
                                                       sql.Identifier(schema, name), sql.SQL(condition))


_SUMMARY = sql.SQL("count(*), " + hash_sum_sql("hashtextextended(t::text, 0)"))


def _summary(conn: psycopg.Connection[Any], schema: str, name: str, kind: str, condition: str,
             only: bool) -> dict[str, Any]:
    if kind == "S":
        row = conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(
            sql.Identifier(schema, name))).fetchone()
        assert row is not None
        return {"last_value": int(row[0]), "is_called": bool(row[1])}
    row = conn.execute(_rows_query(schema, name, condition, _SUMMARY, only)).fetchone()
    assert row is not None
    return {"rows": int(row[0]), "checksum": f"{int(row[1]):016x}", **({"scope": ONLY} if only else {})}


def _only(item: dict[str, Any]) -> bool:
    return item.get("scope") == ONLY


ROWS_OBJECT = "extension_config.json.zst"
"""Name (within the backup's prefix) of the object holding the configuration tables' rows."""


def inventory(conn: psycopg.Connection[Any], like: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every extension configuration relation with what pg_dump would dump of it, summarised
    (see the module docstring). ``like``: a backup's items to compare with; a table it recorded
    without a ``scope`` is read as it was, children included."""
    with_children = {(i["schema"], i["name"]) for i in like or [] if i["kind"] == "table" and not _only(i)}
    out = []
    for ext, schema, name, kind, condition in conn.execute(_CONFIG_RELATIONS).fetchall():
        out.append({"extension": ext, "schema": schema, "name": name,
                    "kind": "sequence" if kind == "S" else "table", "condition": condition,
                    **_summary(conn, schema, name, kind, condition, (schema, name) not in with_children)})
    return out


def rows_document(conn: psycopg.Connection[Any], items: list[dict[str, Any]]) -> bytes | None:
    """The rows of the configuration tables in ``items`` that hold any, as one JSON document
    (COPY text, base64, in the session's client encoding, named in it); None when none has rows."""
    tables = []
    for item in items:
        if item["kind"] != "table" or not item["rows"]:
            continue
        data = bytearray()
        query = sql.SQL("COPY ({}) TO STDOUT").format(
            _rows_query(item["schema"], item["name"], item["condition"], sql.SQL("*"), _only(item)))
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                data += chunk
        tables.append({"schema": item["schema"], "name": item["name"],
                       "copy": base64.b64encode(bytes(data)).decode("ascii")})
    if not tables:
        return None
    row = conn.execute("SHOW client_encoding").fetchone()
    assert row is not None
    return json.dumps({"encoding": str(row[0]), "tables": tables}).encode()


def restore(conn: psycopg.Connection[Any], items: list[dict[str, Any]], document: bytes | None) -> int:
    """Copy the rows of ``document`` (see :func:`rows_document`) into the configuration tables
    and set the configuration sequences of ``items``, in one transaction; returns how many
    relations were written. A relation the target's extension lacks fails the restore naming it."""
    rows: dict[str, Any] = json.loads(document) if document else {"encoding": "UTF8", "tables": []}
    by_name = {(t["schema"], t["name"]): t["copy"] for t in rows["tables"]}
    written = 0
    with conn.transaction():
        references = [(str(a), str(b), str(c), str(d)) for a, b, c, d in conn.execute(_REFERENCES).fetchall()]
        for item in load_order(items, references):
            target = sql.Identifier(item["schema"], item["name"])
            where = f"{item['extension']} configuration {item['kind']} {item['schema']}.{item['name']}"
            try:
                if item["kind"] == "sequence":
                    conn.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)",
                                 (target.as_string(conn), item["last_value"], item["is_called"]))
                    written += 1
                elif (item["schema"], item["name"]) in by_name:
                    conn.execute(sql.SQL("SET LOCAL client_encoding = {}").format(sql.Literal(rows["encoding"])))
                    with conn.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(target)) as copy:
                        copy.write(base64.b64decode(by_name[(item["schema"], item["name"])]))
                    written += 1
            except psycopg.Error as exc:
                raise DatabaseError(f"restoring the rows of {where} failed: {str(exc).splitlines()[0]}") from None
    return written
