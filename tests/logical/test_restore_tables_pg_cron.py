"""restore tables from a database using pg_cron, which installs only in the database
``cron.database_name`` names: the scratch database that reads the tables' definitions
must do without it (Debian's postgresql-15-cron; skipped without it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import Cli
from support.clusters import find_pg_bin_dir

pytestmark = pytest.mark.slow


def _have_pg_cron() -> bool:
    share = find_pg_bin_dir().parent.parent.parent.parent / "share" / "postgresql" / "15" / "extension"
    return (share / "pg_cron.control").exists() or Path("/usr/share/postgresql/15/extension/pg_cron.control").exists()


@pytest.mark.skipif(not _have_pg_cron(), reason="pg_cron not installed (apt-get install postgresql-15-cron)")
def test_into_schema_with_pg_cron(pg_cluster_factory, cli: Cli, tmp_path: Path) -> None:
    server = pg_cluster_factory(shared_preload_libraries="pg_cron", **{"cron.database_name": "app"})
    with server.admin_conn() as conn:
        conn.execute("CREATE DATABASE app")
    with server.admin_conn("app") as conn:
        conn.execute("CREATE EXTENSION pg_cron")
        conn.execute("SELECT cron.schedule('nightly', '0 3 * * *', 'VACUUM')")
        conn.execute("CREATE TABLE events (id int PRIMARY KEY, payload text)")
        conn.execute("INSERT INTO events SELECT g, md5(g::text) FROM generate_series(1, 50) g")
    repo = str(tmp_path / "repo")
    cli.json("backup", "full", "--repo", repo, "--dsn", server.dsn("app"), expect_rc=0)
    cli.json("restore", "tables", "--repo", repo, "--tables", "public.events", "--into-schema", "old",
             "--target-dsn", server.dsn("app"), expect_rc=0)
    with server.admin_conn("app") as conn:
        assert conn.execute("SELECT count(*) FROM old.events").fetchone() == (50,)
        assert conn.execute("SELECT schedule FROM cron.job").fetchall() == [("0 3 * * *",)]
    with server.admin_conn() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_tool_scratch%'").fetchone() == (0,)
