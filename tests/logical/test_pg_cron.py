"""A database using pg_cron, which installs only in the database ``cron.database_name`` names:
``restore tables`` reads definitions in a scratch database that must do without it, and
``restore full`` elsewhere on that server is refused up front (Debian's postgresql-15-cron;
skipped without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from support.cli import Cli
from support.clusters import PgServer, find_pg_bin_dir

pytestmark = pytest.mark.slow


def _have_pg_cron() -> bool:
    share = find_pg_bin_dir().parent.parent.parent.parent / "share" / "postgresql" / "15" / "extension"
    return (share / "pg_cron.control").exists() or Path("/usr/share/postgresql/15/extension/pg_cron.control").exists()


NEEDS_PG_CRON = pytest.mark.skipif(not _have_pg_cron(),
                                   reason="pg_cron not installed (apt-get install postgresql-15-cron)")


@pytest.fixture
def cron_server(pg_cluster_factory: Callable[..., PgServer]) -> PgServer:
    """A server whose pg_cron lives in database ``app``, where it is created."""
    server = pg_cluster_factory(shared_preload_libraries="pg_cron", **{"cron.database_name": "app"})
    with server.admin_conn() as conn:
        conn.execute("CREATE DATABASE app")
    with server.admin_conn("app") as conn:
        conn.execute("CREATE EXTENSION pg_cron")
    return server


@NEEDS_PG_CRON
def test_into_schema_with_pg_cron(cron_server: PgServer, cli: Cli, tmp_path: Path) -> None:
    server = cron_server
    with server.admin_conn("app") as conn:
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


@NEEDS_PG_CRON
def test_restore_full_refuses_a_database_pg_cron_will_not_install_in(cron_server: PgServer, cli: Cli,
                                                                    tmp_path: Path) -> None:
    """Beside the source on its server, pg_cron cannot be created: refused before anything is
    created, naming the extension, and the database --create made is gone again."""
    server = cron_server
    with server.admin_conn("app") as conn:
        conn.execute("CREATE TABLE events (id int PRIMARY KEY)")
    repo = str(tmp_path / "repo")
    cli.json("backup", "full", "--repo", repo, "--dsn", server.dsn("app"), expect_rc=0)
    proc = cli("restore", "full", "--repo", repo, "--target-dsn", server.dsn("app_copy"), "--create")
    assert proc.returncode == 1, proc.stderr
    assert "cannot create extension pg_cron" in proc.stderr and "cron.database_name" in proc.stderr
    with server.admin_conn() as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'app_copy'").fetchone() == (0,)
