"""`restore full --jobs N` of a multi-level partitioned table comes back with every
partitioned index valid and an OK verdict.

Parallel pg_restore workers attaching partition indexes at two levels at once could leave
the root or an intermediate partitioned index invalid although every partition had a valid
index attached; validation then failed a perfectly good backup (exit 3). The post-data
replay now attaches them one after another (see tests/postgres/test_post_data_passes.py)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

pytestmark = pytest.mark.slow

SITES = 8
# readings: site (list) -> half-year (range); site 8's second half-year -> sensor (list),
# so one branch has three levels. Keys at every level, a foreign key to the root, a comment.
SCHEMA = "\n".join([
    "CREATE TABLE readings (site int, taken date, sensor int, value numeric, note text,"
    " PRIMARY KEY (site, taken, sensor)) PARTITION BY LIST (site);",
    *(f"CREATE TABLE readings_s{s} PARTITION OF readings FOR VALUES IN ({s}) PARTITION BY RANGE (taken);"
      f"CREATE TABLE readings_s{s}_h1 PARTITION OF readings_s{s} FOR VALUES FROM ('2025-01-01') TO ('2025-07-01');"
      f"CREATE TABLE readings_s{s}_h2 PARTITION OF readings_s{s} FOR VALUES FROM ('2025-07-01') TO ('2026-01-01')"
      + (" PARTITION BY LIST (sensor);" if s == SITES else ";") for s in range(1, SITES + 1)),
    f"CREATE TABLE readings_s{SITES}_h2_even PARTITION OF readings_s{SITES}_h2 FOR VALUES IN (0, 2, 4, 6);",
    f"CREATE TABLE readings_s{SITES}_h2_odd PARTITION OF readings_s{SITES}_h2 FOR VALUES IN (1, 3, 5);",
    "CREATE INDEX readings_value ON readings (value) WHERE value > 0;",
    "CREATE UNIQUE INDEX readings_note ON readings (site, taken, sensor, note) NULLS NOT DISTINCT;",
    "COMMENT ON INDEX readings_pkey IS 'one reading per sensor and day';",
    "CREATE TABLE alarms (id int PRIMARY KEY, site int, taken date, sensor int,"
    " FOREIGN KEY (site, taken, sensor) REFERENCES readings ON DELETE CASCADE);",
    f"INSERT INTO readings SELECT 1 + g % {SITES}, date '2025-01-01' + (g / {SITES}) % 365, g % 7,"
    " (g % 50) - 10, CASE WHEN g % 3 = 0 THEN 'ok' END FROM generate_series(0, 5999) g;",
    "INSERT INTO alarms SELECT row_number() OVER (), site, taken, sensor FROM readings WHERE value = 39;",
])

INVALID = ("SELECT string_agg(indexrelid::regclass::text, ', ' ORDER BY 1) FROM pg_index i"
           " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relkind = 'I' AND NOT i.indisvalid")


def test_parallel_restores_keep_partitioned_indexes_valid(cli: Any, local_repo: str,
                                                          fresh_db: Callable[[str], Any]) -> None:
    src = fresh_db("readings")
    src.execute(SCHEMA)
    partitioned = src.scalar("SELECT count(*) FROM pg_class WHERE relkind = 'I'")
    assert partitioned == 3 * (1 + SITES) + 3 and src.scalar(INVALID) is None
    backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", src.dsn)
    for n in range(3):
        dst = fresh_db(f"readings_r{n}")
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", backup["id"],
                          "--target-dsn", dst.dsn, "--jobs", "4")
        failed = [c for c in result["validation"]["checks"] if not c["ok"]]
        assert result["ok"] is True and not failed, f"run {n}: {failed}"
        assert dst.scalar(INVALID) is None
        assert dst.scalar("SELECT count(*) FROM pg_class WHERE relkind = 'I'") == partitioned
        assert dst.scalar("SELECT count(*) FROM alarms") == src.scalar("SELECT count(*) FROM alarms") > 0
        assert dst.scalar("SELECT obj_description('readings_pkey'::regclass)") == "one reading per sensor and day"
