"""Materialized views: which are populated, what they hold, and refreshing them in order.

A logical backup does not store a materialized view's rows (PostgreSQL offers no way to
load them other than running the view's query), so the manifest records, per materialized
view, whether it was populated and, if so, its row count and content checksum. A restore
creates every materialized view ``WITH NO DATA`` (pre-data), loads the tables, builds the
indexes, then refreshes the ones that were populated, each only after every materialized
view it reads (directly or through plain views) has been refreshed; unpopulated ones stay
unpopulated. Validation compares populated state, row count and checksum: a view that was
stale in the source (not refreshed since its tables changed) comes back with fresh
content, and the verdict says so rather than hiding it.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import DatabaseError
from backup_tool.postgres import connection as postgres
from backup_tool.streams import pipeline

MATVIEW_CHECKSUM_METHOD = ChecksumMethod.ROW_TEXT
"""Materialized views' checksums live in the inventory, which records no method: they keep the
legacy one, so every manifest's compare (and no backup reads a materialized view twice)."""

_LIST_SQL = f"""
    SELECT n.nspname, c.relname, c.relispopulated,
           ARRAY(SELECT a.attname FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind = 'm' AND {postgres.SYSTEM_SCHEMA_FILTER}
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                         AND d.objid = c.oid AND d.deptype = 'e')
     ORDER BY 1, 2"""

# Edges "view or materialized view -> relation its query reads", from the rewrite rules.
_READS_SQL = """
    SELECT DISTINCT v.oid, v.relkind::text, r.oid, r.relkind::text, vn.nspname, v.relname
      FROM pg_rewrite w
      JOIN pg_class v ON v.oid = w.ev_class
      JOIN pg_namespace vn ON vn.oid = v.relnamespace
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
                      AND d.refclassid = 'pg_class'::regclass
      JOIN pg_class r ON r.oid = d.refobjid
     WHERE v.relkind IN ('v', 'm') AND r.oid <> v.oid"""


@dataclass(frozen=True)
class MatView:
    schema: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.schema}.{self.name}"


def inventory(conn: psycopg.Connection[Any], contents: bool = True) -> list[dict[str, Any]]:
    """Every user materialized view: populated or not, and for populated ones rows + checksum
    (unless ``contents`` is False: then no matview is read, as when only some tables are wanted)."""
    result = []
    for schema, name, populated, columns in conn.execute(_LIST_SQL).fetchall():
        item: dict[str, Any] = {"schema": schema, "name": name, "populated": bool(populated)}
        if populated and contents:
            rows, checksum = postgres.table_checksum(conn, schema, name, columns, MATVIEW_CHECKSUM_METHOD)
            item.update(rows=rows, checksum=checksum)
        result.append(item)
    return result


def refresh_order(conn: psycopg.Connection[Any], wanted: set[tuple[str, str]]) -> list[list[MatView]]:
    """The ``wanted`` materialized views in waves: each wave reads only views of earlier waves.

    Dependencies through plain views are followed, so a materialized view selecting from a
    view over another materialized view waits for it.
    """
    reads: dict[int, set[int]] = {}
    kinds: dict[int, str] = {}
    names: dict[int, tuple[str, str]] = {}
    for view, vkind, rel, rkind, schema, name in conn.execute(_READS_SQL).fetchall():
        reads.setdefault(view, set()).add(rel)
        kinds[view], kinds[rel] = vkind, rkind
        names[view] = (schema, name)
    for schema, name, _, _ in conn.execute(_LIST_SQL).fetchall():
        oid = conn.execute("SELECT %s::regclass::oid", (postgres.quoted_table(schema, name),)).fetchone()
        assert oid is not None
        names[oid[0]] = (schema, name)
        kinds[oid[0]] = "m"

    def matviews_read_by(oid: int) -> set[int]:
        found: set[int] = set()
        seen: set[int] = set()
        stack = list(reads.get(oid, ()))
        while stack:
            rel = stack.pop()
            if rel in seen:
                continue
            seen.add(rel)
            if kinds.get(rel) == "m":
                found.add(rel)
            elif kinds.get(rel) == "v":
                stack.extend(reads.get(rel, ()))
        return found

    targets = {oid for oid, key in names.items() if kinds.get(oid) == "m" and key in wanted}
    sorter: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter()
    for oid in targets:
        sorter.add(oid, *(matviews_read_by(oid) & targets))
    sorter.prepare()
    waves = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda o: names[o])
        waves.append([MatView(*names[o]) for o in ready])
        sorter.done(*ready)
    return waves


def refresh(conninfo: postgres.ConnInfo, populated: set[tuple[str, str]], jobs: int) -> int:
    """Refresh the materialized views that were populated in the backup, in dependency order,
    on ``jobs`` sessions reused from one view to the next."""
    if not populated:
        return 0
    with conninfo.connect() as conn:
        waves = refresh_order(conn, populated)

    sessions = postgres.SessionPool(conninfo, reset=False)

    def one(view: MatView) -> None:
        try:
            with sessions.session() as conn:
                conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(
                    postgres.qualified(view.schema, view.name)))
        except psycopg.Error as exc:
            raise DatabaseError(f"refreshing materialized view {view.full_name} failed: "
                                f"{str(exc).splitlines()[0]}") from None

    try:
        for wave in waves:
            pipeline.run_parallel(jobs, [(one, v) for v in wave])
    finally:
        sessions.close()
    return sum(len(w) for w in waves)
