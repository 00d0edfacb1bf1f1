"""A backup of tables and indexes in a non-default tablespace, restored where that tablespace
does not exist: the `CREATE TABLESPACE` is not carried (README, "Not carried, by design"), so
`restore full --create` refuses before it creates anything, in one line naming every missing
tablespace and what to do (exit 1), and leaves no database behind; `restore tables` of a table
in it refuses the same way. Once the tablespace
exists, the same restore puts the table and index back in it and validates.

The tablespace lives on the session cluster only while this test runs (`backup base` refuses
clusters with extra tablespaces)."""

from __future__ import annotations

import json
import uuid

import pytest
from support.cli import Cli
from support.clusters import PgServer
from support.dumps import psql

pytestmark = pytest.mark.slow


def test_restore_into_a_server_without_the_tablespace_refuses_naming_it(cli: Cli, local_repo: str,
                                                                          pg_server: PgServer) -> None:
    suffix = uuid.uuid4().hex[:8]
    source, copy, space = f"ts_src_{suffix}", f"ts_copy_{suffix}", f"fast ssd {suffix}"
    location = pg_server.make_user_dir(f"ts-{suffix}")
    psql(pg_server, "postgres", f"CREATE TABLESPACE \"{space}\" LOCATION '{location}'")
    try:
        pg_server.create_db(source)
        psql(pg_server, source, f"""
            CREATE TABLE hot (id int PRIMARY KEY, v text) TABLESPACE "{space}";
            INSERT INTO hot SELECT g, 'v' || g FROM generate_series(1, 50) g;
            CREATE INDEX hot_v ON hot (v) TABLESPACE "{space}";
            CREATE TABLE cold (id int PRIMARY KEY);""")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        pg_server.drop_db(source)
        psql(pg_server, "postgres", f'DROP TABLESPACE "{space}"')

        refused = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                      "--target-dsn", pg_server.dsn(copy), "--create", "--json")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        error = json.loads(refused.stdout)
        assert f'tablespace "{space}"' in error["error"] and "does not exist" in error["error"]
        assert f'CREATE TABLESPACE "{space}" LOCATION' in (error["hint"] or ""), "the statement names the tablespace"
        assert not psql(pg_server, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{copy}'")
        pg_server.create_db(copy)
        one = cli("restore", "tables", "--repo", local_repo, "--backup", backup["id"], "--tables", "public.hot",
                  "--target-dsn", pg_server.dsn(copy), "--json")
        assert one.returncode == 1 and f'tablespace "{space}"' in json.loads(one.stdout)["error"], one.stdout
        assert not psql(pg_server, copy, "SELECT 1 FROM pg_class WHERE relname = 'hot'")
        pg_server.drop_db(copy)

        psql(pg_server, "postgres", f"CREATE TABLESPACE \"{space}\" LOCATION '{location}'")
        done = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                   "--target-dsn", pg_server.dsn(copy), "--create", "--json")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        placed = psql(pg_server, copy, "SELECT c.relname || ':' || coalesce(t.spcname, '-') FROM pg_class c"
                                       " LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace"
                                       " WHERE c.relname IN ('hot', 'hot_v', 'cold') ORDER BY 1")
        assert placed.splitlines() == ["cold:-", f"hot:{space}", f"hot_v:{space}"]
        assert psql(pg_server, copy, "SELECT count(*) FROM hot").strip() == "50"
    finally:
        pg_server.drop_db(copy)
        pg_server.drop_db(source)
        psql(pg_server, "postgres", f'DROP TABLESPACE IF EXISTS "{space}"')


def test_a_database_whose_default_tablespace_is_another_comes_back_in_it(cli: Cli, local_repo: str,
                                                                         pg_server: PgServer) -> None:
    """``CREATE DATABASE ... TABLESPACE``: its tables name no tablespace, they live in the
    database's default one. --create made the copy in pg_default and validation passed; now
    the copy is made there (refused, naming it, where it is missing), and a restore into a
    database elsewhere names the difference."""
    suffix = uuid.uuid4().hex[:8]
    source, copy, other, space = f"dts_src_{suffix}", f"dts_copy_{suffix}", f"dts_other_{suffix}", f"db space {suffix}"
    location = pg_server.make_user_dir(f"dts-{suffix}")
    psql(pg_server, "postgres", f"CREATE TABLESPACE \"{space}\" LOCATION '{location}'")
    try:
        psql(pg_server, "postgres", f"CREATE DATABASE {source} TABLESPACE \"{space}\"")
        psql(pg_server, source, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 20)")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        done = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                        "--target-dsn", pg_server.dsn(copy), "--create")
        assert done["ok"] is True
        where = "SELECT t.spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = '{}'"
        assert psql(pg_server, "postgres", where.format(copy)).strip() == space
        pg_server.create_db(other)
        elsewhere = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                        "--target-dsn", pg_server.dsn(other), "--json")
        assert elsewhere.returncode == 3
        failed = {c["name"]: c["detail"] for c in json.loads(elsewhere.stdout)["validation"]["checks"] if not c["ok"]}
        assert failed == {"database_properties": f"tablespace 'pg_default', backup '{space}'"}
        pg_server.drop_db(copy)
        pg_server.drop_db(source)
        psql(pg_server, "postgres", f'DROP TABLESPACE "{space}"')
        refused = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                      "--target-dsn", pg_server.dsn(copy), "--create", "--json")
        assert refused.returncode == 1 and f'tablespace "{space}"' in json.loads(refused.stdout)["error"]
        assert not psql(pg_server, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{copy}'")
    finally:
        for db in (copy, other, source):
            pg_server.drop_db(db)
        psql(pg_server, "postgres", f'DROP TABLESPACE IF EXISTS "{space}"')
