"""``restore tables`` of a partitioned table whose partitions changed since the backup, as
pg_partman changes them every day: retention dropped the oldest partitions, premake added new
ones, and rows went into those. Modelled in plain SQL (a daily range-partitioned table with a
primary key, an index and a default partition), so no package is needed.

- A partition the backup has and the target lacks is created, loaded and attached with its
  own indexes and keys (attached first, it got copies of the parent's named as the backup's
  own, which then could not be created: the restore failed, "already exists").
- ``--replace`` of the parent empties the partitions the backup does not have: the parent
  then holds exactly the backup's rows (their rows stayed, and the verdict said OK about a
  table holding rows the backup never had).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from support.cli import Cli

pytestmark = pytest.mark.slow

DAYS = [f"2026-01-{d:02d}" for d in range(1, 6)]
SCHEMA = "\n".join([
    "CREATE SCHEMA app;",
    "CREATE TABLE app.events (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz NOT NULL, kind text,"
    " PRIMARY KEY (id, at)) PARTITION BY RANGE (at);",
    "CREATE INDEX events_kind ON app.events (kind);",
    *(f"CREATE TABLE app.events_p{d.replace('-', '_')} PARTITION OF app.events"
      f" FOR VALUES FROM ('{d}') TO ('{d}'::date + 1);" for d in DAYS),
    "CREATE TABLE app.events_default PARTITION OF app.events DEFAULT;",
    "INSERT INTO app.events (at, kind) SELECT '2026-01-01'::timestamptz + g * interval '53 minutes', 'k' || g % 4"
    " FROM generate_series(0, 130) g;",
    "INSERT INTO app.events (at, kind) VALUES ('2027-01-01', 'far');",
])
TREE = ("SELECT string_agg(c.relname || ':' || pg_get_expr(c.relpartbound, c.oid), ', ' ORDER BY c.relname)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'app.events'::regclass")
ROWS = "SELECT count(*), md5(string_agg(e::text, ',' ORDER BY id)) FROM app.events e"
INDEXES = ("SELECT count(*) FILTER (WHERE x.indisvalid), count(*) FROM pg_index x"
           " WHERE x.indrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'app.events'::regclass)")


def drift(fresh_db: Callable[[str], Any], cli: Cli, repo: str, drop: bool) -> tuple[Any, tuple[Any, ...], str]:
    """A backed-up database whose two oldest partitions were then dropped (if ``drop``), and
    a later day added and written to; with the backup's tree and rows."""
    db = fresh_db("drift")
    db.execute(SCHEMA)
    expected = (db.scalar(TREE), tuple(db.execute(ROWS)[0]))
    cli.json("backup", "full", "--repo", repo, "--dsn", db.dsn)
    if drop:
        db.execute("DROP TABLE app.events_p2026_01_01, app.events_p2026_01_02")
    db.execute("CREATE TABLE app.events_p2026_01_06 PARTITION OF app.events FOR VALUES FROM ('2026-01-06') TO ('2026-01-07')")
    db.execute("INSERT INTO app.events (at, kind) SELECT '2026-01-06 10:00', 'new' FROM generate_series(1, 9)")
    db.execute("UPDATE app.events SET kind = 'changed' WHERE kind = 'k1'")
    return db, expected, repo


@pytest.fixture
def drifted(fresh_db: Callable[[str], Any], cli: Cli, local_repo: str) -> tuple[Any, tuple[Any, ...], str]:
    return drift(fresh_db, cli, local_repo, drop=True)


def test_replace_empties_partitions_the_backup_does_not_have(fresh_db: Callable[[str], Any], cli: Cli,
                                                             local_repo: str) -> None:
    db, (_, rows), repo = drift(fresh_db, cli, local_repo, drop=False)
    result = cli.json("restore", "tables", "--repo", repo, "--tables", "app.events", "--replace", "--target-dsn", db.dsn)
    assert result["ok"] is True and "app.events_p2026_01_06" not in result["tables"]
    assert tuple(db.execute(ROWS)[0]) == rows
    assert db.scalar("SELECT count(*) FROM app.events_p2026_01_06") == 0


def test_replace_brings_back_dropped_partitions_and_empties_new_ones(
        drifted: tuple[Any, tuple[Any, ...], str], cli: Cli) -> None:
    db, (tree, rows), repo = drifted
    result = cli.json("restore", "tables", "--repo", repo, "--tables", "app.events", "--replace",
                      "--target-dsn", db.dsn)
    assert result["ok"] is True
    assert tuple(db.execute(ROWS)[0]) == rows, "the partitioned table holds the backup's rows and no others"
    assert db.scalar(TREE) == tree + ", events_p2026_01_06:FOR VALUES FROM ('2026-01-06 00:00:00+00') TO " \
                                     "('2026-01-07 00:00:00+00')", "definitions are not touched: the new day stays"
    assert db.scalar("SELECT count(*) FROM app.events_p2026_01_06") == 0
    valid, total = db.execute(INDEXES)[0]
    assert (valid, total) == (14, 14), "each partition: its key and kind index, attached to the parent's"
    assert db.scalar("SELECT bool_and(indisvalid) FROM pg_index WHERE indrelid = 'app.events'::regclass")
    validate = cli("validate", "--repo", repo, "--dsn", db.dsn, "--against", "latest", "--json")
    failed = [c["name"] for c in validate.json()["checks"] if not c["ok"]]
    assert failed == ["schema_matches", "indexes_valid"], validate.stdout  # the new day's table and its indexes


def test_a_dropped_partition_restored_alone_is_attached_with_its_own_indexes(
        drifted: tuple[Any, tuple[Any, ...], str], cli: Cli) -> None:
    db, _, repo = drifted
    result = cli.json("restore", "tables", "--repo", repo, "--tables", "app.events_p2026_01_02", "--target-dsn", db.dsn)
    assert result["ok"] is True
    assert db.scalar("SELECT count(*) FROM app.events WHERE at >= '2026-01-02' AND at < '2026-01-03'") == 27
    assert db.scalar("SELECT string_agg(indexrelid::regclass::text || ':' || inhparent::regclass::text, ', '"
                     " ORDER BY indexrelid::regclass::text) FROM pg_index JOIN pg_inherits ON inhrelid = indexrelid"
                     " WHERE indrelid = 'app.events_p2026_01_02'::regclass") == \
        "app.events_p2026_01_02_kind_idx:app.events_kind, app.events_p2026_01_02_pkey:app.events_pkey"


def test_a_partition_whose_partitioned_table_is_gone_is_refused_naming_it(
        drifted: tuple[Any, tuple[Any, ...], str], cli: Cli) -> None:
    """Refused before anything is written, naming the table to restore instead (it failed
    half-way through the partition's definitions, naming a missing relation)."""
    db, _, repo = drifted
    db.execute("DROP TABLE app.events")
    proc = cli("restore", "tables", "--repo", repo, "--tables", "app.events_p2026_01_03", "--target-dsn", db.dsn)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "partition app.events_p2026_01_03 cannot be restored without its " \
        "partitioned table app.events, which the target database lacks — name app.events too" in proc.stderr
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'app'::regnamespace") == 0
