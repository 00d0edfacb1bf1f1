"""The backup's exported snapshot and the sessions that import it."""

from __future__ import annotations

from support.clusters import DbHandle

from backup_tool.postgres.connection import ConnInfo, Snapshot, snapshot_session


def test_snapshot_sessions_are_repeatable_read_read_only_and_draw_no_warning(seed_db: DbHandle) -> None:
    log = seed_db.server.log_file
    before = log.stat().st_size
    conninfo = ConnInfo(seed_db.dsn)
    snap = Snapshot(conninfo)
    try:
        exporter = snap.conn.execute("SELECT current_setting('transaction_isolation'),"
                                     " current_setting('transaction_read_only')").fetchone()
        with snapshot_session(conninfo, snap.snapshot_id) as conn:
            importer = conn.execute("SELECT current_setting('transaction_isolation'),"
                                    " current_setting('transaction_read_only')").fetchone()
    finally:
        snap.close()
    assert exporter == ("repeatable read", "on")
    assert importer == ("repeatable read", "on")
    with open(log, "rb") as fh:
        fh.seek(before)
        logged = fh.read().decode("utf-8", "replace")
    assert "there is already a transaction in progress" not in logged
