"""Content checksum methods on a real server: the typed-row and typed-column methods, which hash
some columns natively, keep the guarantee of the row-text one. A changed text form is caught for every type
whose own hash equality does not imply text equality (each case first proves the native hash
misses it); values swapped between rows are caught; a COPY text round trip in another order
gives the same checksum; parts sum to the whole."""

from __future__ import annotations

import uuid
from typing import Any, Iterator
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from support.clusters import PgServer

from backup_tool.core.checksum_methods import ChecksumMethod, checksum_method_for
from backup_tool.postgres import connection as postgres
from backup_tool.postgres.connection import NATIVE_HASHES, ColumnType, row_hash_sql

TYPED, TEXT, COLUMN = ChecksumMethod.TYPED_ROW, ChecksumMethod.ROW_TEXT, ChecksumMethod.TYPED_COLUMN
NATIVE_METHODS = [TYPED, COLUMN]

SETUP = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE COLLATION IF NOT EXISTS nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE DOMAIN amount AS numeric;
CREATE TYPE pair AS (n numeric, t text);
"""

EPOCH = "timestamptz '2000-01-01 00:00:00+00'"

# (type, before, after): different text forms whose values the type's own extended hash
# (hash_record_extended over the value, as a native hashing of it would) maps to the same hash.
SAME_HASH_OTHER_TEXT: dict[str, tuple[str, str, str]] = {
    "numeric scale": ("numeric", "1.0", "1.00"),
    "interval units": ("interval", "'1 day'", "'24 hours'"),
    "float8 signed zero": ("float8", "'0'", "'-0'"),
    "float4 signed zero": ("float4", "'0'", "'-0'"),
    "jsonb number scale": ("jsonb", """'{"a": 1.0}'""", """'{"a": 1.00}'"""),
    "array lower bound": ("int4[]", "'{1,2}'", "'[0:1]={1,2}'"),
    "unbounded bpchar blanks": ("bpchar", "'a'", "'a '"),
    "nondeterministic collation": ("text COLLATE nocase", "'A' COLLATE nocase", "'a' COLLATE nocase"),
    "varchar nondeterministic collation": ("varchar(5) COLLATE nocase", "'A' COLLATE nocase",
                                           "'a' COLLATE nocase"),
    "citext case": ("citext", "'A'", "'a'"),
    "numeric range scale": ("numrange", "'[1.0,2)'", "'[1.00,2)'"),
    "domain over numeric": ("amount", "1.0", "1.00"),
    "composite with numeric": ("pair", "ROW(1.0, 'x')", "ROW(1.00, 'x')"),
    "int8 halves folded": ("int8", "1", "4294967296"),
    "timestamptz halves folded": ("timestamptz", EPOCH, f"{EPOCH} + interval '4294.967297 s'"),
    "timestamp halves folded": ("timestamp", "timestamp '2000-01-01'",
                                "timestamp '2000-01-01' + interval '4294.967297 s'"),
}

# Types without an extended hash: hashed natively they could not be checksummed at all.
NO_HASH: dict[str, tuple[str, str, str]] = {
    "json spacing": ("json", """'{"a":1}'""", """'{"a": 1}'"""),
    "point": ("point", "'(1,2)'", "'(1,2.5)'"),
    "xml": ("xml", "'<a/>'", "'<a></a>'"),
}


@pytest.fixture(scope="module")
def db(pg_server: PgServer) -> Iterator[str]:
    handle = pg_server.create_db(f"checksums_{uuid.uuid4().hex[:8]}")
    with handle.connect() as conn:
        conn.execute(SETUP)
    yield handle.dsn
    pg_server.drop_db(handle.name)


def checksum(dsn: str, table: str, method: ChecksumMethod, columns: tuple[str, ...] = ("id", "v")
             ) -> tuple[int, str]:
    with postgres.ConnInfo(dsn).connect() as conn:
        return postgres.table_checksum(conn, "public", table, columns, method)


def run(dsn: str, statement: str | sql.Composable) -> list[tuple[Any, ...]]:
    with postgres.ConnInfo(dsn).connect() as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def changed_text(dsn: str, table: str, type_sql: str, before: str, after: str,
                 method: ChecksumMethod) -> tuple[str, str]:
    """Creates ``table`` with a row holding ``before`` beside an ordinary row, returns both
    checksums by ``method`` around changing it to ``after``, after checking the text forms differ."""
    table = f"{table}_{method.name.lower()}"
    run(dsn, f"CREATE TABLE {table} (id int, v {type_sql});"
             f"INSERT INTO {table} VALUES (1, {before}), (2, NULL)")
    first = checksum(dsn, table, method)
    text_before = run(dsn, f"SELECT ROW(v)::text FROM {table} WHERE id = 1")[0][0]
    run(dsn, f"UPDATE {table} SET v = {after} WHERE id = 1")
    assert run(dsn, f"SELECT ROW(v)::text FROM {table} WHERE id = 1")[0][0] != text_before
    second = checksum(dsn, table, method)
    assert first[0] == second[0] == 2
    return first[1], second[1]


@pytest.mark.parametrize("method", NATIVE_METHODS)
@pytest.mark.parametrize("case", sorted(SAME_HASH_OTHER_TEXT))
def test_a_changed_text_form_is_caught_where_the_types_own_hash_is_blind_to_it(
        db: str, case: str, method: ChecksumMethod) -> None:
    type_sql, before, after = SAME_HASH_OTHER_TEXT[case]
    table = "t_" + case.replace(" ", "_")
    cast = type_sql.split(" COLLATE ")[0]
    blind = run(db, f"SELECT hash_record_extended(ROW(({before})::{cast}), 0)"
                    f" = hash_record_extended(ROW(({after})::{cast}), 0)")
    assert blind == [(True,)], f"{case}: the native hash already tells them apart; the case proves nothing"
    first, second = changed_text(db, table, type_sql, before, after, method)
    assert first != second, f"{case}: a changed text form kept the checksum"


@pytest.mark.parametrize("method", NATIVE_METHODS)
@pytest.mark.parametrize("case", sorted(NO_HASH))
def test_types_without_a_hash_are_checksummed_by_their_text(db: str, case: str, method: ChecksumMethod) -> None:
    type_sql, before, after = NO_HASH[case]
    with pytest.raises(psycopg.errors.UndefinedFunction):
        run(db, f"SELECT hash_record_extended(ROW(({before})::{type_sql}), 0)")
    first, second = changed_text(db, "t_" + case.replace(" ", "_"), type_sql, before, after, method)
    assert first != second


def test_declared_bpchar_length_is_part_of_the_checksum(db: str) -> None:
    """char(n) hashes without its trailing blanks: the declared length, which pads the text
    form, is hashed beside it."""
    run(db, "CREATE TABLE c3 (id int, v char(3)); CREATE TABLE c4 (id int, v char(4));"
            "INSERT INTO c3 VALUES (1, 'ab'); INSERT INTO c4 VALUES (1, 'ab')")
    assert run(db, "SELECT (SELECT v::text FROM c3) = (SELECT v::text FROM c4)") == [(True,)]
    for method in ChecksumMethod:
        assert checksum(db, "c3", method) != checksum(db, "c4", method)


VALUE_OF_G = {"int4": "g", "text": "'s' || g", "uuid": "md5(g::text)::uuid", "bytea": "decode(md5(g::text), 'hex')"}


@pytest.mark.parametrize("method", NATIVE_METHODS)
@pytest.mark.parametrize("types", ["int4, int4", "int4, text", "text, text", "uuid, bytea"])
def test_values_swapped_between_rows_are_caught(db: str, types: str, method: ChecksumMethod) -> None:
    """hash_record_extended adds column hashes linearly; summed over rows it alone would not see
    a column's values permuted between rows. The per-row keyed text hash does."""
    a, b = (t.strip() for t in types.split(","))
    table = "swap_" + types.replace(", ", "_") + "_" + method.name.lower()
    run(db, f"CREATE TABLE {table} (id int, x {a}, y {b});"
            f"INSERT INTO {table} SELECT g, {VALUE_OF_G[a]}, {VALUE_OF_G[b]} FROM generate_series(1, 2) g")
    linear_sum = f"SELECT (sum(hash_record_extended(ROW(x, y), 0)) % 2^64::numeric + 2^64::numeric) % 2^64::numeric FROM {table}"
    linear = run(db, linear_sum)
    before = checksum(db, table, method, ("x", "y"))
    run(db, f"UPDATE {table} SET y = (SELECT y FROM {table} o WHERE o.id <> {table}.id)")
    assert run(db, f"SELECT count(DISTINCT y) FROM {table}") == [(2,)]
    assert run(db, linear_sum) == linear, "summed linearly the swap would go unnoticed"
    assert checksum(db, table, method, ("x", "y")) != before


