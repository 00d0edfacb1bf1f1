"""Sessions reused from one task to the next: what a task set is undone before the next one,
by the pool's ``RESET ALL`` or by the task's own last query."""

from __future__ import annotations

from support.clusters import DbHandle

from backup_tool.postgres.connection import ConnInfo, SessionPool


def _work_mem(conn: object) -> str:
    return str(conn.execute("SHOW work_mem").fetchone()[0])  # type: ignore[attr-defined]


def test_a_task_s_settings_are_undone_whether_the_pool_or_the_task_reset_them(empty_db: DbHandle) -> None:
    pool = SessionPool(ConnInfo(empty_db.dsn))
    try:
        with pool.session() as conn:
            default = _work_mem(conn)
            conn.execute("SET work_mem = '7MB'")
        with pool.session() as again:
            assert again is conn and _work_mem(again) == default
            again.execute(f"SET work_mem = '9MB'; {pool.RESET_ALL}")
            pool.was_reset(again)
        with pool.session() as third:
            assert third is conn and _work_mem(third) == default
            third.execute("SET work_mem = '5MB'")  # the mark of the previous task does not carry over
        with pool.session() as fourth:
            assert _work_mem(fourth) == default
    finally:
        pool.close()
