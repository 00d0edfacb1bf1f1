"""Whether a session may have the server write its activity counts at once, as a restore's
loading sessions do before each early ANALYZE."""

from __future__ import annotations

import psycopg
import pytest
from support.clusters import DbHandle

from backup_tool.postgres.connection import FORCE_STATS_FLUSH, can_force_stats_flush


def test_a_role_may_force_the_flush_unless_it_lacks_the_execute_privilege(empty_db: DbHandle) -> None:
    with psycopg.connect(empty_db.dsn) as conn:  # one transaction, rolled back: the REVOKE and the role never last
        if conn.info.server_version < 150000:
            assert can_force_stats_flush(conn) is False
            pytest.skip("pg_stat_force_next_flush() exists from PostgreSQL 15 on")
        assert can_force_stats_flush(conn) is True
        conn.execute(FORCE_STATS_FLUSH)
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_force_next_flush() FROM PUBLIC")
        conn.execute("CREATE ROLE bt_no_stats_flush")
        conn.execute("SET ROLE bt_no_stats_flush")
        assert can_force_stats_flush(conn) is False
        conn.rollback()