AWKWARD_ALL_TYPES = """
CREATE TABLE everything (
    b bool, by bytea, i2 int2, i4 int4, o oid, d date, u uuid, t text, vc varchar(12), c char(6),
    i8 int8, ts timestamp, tz timestamptz,
    n numeric, f8 float8, j jsonb, a int4[], iv interval, ci citext, bp bpchar, nc text COLLATE nocase
);
INSERT INTO everything VALUES
 (true, '\\x00ff00', -32768, -2147483648, 4294967295, '4713-01-01 BC', '00000000-0000-0000-0000-000000000000',
  '', '', '', -9223372036854775808, '-infinity', 'infinity', 'NaN', '-0', '{"a": [1.0, null]}', '[0:1]={1,2}',
  '-1 day +24:00', 'Ab', 'x  ', 'Éé'),
 (false, '\\x', 32767, 2147483647, 0, '5874897-12-31', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
  E'tab\\there\\nnew "q" \\\\ ,()', 'é', 'ab', 9223372036854775807, '2000-01-01 00:00:00.000001',
  '1999-12-31 23:59:59.999999+00', 1.000, 1e308, '"s"', '{}', '1 day', 'aB', '', 'éÉ'),
 (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL),
 (true, '\\x5c', 0, 0, 1, '2000-01-01', '11111111-2222-3333-4444-555555555555', 'NULL', '\\N', ' ', 0,
  '2000-01-01', '2000-01-01 00:00+00', 0.1, 'Infinity', 'null', '{NULL}', '0', '', NULL, '');
INSERT INTO everything SELECT * FROM everything;
INSERT INTO everything (i4, t, tz, n) SELECT g, md5(g::text), now() - g * interval '1 s', g / 7.0
  FROM generate_series(1, 300) g;
"""


