"""`verify --restore-test`: the drill restores into a scratch database made like the backed-up
one, so its verdict is the restore's, not an artefact of the scratch database."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_restore_test_of_a_database_with_its_own_locale_passes(cli: Any, local_repo: str, pg_server: Any) -> None:
    """pg_regress makes its database with locale C on a C.UTF-8 cluster; the scratch database
    must get C too, or database_properties fails a faithful restore."""
    name = f"locale_c_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        default = conn.execute("SELECT datcollate FROM pg_database WHERE datname = 'template0'").fetchone()[0]
        assert default != "C"
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with pg_server.admin_conn(name) as conn:
            conn.execute("CREATE TABLE words (w text PRIMARY KEY); INSERT INTO words VALUES ('b'), ('B'), ('ä')")
        cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(name))
        proc = cli("verify", "latest", "--restore-test", "--repo", local_repo, "--dsn", pg_server.dsn(name), "--json")
        checks = {c["name"].split()[0]: c for c in proc.json()["checks"]}
        assert checks["restore_test"]["ok"], checks["restore_test"]["detail"]
        assert proc.returncode == 0
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_tool_verify_%'"
                                ).fetchone()[0] == 0
    finally:
        pg_server.drop_db(name)
