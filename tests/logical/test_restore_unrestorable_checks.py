"""A CHECK constraint whose condition reads another table (a lookup through a SQL function,
as real application schemas do although PostgreSQL requires CHECK conditions to depend on the
row alone): a row checked when the other table allowed it stays after that table changes (C
deleted from the codes), so loading the backup's rows fails, in whatever order the tables load. `restore full` stops (exit 1) naming the table and the
constraint, and its hint says why rows that were valid fail and what to do, instead of only
PostgreSQL's "violates check constraint"."""

from __future__ import annotations

import json
import uuid

import pytest
from support.cli import Cli
from support.clusters import PgServer
from support.dumps import psql

pytestmark = pytest.mark.slow


def test_a_check_reading_another_table_fails_the_load_with_a_hint(cli: Cli, local_repo: str,
                                                                  pg_server: PgServer) -> None:
    suffix = uuid.uuid4().hex[:8]
    source, copy = f"chk_src_{suffix}", f"chk_copy_{suffix}"
    pg_server.create_db(source)
    try:
        psql(pg_server, source, """
            CREATE TABLE codes (code text PRIMARY KEY);
            INSERT INTO codes VALUES ('A'), ('B'), ('C');
            CREATE FUNCTION valid_code(text) RETURNS boolean LANGUAGE sql STABLE
              AS 'SELECT EXISTS (SELECT 1 FROM codes WHERE code = $1)';
            CREATE TABLE items (id int PRIMARY KEY, code text CONSTRAINT code_known CHECK (valid_code(code)));
            INSERT INTO items VALUES (1, 'A'), (2, 'B'), (3, 'C');
            DELETE FROM codes WHERE code = 'C';""")
        backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn(source))
        proc = cli("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                   "--target-dsn", pg_server.dsn(copy), "--create", "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = json.loads(proc.stdout)
        assert "public.items" in error["error"] and "code_known" in error["error"]
        assert "another table" in (error["hint"] or "") and "trigger" in error["hint"]
    finally:
        pg_server.drop_db(copy)
        pg_server.drop_db(source)
