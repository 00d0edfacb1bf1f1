"""The fixtures themselves: cluster, auth, seed, dbcompare, moto S3 and the CLI runner."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import dbcompare
import psycopg
import pytest

if TYPE_CHECKING:
    from support.cli import Cli
    from support.clusters import DbHandle, PgServer

FIXTURES = Path(__file__).parent / "fixtures"
SEED_FILES = [FIXTURES / "seed_schema.sql", FIXTURES / "seed_data.sql"]


def test_cluster_is_pg15_on_loopback(pg_server: PgServer) -> None:
    with pg_server.admin_conn() as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('server_version_num', 'listen_addresses', 'port', 'wal_level', 'max_wal_senders', "
                "'unix_socket_directories', 'password_encryption')"
            ).fetchall()
        )
    assert settings["server_version_num"].startswith("15")
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["port"] == str(pg_server.port)
    assert settings["wal_level"] == "replica"
    assert int(settings["max_wal_senders"]) >= 4
    assert settings["unix_socket_directories"] == str(pg_server.socket_dir)
    assert settings["password_encryption"] == "scram-sha-256"
    assert pg_server.dsn("x") == f"postgresql://postgres:{pg_server.password}@127.0.0.1:{pg_server.port}/x"


def test_cluster_runs_as_unprivileged_os_user(pg_server: PgServer) -> None:
    owner = pwd.getpwuid(pg_server.data_dir.stat().st_uid).pw_name
    assert owner == pg_server.os_user
    if os.geteuid() == 0:
        assert pg_server.os_user != "root"
    assert pg_server.run_as_os_user(["id", "-un"]).stdout.strip() == pg_server.os_user


def test_password_auth(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.dsn("postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=pg_server.host, port=pg_server.port, user="postgres", password="wrong", dbname="postgres"
        ).close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=pg_server.host, port=pg_server.port, user="postgres", dbname="postgres", password=""
        ).close()


def test_fresh_db_is_empty_and_unique(fresh_db: Callable[[str], DbHandle]) -> None:
    a, b = fresh_db("t"), fresh_db("t")
    assert a.name != b.name
    rows = a.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"
    )
    assert rows == [(0,)]


def test_seed_loaded(seed_db: DbHandle) -> None:
    hashes = dbcompare.table_hashes(seed_db.dsn)
    for table in (
        "public.user_profiles",
        "public.projects",
        "public.ai_messages",
        "public.payments",
        "public.observability_logs_2025_01",
        "public.observability_logs_default",
        'analytics."UserJourneys"',
        'analytics."feature usage"',
        'analytics."daily.stats"',
    ):
        assert hashes[table]["rows"] > 0, table
    assert "public.observability_logs" not in hashes  # partitioned parent: its rows live in partitions
    q = seed_db.scalar
    assert q("SELECT max(length(content)) FROM ai_messages") > 1_000_000
    assert q("SELECT max(octet_length(content)) FROM project_documents") == 512 * 1024
    assert q("SELECT count(*) FROM user_profiles WHERE strpos(full_name, E'\\n\\\\.\\n') > 0") > 0
    assert q("SELECT count(*) FROM user_profiles WHERE display_name = ''") > 0
    assert q("SELECT count(*) FROM user_profiles WHERE display_name IS NULL") > 0
    assert q("SELECT count(*) FROM user_login_history WHERE family(ip_address) = 6") > 0
    assert q("SELECT count(*) FROM pg_class WHERE relrowsecurity AND relnamespace = 'public'::regnamespace") >= 5
    assert q("SELECT count(*) FROM pg_policies") >= 10
    assert q("SELECT convalidated FROM pg_constraint WHERE conname = 'user_login_history_user_id_fkey'") is False
    assert q("SELECT last_value FROM gamification_logs_id_seq") > q("SELECT max(id) FROM gamification_logs")
    roles = {r[0] for r in seed_db.execute("SELECT rolname FROM pg_roles")}
    assert roles >= {"anon", "authenticated", "service_role"}


def test_seed_is_reloadable_into_second_database(pg_server: PgServer, fresh_db: Callable[[str], DbHandle]) -> None:
    db = fresh_db("reload")
    pg_server.load_sql(db.name, SEED_FILES)
    assert db.execute("SELECT count(*) FROM user_profiles") == [(500,)]


def test_fingerprint_equal_for_template_copy(seed_db: DbHandle, seed_copy: Callable[[str], DbHandle]) -> None:
    copy = seed_copy("seed")
    a, b = dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(copy.dsn)
    dbcompare.assert_same(a, b)
    assert set(dbcompare.SECTIONS) <= set(a)
    assert "\\restrict" not in a["schema"] and "\nCREATE TABLE public.user_profiles" in "\n" + a["schema"]
    assert a["rls"]["public.user_profiles"] == {"enabled": True, "forced": False}
    assert a["sequences"]["public.invoice_number_seq"] == {"last_value": 90000, "is_called": False}
    assert any(k.startswith("public.award_points(") for k in a["functions"])
    assert "uuid-ossp" in a["extensions"] and "pgcrypto" in a["extensions"]


def test_fingerprint_does_not_leak_password(seed_db: DbHandle, capfd: pytest.CaptureFixture[str]) -> None:
    dbcompare.fingerprint(seed_db.dsn)
    out, err = capfd.readouterr()
    assert seed_db.server.password not in out + err


@pytest.mark.parametrize(
    ("mutation", "section", "needle"),
    [
        ("UPDATE payments SET amount = amount + 0.01 WHERE id = 7", "tables", "public.payments"),
        ('DELETE FROM analytics."feature usage" WHERE usage_count = 3', "tables", '"feature usage"'),
        ('DROP POLICY "Users view own payments" ON payments', "policies", "Users view own payments"),
        ("ALTER TABLE projects DISABLE ROW LEVEL SECURITY", "rls", "public.projects"),
        ("SELECT setval('invoice_number_seq', 90000, true)", "sequences", "invoice_number_seq"),
        (
            "ALTER TABLE user_login_history VALIDATE CONSTRAINT user_login_history_user_id_fkey",
            "constraints",
            "user_login_history_user_id_fkey",
        ),
        (
            "CREATE OR REPLACE FUNCTION calculate_level_from_points(p_points integer) RETURNS integer "
            "LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN 2; END; $$",
            "schema",
            "RETURN 2",
        ),
    ],
)
def test_modification_is_detected(
    seed_db: DbHandle, seed_copy: Callable[[str], DbHandle], mutation: str, section: str, needle: str
) -> None:
    copy = seed_copy("mut")
    copy.execute(mutation)
    a, b = dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(copy.dsn)
    with pytest.raises(AssertionError) as excinfo:
        dbcompare.assert_same(a, b, ignore=("schema",) if section != "schema" else ())
    message = str(excinfo.value)
    assert section in message and needle in message, message


def test_table_hashes_subset_and_order_independence(seed_copy: Callable[[str], DbHandle]) -> None:
    copy = seed_copy("order")
    before = dbcompare.table_hashes(copy.dsn, ["public.coupons", 'analytics."daily.stats"'])
    assert set(before) == {"public.coupons", 'analytics."daily.stats"'}
    copy.execute("UPDATE coupons SET used_count = used_count")  # rewrites rows: new physical order
    copy.execute("VACUUM FULL coupons")
    assert dbcompare.table_hashes(copy.dsn, ["public.coupons", 'analytics."daily.stats"']) == before
    with pytest.raises(KeyError):
        dbcompare.table_hashes(copy.dsn, ["public.nope"])


def test_sequences_not_behind(seed_db: DbHandle, seed_copy: Callable[[str], DbHandle]) -> None:
    copy = seed_copy("seq")
    a = dbcompare.fingerprint(seed_db.dsn, include_schema_dump=False)
    copy.execute("SELECT nextval('invoice_number_seq'), nextval('gamification_logs_id_seq')")
    dbcompare.assert_sequences_not_behind(a, dbcompare.fingerprint(copy.dsn, include_schema_dump=False))
    copy.execute("SELECT setval('gamification_logs_id_seq', 5)")
    with pytest.raises(AssertionError, match="gamification_logs_id_seq"):
        dbcompare.assert_sequences_not_behind(a, dbcompare.fingerprint(copy.dsn, include_schema_dump=False))


def test_extra_cluster_with_settings(pg_cluster_factory: Callable[..., PgServer], pg_server: PgServer) -> None:
    other = pg_cluster_factory(archive_mode="on", archive_command="test ! -f '/nonexistent/%f'")
    archive = other.make_user_dir("archive")
    assert archive.stat().st_uid == pwd.getpwnam(other.os_user).pw_uid
    assert other.port != pg_server.port and other.password != pg_server.password
    with other.admin_conn() as conn:
        assert conn.execute("SHOW archive_mode").fetchone() == ("on",)
        assert conn.execute("SHOW archive_command").fetchone() == ("test ! -f '/nonexistent/%f'",)
    other.set_config(work_mem="8MB")
    other.set_config(restart=True, max_wal_senders=6)
    with other.admin_conn() as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        assert conn.execute("SHOW max_wal_senders").fetchone() == ("6",)


def test_s3_endpoint_through_env_only(s3_bucket: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="dir/ü file.bin", Body=b"\x00payload\xff")
    assert client.get_object(Bucket=s3_bucket, Key="dir/ü file.bin")["Body"].read() == b"\x00payload\xff"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["dir/ü file.bin"]


def test_s3_object_lock_bucket(s3_bucket_factory: Callable[..., str]) -> None:
    bucket = s3_bucket_factory(object_lock=True)
    conf = boto3.client("s3").get_object_lock_configuration(Bucket=bucket)
    assert conf["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled"


def test_repo_fixture(repo: str) -> None:
    if repo.startswith("s3://"):
        bucket, _, prefix = repo[len("s3://") :].partition("/")
        assert prefix and boto3.client("s3").list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    else:
        assert Path(repo).is_dir() and not any(Path(repo).iterdir())


def test_cli_runner_isolation(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://leak@nowhere/x")
    monkeypatch.setenv("BACKUP_TOOL_REPO", "/leak")
    monkeypatch.setenv("PGPASSWORD", "leak")
    script = (
        "import json, os, sys; "
        "prefixes = ('BACKUP_TOOL_', 'PG', 'DATABASE_URL', 'HOME'); "
        "print(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read(), 'cwd': os.getcwd(), "
        "'env': {k: v for k, v in os.environ.items() if k.startswith(prefixes)}}))"
    )
    runner = cli.with_command(sys.executable, "-c", script)
    out = runner.json("list", env={"BACKUP_TOOL_REPO": "/mine"})
    assert out["argv"] == ["list", "--json"]
    assert out["stdin"] == ""
    assert out["cwd"] == str(cli.workdir)
    assert out["env"] == {"BACKUP_TOOL_REPO": "/mine", "HOME": str(cli.workdir / "home")}
    failing = cli.with_command(sys.executable, "-c", "import sys; print('oops'); sys.exit(3)")
    proc = failing("x")
    assert (proc.returncode, proc.stdout) == (3, "oops\n")


def test_cli_help_if_package_present(cli: Cli) -> None:
    pytest.importorskip("backup_tool")
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr


def test_pg_dump_restore_round_trip_is_equal(seed_db: DbHandle, fresh_db: Callable[[str], DbHandle]) -> None:
    """dbcompare reports no difference for a correct restore (no false positives)."""
    server = seed_db.server
    target = fresh_db("rt")
    env = {**os.environ, **server.libpq_env()}
    dump = subprocess.run(
        [str(server.bin_dir / "pg_dump"), "-Fc", "-d", seed_db.name], env=env, capture_output=True, check=True
    ).stdout
    subprocess.run(
        [str(server.bin_dir / "pg_restore"), "--exit-on-error", "-d", target.name],
        env=env,
        input=dump,
        capture_output=True,
        check=True,
    )
    dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(target.dsn))


def test_normalize_schema_dump_strips_volatile_lines() -> None:
    raw = "\\restrict AbC123\n--\n-- PostgreSQL database dump\n--\n\nCREATE TABLE t (a int);\n\n\\unrestrict AbC123\n"
    assert dbcompare.normalize_schema_dump(raw) == "CREATE TABLE t (a int);\n"
