"""User triggers kept from firing while a restore writes rows, and set back exactly after.

A restore's rows are the backup's: no trigger of the target may rewrite them or write
elsewhere (an audit table) while they load or while a table is emptied first. A superuser's
``session_replication_role = replica`` silences only ordinary (origin) triggers; ``REPLICA``
and ``ALWAYS`` triggers still fire, and a table owner cannot set that role at all. So each
user trigger that fires in some mode is disabled by name, and later enabled again in the
mode it had (origin, replica or always), never all of them as origin triggers.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from backup_tool.postgres.connection import SYSTEM_SCHEMA_FILTER, qualified, quoted_table

Quieted = dict[tuple[str, str], list[tuple[str, str]]]
"""(schema, table) -> [(trigger, state)] as :func:`quiet_triggers` found them."""


_ENABLE = {"O": "ENABLE TRIGGER {}", "R": "ENABLE REPLICA TRIGGER {}", "A": "ENABLE ALWAYS TRIGGER {}"}


def quiet_triggers(conn: psycopg.Connection[Any], schema_name: str, name: str) -> list[tuple[str, str]]:
    """Disable, by name, every user trigger of the table that fires in some mode (origin,
    replica or always), so emptying and loading it fire none of them: the rows loaded are
    the backup's and nothing else is written (an audit trigger would write elsewhere). A
    superuser's ``session_replication_role = replica`` alone leaves ``REPLICA`` and
    ``ALWAYS`` triggers firing. Returns (trigger, state) for :func:`wake_triggers`, which
    sets each state back exactly, in the same transaction: no other session sees them off."""
    rows = conn.execute(
        "SELECT tgname, tgenabled::text FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
        " AND tgenabled <> 'D' ORDER BY tgname", (quoted_table(schema_name, name),)).fetchall()
    target = qualified(schema_name, name)
    for trigger, _ in rows:
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(target, sql.Identifier(trigger)))
    return [(str(trigger), str(state)) for trigger, state in rows]


def wake_triggers(conn: psycopg.Connection[Any], quieted: Quieted) -> None:
    """Set back the states :func:`quiet_triggers` found, once every table is loaded (inside a
    transaction: the caller's, where the rows were loaded, or one of its own). Deferred
    constraint checks still pending are made first (as the commit would make them, on the
    same rows): ALTER TABLE refuses a table with pending trigger events."""
    if not any(quieted.values()):
        return
    conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    for key, states in quieted.items():
        for trigger, state in states:
            conn.execute(sql.SQL("ALTER TABLE {} " + _ENABLE[state]).format(qualified(*key), sql.Identifier(trigger)))


def quiet_firing_triggers(conn: psycopg.Connection[Any], states: tuple[str, ...] = ("R", "A")) -> Quieted:
    """:func:`quiet_triggers` for every user table of the database with a trigger in one of
    ``states`` (default: those that fire under ``session_replication_role = replica``),
    disabling those only; commits, for loads in other sessions."""
    rows = conn.execute(f"""
        SELECT n.nspname, c.relname, t.tgname, t.tgenabled::text FROM pg_trigger t
          JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND {SYSTEM_SCHEMA_FILTER}
         ORDER BY 1, 2, 3""").fetchall()
    rows = [r for r in rows if r[3] in states]
    quieted: Quieted = {}
    with conn.transaction():
        for schema_name, table, trigger, state in rows:
            conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(qualified(schema_name, table),
                                                                            sql.Identifier(trigger)))
            quieted.setdefault((str(schema_name), str(table)), []).append((str(trigger), str(state)))
    return quieted
