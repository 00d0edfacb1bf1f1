"""Identifier quoting, proved with generated hostile names: quotes, dots, commas, spaces
(leading and trailing too), control characters, backslashes, SQL and pattern
metacharacters, unicode.

Fast properties check the name parser of ``restore tables --tables``. The end-to-end
property creates real tables with generated schema, table and column names (and awkward
values) in a fresh database, then proves ``backup full``, ``restore full`` and
``restore tables`` round-trip them exactly, through the CLI.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql

from backup_tool.logical.selection import split_name, split_names

NASTY = ['a"b', "a.b", "with space", " lead", "trail ", "ü名前", "Mixed", "'q'", "semi;colon", "--",
         "$1", "x\\y", '"', ".", ",", "a,b", "*", "?", "[x]", "tab\there", "new\nline", "%s", "DROP TABLE x"]

identifier = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12),
).filter(lambda s: len(s.encode()) <= 63)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@settings(max_examples=300, deadline=None)
@given(schema=identifier, table=identifier)
def test_quoted_names_parse_back_exactly(schema: str, table: str) -> None:
    assert split_name(f"{quote(schema)}.{quote(table)}") == (schema, table)
    assert split_name(quote(table)) == (None, table)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(identifier, identifier), min_size=1, max_size=5))
def test_quoted_name_lists_split_on_commas_outside_quotes(names: list[tuple[str, str]]) -> None:
    text = " , ".join(f"{quote(s)}.{quote(t)}" for s, t in names)
    assert [split_name(n) for n in split_names(text)] == names


def test_unquoted_names_keep_working() -> None:
    assert split_names("public.users, analytics.\"UserJourneys\",coupons") == [
        "public.users", 'analytics."UserJourneys"', "coupons"]
    assert split_name('analytics."daily.stats"') == ("analytics", "daily.stats")


# --------------------------------------------------------------------------- end to end

VALUES = ["plain", "tab\tnew\nline\\back", "ü名前 ☃", "", None, "\\N", "a\r\nb", "'; DROP TABLE x; --"]


def table_rows(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[Any, ...]]:
    return conn.execute(sql.SQL("SELECT * FROM {}.{} ORDER BY 1").format(
        sql.Identifier(schema), sql.Identifier(table))).fetchall()


def column_names(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (f"{quote(schema)}.{quote(table)}",)).fetchall()]


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=identifier.filter(lambda s: not s.startswith("pg_") and s not in ("public", "information_schema")),
       tables=st.lists(identifier, min_size=1, max_size=3, unique=True),
       column=identifier.filter(lambda c: c != "id"))
@example(schema='we"ird.sch ema', tables=['a.b', 'x,y', ' t"q '], column="col\numn ü")
@example(schema="%s", tables=["%(x)s", "a%%b", "*?[x]"], column="%s")
def test_hostile_names_round_trip_through_backup_and_restores(pg_server: Any, cli: Any, tmp_path: Any,
                                                              schema: str, tables: list[str], column: str) -> None:
    tag = uuid.uuid4().hex[:8]
    source, full, partial = (f"ident_{tag}_{x}" for x in ("src", "full", "tables"))
    repo = str(tmp_path / f"repo-{tag}")
    with pg_server.admin_conn() as conn:
        for name in (source, partial):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pg_server.admin_conn(source) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for table in tables:
                name = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
                conn.execute(sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, {} text)").format(
                    name, sql.Identifier(column)))
                conn.execute(sql.SQL("CREATE INDEX ON {} ({})").format(name, sql.Identifier(column)))
                conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
                    name, sql.Identifier(column),
                    sql.SQL(", ").join(sql.SQL("({})").format(sql.Literal(v)) for v in VALUES)))
            expected = {t: table_rows(conn, schema, t) for t in tables}
            expected_columns = {t: column_names(conn, schema, t) for t in tables}

        backup = cli.json("backup", "full", "--repo", repo, "--dsn", pg_server.dsn(source))
        assert {(t["table"]) for t in cli.json("show", "--repo", repo, backup["id"])["tables"]} == {
            f"{schema}.{t}" for t in tables}

        restored = cli.json("restore", "full", "--repo", repo, "--target-dsn", pg_server.dsn(full), "--create")
        assert restored["ok"] is True, restored
        names = ",".join(f"{quote(schema)}.{quote(t)}" for t in tables)
        inspect = 'restored "names".ü'
        beside = cli.json("restore", "tables", "--repo", repo, "--tables", names,
                          "--target-dsn", pg_server.dsn(partial), "--into-schema", inspect)
        assert beside["ok"] is True, beside
        with pg_server.admin_conn(partial) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        in_place = cli.json("restore", "tables", "--repo", repo, "--tables", names,
                            "--target-dsn", pg_server.dsn(partial))
        assert in_place["ok"] is True, in_place
        replaced = cli.json("restore", "tables", "--repo", repo, "--tables", names,
                            "--target-dsn", pg_server.dsn(partial), "--replace")
        assert replaced["ok"] is True, replaced

        with pg_server.admin_conn(full) as a, pg_server.admin_conn(partial) as b:
            for t in tables:
                assert table_rows(a, schema, t) == expected[t]
                assert column_names(a, schema, t) == expected_columns[t]
                assert table_rows(b, inspect, t) == expected[t]
                assert table_rows(b, schema, t) == expected[t]
    finally:
        for name in (source, full, partial):
            pg_server.drop_db(name)
