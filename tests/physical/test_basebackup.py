"""`backup base` against real PostgreSQL 15 clusters: what it refuses and why (replication
privilege, pg_hba.conf, archiving), the checkpoint mode it records, and a base backup +
WAL archive in S3 (moto) recovered with `restore pitr --latest` (through pg_basebackup; the
direct method is in test_basedirect.py, test_pitr.py and test_table_pitr_partial.py)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from clioutput import one_line
from server_tool import install_source, write_wrapper
from support.clusters import PgServer, free_port

pytestmark = pytest.mark.slow


def test_missing_replication_privilege_says_what_to_grant(cli: Any, pg_server: PgServer, local_repo: str) -> None:
    with pg_server.admin_conn() as conn:
        conn.execute("DROP ROLE IF EXISTS bt_no_repl")
        conn.execute("CREATE ROLE bt_no_repl LOGIN PASSWORD 'no-repl-pw'")
    try:
        dsn = f"postgresql://bt_no_repl:no-repl-pw@{pg_server.host}:{pg_server.port}/postgres"
        proc = cli("backup", "base", "--repo", local_repo, "--dsn", dsn)
        assert proc.returncode == 1
        line = one_line(proc.stderr)
        assert "REPLICATION" in line and "ALTER ROLE bt_no_repl REPLICATION" in line and "pg_hba.conf" in line
        assert "no-repl-pw" not in proc.stderr

        off = cli("backup", "base", "--repo", local_repo, "--dsn", pg_server.dsn())
        assert off.returncode == 1
        assert "archive_mode" in one_line(off.stderr)
        assert cli.json("list", "--repo", local_repo) == []
    finally:
        with pg_server.admin_conn() as conn:
            conn.execute("DROP ROLE IF EXISTS bt_no_repl")


def wait_archived(server: PgServer) -> None:
    with server.admin_conn() as conn:
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < last:
            assert time.monotonic() < deadline, f"{last} not archived: see {server.log_file}"
            time.sleep(0.1)


def test_base_backup_and_pitr_through_s3(cli: Any, s3_server: Any, s3_repo: str, tmp_path: Path,
                                         pg_cluster_factory: Callable[..., PgServer]) -> None:
    tool_dir = Path("/tmp") / f"backup-tool-s3-test-{free_port()}"
    tool_dir.mkdir(mode=0o755)
    try:
        wrapper = write_wrapper(tool_dir / "bin" / "backup-tool", install_source(tool_dir / "src"), s3_server.env)
        server = pg_cluster_factory(archive_mode="on", archive_command=f"{wrapper} wal push %p --repo {s3_repo}")
        with server.admin_conn() as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g")

        hba = server.data_dir / "pg_hba.conf"
        original = hba.read_text()
        hba.write_text("".join(ln for ln in original.splitlines(keepends=True) if "replication" not in ln))
        server.pg_ctl("reload")
        time.sleep(0.5)
        refused = cli("backup", "base", "--repo", s3_repo, "--dsn", server.dsn(), "--method", "pg_basebackup")
        assert refused.returncode == 1
        line = one_line(refused.stderr)
        assert "replication" in line and re.search(r"pg_hba\.conf line such as 'host replication postgres", line)
        hba.write_text(original)
        server.pg_ctl("reload")
        time.sleep(0.5)

        with server.admin_conn() as conn:
            conn.execute("CHECKPOINT")
        entry = cli.json("backup", "base", "--repo", s3_repo, "--dsn", server.dsn(), "--spread-checkpoint",
                         "--method", "pg_basebackup")
        assert entry["kind"] == "base" and entry["checkpoint"] == "spread" and entry["method"] == "pg_basebackup"
        shown = cli.json("show", entry["id"], "--repo", s3_repo)
        assert [o["key"] for o in shown["objects"]] == [f"backups/{entry['id']}/base.tar.zst",
                                                        f"backups/{entry['id']}/base.index.json.zst"]
        verified = cli.json("verify", entry["id"], "--repo", s3_repo)
        assert verified["ok"] is True

        with server.admin_conn() as conn:
            conn.execute("INSERT INTO t SELECT g, 'after' FROM generate_series(1001, 1500) g")
        wait_archived(server)

        pgdata = server.make_user_dir("restored")
        port = free_port()
        result = cli.json("restore", "pitr", "--repo", s3_repo, "--latest", "--pgdata", pgdata, "--port", str(port),
                          "--no-archive")
        assert result["ok"] is True and result["recovered_to"]["timeline"] == 2
        try:
            import psycopg

            with psycopg.connect(f"postgresql://postgres:{server.password}@127.0.0.1:{port}/postgres") as conn:
                assert conn.execute("SELECT count(*), count(*) FILTER (WHERE v = 'after') FROM t").fetchone() == (
                    1500, 500)
        finally:
            server.run_as_os_user([server.bin_dir / "pg_ctl", "-D", pgdata, "-m", "immediate", "stop"], check=False)
    finally:
        import shutil

        shutil.rmtree(tool_dir, ignore_errors=True)
