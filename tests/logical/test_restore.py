"""Loading sessions of a full restore: when they let the server add parallel workers."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest

from backup_tool.logical.restore import PARALLEL_WORKER_SETTINGS, allow_parallel_workers, parallel_workers_wanted


@pytest.mark.parametrize(("busy", "jobs", "wanted"), [
    (2, 2, False),
    (1, 2, True),
    (4, 4, False),
    (3, 4, True),
    (1, 1, True),
])
def test_parallel_workers_only_while_a_session_is_idle_or_with_one_job(busy: int, jobs: int, wanted: bool) -> None:
    assert parallel_workers_wanted(busy, jobs) is wanted


def _shown(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in PARALLEL_WORKER_SETTINGS}


def test_parallel_workers_are_turned_off_then_back_to_the_databases_own_settings(
        fresh_db: Callable[..., Any]) -> None:
    db = fresh_db("par")
    with psycopg.connect(db.dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{db.name}" SET max_parallel_workers_per_gather = 3')
        admin.execute(f'ALTER DATABASE "{db.name}" SET max_parallel_maintenance_workers = 1')
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _shown(conn) == {"max_parallel_workers_per_gather": "3", "max_parallel_maintenance_workers": "1"}
        allow_parallel_workers(conn, False)
        assert _shown(conn) == {"max_parallel_workers_per_gather": "0", "max_parallel_maintenance_workers": "0"}
        allow_parallel_workers(conn, True)
        assert _shown(conn) == {"max_parallel_workers_per_gather": "3", "max_parallel_maintenance_workers": "1"}
