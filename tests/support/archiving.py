"""A throwaway cluster archiving every WAL segment into a local repository with ``wal push``,
for the tests of what reads the archived WAL (incrementals' change detection, schema reuse)."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from server_tool import archive_settings, archiving_workspace

from support.clusters import PgServer, start_pg_server


@dataclass
class Archiving:
    server: PgServer
    repo: Path
    base: Path

    def dsn(self, db: str = "postgres") -> str:
        return self.server.dsn(db)

    def switch_and_wait(self) -> None:
        """Have the archive hold the current segment (``wal push`` records the cluster's
        identity with the first one)."""
        with self.server.admin_conn() as conn:
            last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
            conn.execute("SELECT pg_switch_wal()")
            deadline = time.monotonic() + 60
            while (conn.execute("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").fetchone()[0]
                   < last):
                assert time.monotonic() < deadline, f"{last} not archived, see {self.server.log_file}"
                time.sleep(0.05)


@contextmanager
def archiving_server(prefix: str) -> Iterator[Archiving]:
    """The cluster (autovacuum off: the tests write what they mean to), its archive holding a
    segment; destroyed with its workspace afterwards."""
    base, wrapper, repo = archiving_workspace(prefix)
    server = start_pg_server({**archive_settings(wrapper, repo), "autovacuum": "off"})
    shutil.chown(repo, server.os_user, server.os_user)
    try:
        archiving = Archiving(server, repo, base)
        archiving.switch_and_wait()
        yield archiving
    finally:
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)
