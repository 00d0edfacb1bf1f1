"""Database-level properties round-trip: a template database (``IS_TEMPLATE``, which
``pg_dump --create`` carries) restores as a template, validation names the flag when it
differs, and the databases the tool drops (a restore-test's scratch copy) may be templates."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _drop(pg_server: Any, name: str) -> None:
    with pg_server.admin_conn() as conn:
        conn.execute(f"UPDATE pg_database SET datistemplate = false WHERE datname = '{name}'")
    pg_server.drop_db(name)


def test_template_database_restores_as_a_template(cli: Any, local_repo: str, pg_server: Any) -> None:
    source, copy = f"tmpl_{uuid.uuid4().hex[:8]}", f"tmpl_copy_{uuid.uuid4().hex[:8]}"
    with pg_server.admin_conn() as conn:
        conn.execute(f"CREATE DATABASE {source}")
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute("CREATE TABLE base_rows (id int PRIMARY KEY); INSERT INTO base_rows VALUES (1), (2)")
            conn.execute(f"ALTER DATABASE {source} IS_TEMPLATE true")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        restored = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                            "--target-dsn", pg_server.dsn(copy), "--create")
        assert restored["ok"] is True
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s",
                                (copy,)).fetchone() == (True,)
            conn.execute(f"ALTER DATABASE {copy} IS_TEMPLATE false")
        proc = cli("validate", "--repo", local_repo, "--dsn", pg_server.dsn(copy), "--against", backup["id"],
                   "--json")
        failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
        assert proc.returncode == 3 and failed == {"database_properties": "is template False, backup True"}

        drill = cli("verify", backup["id"], "--restore-test", "--repo", local_repo, "--dsn", pg_server.dsn(source),
                    "--json")
        assert drill.returncode == 0, drill.stdout
        with pg_server.admin_conn() as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'backup_tool_verify_%'"
                                ).fetchone()[0] == 0
    finally:
        _drop(pg_server, source)
        _drop(pg_server, copy)