def columns_of(dsn: str, table: str) -> tuple[str, ...]:
    return tuple(r[0] for r in run(dsn, f"SELECT attname FROM pg_attribute WHERE attrelid = '{table}'::regclass"
                                        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"))


def test_a_copy_round_trip_in_another_order_keeps_both_checksums_and_any_one_changed_value_is_caught(
        db: str) -> None:
    run(db, AWKWARD_ALL_TYPES)
    run(db, "CREATE TABLE again (LIKE everything)")
    with postgres.ConnInfo(db).connect() as conn:
        with conn.cursor().copy("COPY (SELECT * FROM everything ORDER BY random()) TO STDOUT") as out:
            data = b"".join(bytes(chunk) for chunk in out)
        with conn.cursor().copy("COPY again FROM STDIN") as into:
            into.write(data)
    cols = columns_of(db, "everything")
    oids = {oid for oid, in run(db, "SELECT atttypid FROM pg_attribute WHERE attrelid = 'everything'::regclass")}
    assert set(NATIVE_HASHES) <= oids, "every natively hashed type is in the table"
    for method in ChecksumMethod:
        assert checksum(db, "everything", method, cols) == checksum(db, "again", method, cols)
    assert len({checksum(db, "everything", method, cols) for method in ChecksumMethod}) == len(ChecksumMethod)

    last = {method: checksum(db, "again", method, cols) for method in NATIVE_METHODS}
    for column in cols:
        c = sql.Identifier(column)
        target = sql.SQL("(SELECT ctid FROM again WHERE {c} IS NOT NULL LIMIT 1)").format(c=c)
        for change in (
                sql.SQL("UPDATE again SET {c} = (SELECT {c} FROM again WHERE {c}::text <> "
                        "(SELECT {c}::text FROM again WHERE ctid = {t}) LIMIT 1) WHERE ctid = {t}"),
                sql.SQL("UPDATE again SET {c} = (SELECT {c} FROM again WHERE {c} IS NOT NULL LIMIT 1)"
                        " WHERE ctid = (SELECT ctid FROM again WHERE {c} IS NULL LIMIT 1)")):
            run(db, change.format(c=c, t=target))
            now = {method: checksum(db, "again", method, cols) for method in NATIVE_METHODS}
            for method in NATIVE_METHODS:
                assert now[method] != last[method], f"a changed value of {column} kept the {method} checksum"
            last = now


@pytest.mark.parametrize("method", NATIVE_METHODS)
def test_parts_sum_to_the_whole_under_the_typed_methods(db: str, method: ChecksumMethod) -> None:
    if run(db, "SELECT to_regclass('everything')") == [(None,)]:
        run(db, AWKWARD_ALL_TYPES)
    run(db, "CREATE TABLE IF NOT EXISTS split AS SELECT * FROM everything;"
            "INSERT INTO split SELECT * FROM split; INSERT INTO split SELECT * FROM split")
    cols = columns_of(db, "split")
    with postgres.ConnInfo(db).connect() as conn:
        blocks = next(iter(postgres.heap_blocks(conn, [int(conn.execute("SELECT 'split'::regclass::oid")
                                                           .fetchone()[0])]).values()))  # type: ignore[index]
        assert blocks >= 3
        whole = postgres.table_checksum(conn, "public", "split", cols, method)
        parts = [postgres.table_checksum(conn, "public", "split", cols, method, r)
                 for r in postgres.block_ranges(blocks, 3)]
    assert postgres.combine_checksums(parts) == whole


def test_a_table_without_natively_hashed_columns_has_the_row_text_value(db: str) -> None:
    run(db, "CREATE TABLE only_text_forms (n numeric, j jsonb); INSERT INTO only_text_forms VALUES (1.5, '[1]')")
    cols = ("n", "j")
    assert checksum(db, "only_text_forms", TYPED, cols) == checksum(db, "only_text_forms", TEXT, cols)


def test_the_row_hash_hashes_only_whitelisted_types_natively() -> None:
    columns = [ColumnType("a", 23), ColumnType("b", 1700), ColumnType("c", 1042, 10), ColumnType("d", 1042),
               ColumnType("e", 20), ColumnType("f", 99999)]
    text = row_hash_sql(TYPED, columns).as_string(None)
    assert text == ('hashtextextended((ROW(t."b", t."d", t."f")::text) COLLATE "C", '
                    'hash_record_extended(ROW(t."a", t."c" COLLATE "C", int8send(t."e"), 10), 0))')
    assert row_hash_sql(TEXT, columns).as_string(None) == \
        'hashtextextended(ROW(t."a", t."b", t."c", t."d", t."e", t."f")::text, 0)'


def test_servers_before_14_keep_the_row_text_method() -> None:
    assert checksum_method_for(13) is TEXT
    assert checksum_method_for(14) is checksum_method_for(18) is COLUMN


# (type, before, after) for every type typed-column hashes natively: each pair differs in text.
TYPED_COLUMN_NATIVE: dict[str, tuple[str, str]] = {
    "bool": ("true", "false"),
    "int2": ("1", "256"),
    "int4": ("-1", "65535"),
    "oid": ("1", "4294967295"),
    "uuid": ("'00000000-0000-0000-0000-000000000001'", "'01000000-0000-0000-0000-000000000000'"),
    "text": ("'a'", "'a '"),
    "varchar(4)": ("'ab'", "'ba'"),
    "char(4)": ("'ab'", "' ab'"),
    "int8": ("-1", "4294967295"),
    "bytea": ("'\\x00'", "'\\x0000'"),
    "date": ("'2000-01-01'", "'infinity'"),
    "timestamp": ("'2000-01-01'", "'2000-01-01 00:00:00.000001'"),
    "timestamptz": ("'2000-01-01 00:00+00'", "'-infinity'"),
}


@pytest.mark.parametrize("type_sql", sorted(TYPED_COLUMN_NATIVE))
def test_typed_column_catches_a_changed_value_of_every_natively_hashed_type(db: str, type_sql: str) -> None:
    before, after = TYPED_COLUMN_NATIVE[type_sql]
    oid = run(db, f"SELECT '{type_sql}'::regtype::oid")[0][0]
    assert oid in NATIVE_HASHES
    first, second = changed_text(db, "native_" + type_sql.split("(")[0], type_sql, before, after, COLUMN)
    assert first != second


@pytest.mark.parametrize("method", list(ChecksumMethod))
@pytest.mark.parametrize("type_sql", ["int4", "text", "jsonb", "bytea"])
def test_values_swapped_between_columns_of_a_row_or_moved_past_a_null_are_caught(
        db: str, type_sql: str, method: ChecksumMethod) -> None:
    """typed-column keys each column's hash by its position and turns a NULL into a constant of
    its position: (x, y), (y, x), (x, NULL) and (NULL, x) all differ."""
    table = f"within_{type_sql}_{method.name.lower()}"
    x, y = {"int4": ("1", "2"), "text": ("'a'", "'b'"), "jsonb": ("'1'", "'[1]'"),
            "bytea": ("'\\x01'", "'\\x02'")}[type_sql]
    run(db, f"CREATE TABLE {table} (id int, a {type_sql}, b {type_sql}); INSERT INTO {table} VALUES (1, {x}, {y})")
    seen = {checksum(db, table, method, ("a", "b"))}
    for a, b in ((y, x), (x, "NULL"), ("NULL", x), ("NULL", "NULL")):
        run(db, f"UPDATE {table} SET a = {a}, b = {b}")
        seen.add(checksum(db, table, method, ("a", "b")))
    assert len(seen) == 5


def test_typed_column_hashes_each_column_by_position_through_its_output_function() -> None:
    columns = [ColumnType("a", 23), ColumnType("b", 1700), ColumnType("c", 1042, 10), ColumnType("d", 1042),
               ColumnType("e", 20), ColumnType("f", 1184)]
    text = row_hash_sql(COLUMN, columns).as_string(None)
    assert text == (
        "hashtextextended('', (coalesce(hashint4extended(t.\"a\", 1),  -1))"
        " # (CASE WHEN t.\"b\" IS NULL THEN  -2 ELSE hashtextextended(concat(t.\"b\") COLLATE \"C\", 2) END)"
        " # (coalesce(hashbpcharextended(t.\"c\" COLLATE \"C\", 20483),  -3))"
        " # (CASE WHEN t.\"d\" IS NULL THEN  -4 ELSE hashtextextended(concat(t.\"d\") COLLATE \"C\", 4) END)"
        " # (coalesce(hashtextextended(t.\"e\"::text, 5),  -5))"
        " # (hash_record_extended(ROW(timestamptz_send(t.\"f\")), 0)))")
    assert row_hash_sql(COLUMN, []).as_string(None) == "hashtextextended('', 0)"


def test_a_checksum_query_is_not_jit_compiled_whatever_the_servers_thresholds(db: str) -> None:
    """JIT compiles a big table's checksum query for up to seconds of server CPU and does not
    speed up its hash calls: the query runs without it, with the same result, also on a
    session whose DSN turns it on (the tool's sessions start with it off otherwise)."""
    run(db, "CREATE TABLE IF NOT EXISTS jitted (id int, v text, n numeric);"
            "INSERT INTO jitted SELECT g, md5(g::text), g / 7.0 FROM generate_series(1, 2000) g")
    cols = ("id", "v", "n")
    compiling = " ".join(f"-c {name}=0" for name in ("jit_above_cost", "jit_optimize_above_cost",
                                                      "jit_inline_above_cost"))
    with postgres.ConnInfo(f"{db}?options={quote(f'-c jit=on {compiling}')}").connect() as conn:
        if not conn.execute("SELECT pg_jit_available()").fetchone()[0]:  # type: ignore[index]
            pytest.skip("this server has no JIT provider")
        query = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) " + postgres.CHECKSUM_SQL).format(
            row_hash_sql(COLUMN, postgres.column_types(conn, "public", "jitted", cols)),
            postgres.qualified("public", "jitted"), sql.SQL(""))
        assert "JIT" in conn.execute(query).fetchone()[0][0], "the thresholds compile any query"  # type: ignore[index]
        jitted = postgres.table_checksum(conn, "public", "jitted", cols, COLUMN)
        assert "JIT" not in conn.execute(query).fetchone()[0][0]  # type: ignore[index]
    assert jitted == checksum(db, "jitted", COLUMN, cols)
