"""The unfinished-restore marker: an interrupted ``restore full`` never looks complete.

Before ``restore full`` creates anything in the (checked empty) target database it creates
the schema ``backup_tool_unfinished_restore``, commented ``in-progress:<backup id> ...``;
it drops it only once the schema, every table's data, the sequences and the post-data
objects are all in place. Whatever stops the restore in between (kill -9, Ctrl-C, a crash
of the machine, a failed object) leaves the marker behind, and then:

- ``validate`` (and ``check``) report the failed check ``restore_finished`` (exit 3), and
  ``schema_matches`` fails too, since the marker is an extra schema;
- ``restore full`` refuses the target, naming ``--restart-unfinished``;
- ``restore full --restart-unfinished`` drops every user schema, extension, event trigger
  and publication in the target (it was empty before the interrupted restore began, so all
  of it came from that restore), recreates an empty ``public`` schema with PostgreSQL's
  defaults, and restores again. It drops nothing in a database without the marker.

A schema (rather than, say, a database-level setting) because the owner of a database can
create one without superuser rights, and because anyone listing schemas sees it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from backup_tool.postgres.connection import SYSTEM_SCHEMA_FILTER, UNFINISHED_RESTORE_SCHEMA

MARKER_SCHEMA = UNFINISHED_RESTORE_SCHEMA
RESTART_FLAG = "--restart-unfinished"


def read(conn: psycopg.Connection[Any]) -> str | None:
    """The marker's text (``in-progress:<id> ...``) if the database carries it, else None."""
    row = conn.execute("SELECT coalesce(obj_description(oid, 'pg_namespace'), 'in-progress')"
                       "  FROM pg_namespace WHERE nspname = %s", (MARKER_SCHEMA,)).fetchone()
    return str(row[0]) if row else None


def backup_id_of(marker: str) -> str:
    return marker.split()[0].removeprefix("in-progress:")


def mark(conn: psycopg.Connection[Any], backup_id: str) -> None:
    """Mark the database as holding an unfinished restore of ``backup_id``."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(MARKER_SCHEMA)))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
            sql.Identifier(MARKER_SCHEMA),
            sql.Literal(f"in-progress:{backup_id} since {since}: an unfinished backup-tool restore; "
                        f"finish it with 'backup-tool restore full {RESTART_FLAG}'")))


def clear(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(MARKER_SCHEMA)))


def discard_unfinished(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop what an interrupted restore created; only call on a database carrying the marker.

    Returns the schemas and extensions dropped.
    """
    dropped: list[str] = []
    with conn.transaction():
        for (name,) in conn.execute("SELECT evtname FROM pg_event_trigger").fetchall():
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        for (name,) in conn.execute("SELECT pubname FROM pg_publication").fetchall():
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
        schemas = [r[0] for r in conn.execute(
            f"SELECT n.nspname FROM pg_namespace n WHERE {SYSTEM_SCHEMA_FILTER} ORDER BY 1").fetchall()]
        for name in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
            dropped.append(f"schema {name}")
        for (name,) in conn.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'").fetchall():
            conn.execute(sql.SQL("DROP EXTENSION IF EXISTS {} CASCADE").format(sql.Identifier(name)))
            dropped.append(f"extension {name}")
        conn.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
        conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
        conn.execute("COMMENT ON SCHEMA public IS 'standard public schema'")
    return dropped
