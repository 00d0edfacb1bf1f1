"""Reading every sequence's value and owner, as a backup and a validation do."""

from __future__ import annotations

import psycopg
from support.clusters import DbHandle, PgServer, logged_statements

from backup_tool.postgres.connection import SEQUENCES_PER_STATEMENT, sequences

COUNT = SEQUENCES_PER_STATEMENT + 7


def test_sequence_values_are_read_a_statement_per_hundred_each_its_own(
        pg_server: PgServer, empty_db: DbHandle) -> None:
    """Each sequence's value cost a statement of its own (3,000 serial columns: 3,000 round
    trips per backup and per validation); now :data:`SEQUENCES_PER_STATEMENT` to a statement,
    each with its own value, call state, increment and owning column."""
    empty_db.execute("".join(f"CREATE TABLE public.t_{i} (id serial, v int);"
                             + (f"SELECT setval('public.t_{i}_id_seq', {i + 5}, {str(i % 2 == 0).lower()});"
                                if i % 3 else "")
                             for i in range(COUNT))
                     + "CREATE SEQUENCE public.down INCREMENT BY -2")
    empty_db.execute(f"ALTER DATABASE {empty_db.name} SET log_statement = 'all'")
    since = pg_server.log_file.stat().st_size
    with psycopg.connect(empty_db.dsn, autocommit=True) as conn:
        got = {s["name"]: s for s in sequences(conn)}
    read = [e for e in logged_statements(pg_server, empty_db.name, since) if "last_value" in e]
    assert len(read) == -(-(COUNT + 1) // SEQUENCES_PER_STATEMENT), read
    assert len(got) == COUNT + 1
    for i in range(COUNT):
        seq = got[f"t_{i}_id_seq"]
        assert (seq["last_value"], seq["is_called"]) == ((i + 5, i % 2 == 0) if i % 3 else (1, False))
        assert seq["increment"] == 1
        assert seq["owned_by"] == {"schema": "public", "table": f"t_{i}", "column": "id"}
    assert (got["down"]["last_value"], got["down"]["is_called"], got["down"]["increment"],
            got["down"]["owned_by"]) == (-1, False, -2, None)
