"""Replaying a section in transactions the target's lock table can hold.

A single-transaction replay of thousands of tables holds three locks per table until it
commits: a server sized like the one that was backed up (the backup needs about one lock per
table) refused it, out of shared memory. A lock-bounded replay cuts the section, in the
archive's order, into transactions of :func:`schema.entries_per_transaction` entries; without
``lock_bounded`` a replay stays all-or-nothing (``restore tables`` relies on that)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from backup_tool.errors import BackupToolError
from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo


def test_a_quarter_of_the_lock_table_at_three_locks_an_entry_but_never_fewer_than_the_minimum() -> None:
    assert schema.entries_per_transaction(64 * 100) == 533
    assert schema.entries_per_transaction(10 * 10) == schema.MIN_ENTRIES_PER_TRANSACTION
    assert schema.entries_per_transaction(256 * 1000) == 21333


def test_batches_keep_the_archive_order_and_every_entry_once() -> None:
    ids = [str(i) for i in (7, 3, 9, 1, 4)]
    assert schema.batches(ids, 2) == [["7", "3"], ["9", "1"], ["4"]]
    assert schema.batches(ids, 5) == [ids]
    assert schema.batches([], 3) == []


def test_an_annotation_never_starts_a_batch() -> None:
    ids = [str(i) for i in (7, 3, 9, 1, 4, 8)]
    assert schema.batches(ids, 2, frozenset({"9", "1"})) == [["7", "3", "9", "1"], ["4", "8"]]
    assert schema.batches(ids, 2, frozenset({"7"})) == [["7", "3"], ["9", "1"], ["4", "8"]]


def test_a_bounded_replay_keeps_every_comment_and_privilege_of_its_objects(
        fresh_db: Any, pg_cluster_factory: Callable[..., Any], tmp_path: Path) -> None:
    """pg_restore --section --use-list skips, without a word, a comment or privilege whose
    object is not in the same run: cut between a table and its column privileges, the
    bounded replay lost them (found restoring the seed into a server of max_connections 10)."""
    source = fresh_db("annotated_src")
    source.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'reader') THEN "
                   "CREATE ROLE reader; END IF; END$$")
    source.execute(";".join(f"CREATE TABLE public.t{i} (id int PRIMARY KEY, v text); "
                            f"COMMENT ON TABLE public.t{i} IS 'table {i}'; "
                            f"COMMENT ON COLUMN public.t{i}.v IS 'value {i}'; "
                            f"GRANT SELECT ON public.t{i} TO reader; GRANT UPDATE (v) ON public.t{i} TO reader"
                            for i in range(120)))
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(subprocess.run([schema.find_tool("pg_dump", 15), "--format=custom", "--schema-only",
                                        "--dbname", source.dsn], check=True, capture_output=True).stdout)
    small = pg_cluster_factory(max_locks_per_transaction="10", max_connections="10", autovacuum="off")
    small.admin_conn().execute("CREATE ROLE reader").close()
    target = small.create_db("annotated")
    schema.restore_section(archive, ConnInfo(target.dsn), 15, "pre-data", lock_bounded=True)
    counts = ("SELECT (SELECT count(*) FROM information_schema.column_privileges WHERE grantee = 'reader'),"
              " (SELECT count(*) FROM information_schema.table_privileges WHERE grantee = 'reader'),"
              " (SELECT count(*) FROM pg_description d JOIN pg_class c ON c.oid = d.objoid"
              "   WHERE c.relnamespace = 'public'::regnamespace)")
    expected = source.execute(counts)[0]
    assert expected == (360, 120, 240)
    assert target.execute(counts)[0] == expected


def test_listing_lines_give_their_ids_and_comments_or_continued_names_none() -> None:
    lines = ["; Archive created at 2026-11-27", "215; 1259 16390 TABLE public t1 postgres",
             "216; 1259 16395 TABLE public \"two", "lines\" postgres", ";217; 0 0 COMMENT public t1", ""]
    assert schema._listed_ids(lines) == ["215", "216"]


def _archive(db: Any, tmp_path: Path, tables: int) -> Path:
    db.execute(";".join(f"CREATE TABLE public.t{i} (id int PRIMARY KEY, v text)" for i in range(tables)))
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(subprocess.run([schema.find_tool("pg_dump", 15), "--format=custom", "--schema-only",
                                        "--dbname", db.dsn], check=True, capture_output=True).stdout)
    return archive


def test_pre_data_larger_than_the_lock_table_replays_bounded_and_all_or_nothing_unbounded(
        fresh_db: Any, pg_cluster_factory: Callable[..., Any], tmp_path: Path) -> None:
    archive = _archive(fresh_db("bounded_src"), tmp_path, 150)
    small = pg_cluster_factory(max_locks_per_transaction="10", max_connections="10", autovacuum="off")
    whole = small.create_db("whole")
    with pytest.raises(BackupToolError, match="out of shared memory"):
        schema.restore_section(archive, ConnInfo(whole.dsn), 15, "pre-data")
    assert whole.scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace") == 0
    bounded = small.create_db("bounded")
    schema.restore_section(archive, ConnInfo(bounded.dsn), 15, "pre-data", lock_bounded=True)
    schema.restore_section(archive, ConnInfo(bounded.dsn), 15, "post-data", lock_bounded=True)
    assert bounded.scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                          "AND relkind = 'r'") == 150
    assert bounded.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'p' "
                          "AND connamespace = 'public'::regnamespace") == 150


def test_a_setting_that_fits_holds_the_locks_with_a_quarter_to_spare_in_steps_of_64() -> None:
    defaults = schema.LockTable(per_transaction=64, processes=122)
    assert defaults.slots == 7808
    assert defaults.sized_for(7503) == 128          # 7503 x 1.25 / 122 = 77 -> 128
    assert defaults.sized_for(100) == 128           # never less than one step above today's
    assert schema.LockTable(10, 36).sized_for(753) == 64
    assert schema.LockTable(64, 122).sized_for(50_000) == 576
