"""A table above ``backup.split_table_mb`` is dumped in parts, one per range of its heap blocks,
and every path that reads a table's data reads all of them: full restore (parts loaded in one
frozen transaction; validation names a changed row's table), incremental (an unchanged split table references all its parent's parts),
restore tables, verify. Awkward data: TOAST values, NULLs, text that needs COPY escapes, rows
updated and deleted so that live rows are scattered over the blocks with holes between."""

from __future__ import annotations

from typing import Any, Callable

import dbcompare
import psycopg
import pytest
from support.cli import Cli
from support.objects import read_object, write_object

from backup_tool.config.policy import BackupSettings, Policy, Retention
from backup_tool.config.settings import Settings
from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.core.report import NullReporter
from backup_tool.jobs.verify import verify
from backup_tool.logical import backup
from backup_tool.logical.restore import restore_full
from backup_tool.logical.restore_tables import restore_tables
from backup_tool.postgres import connection as postgres
from backup_tool.repository.manifest import SPLIT_TABLE_FORMAT, TYPED_COLUMN_FORMAT

pytestmark = pytest.mark.slow

AWKWARD = """
CREATE TABLE public.big (
    id int PRIMARY KEY, note text, doc jsonb, payload text, flag boolean, at timestamptz
) WITH (fillfactor = 70);
INSERT INTO public.big
SELECT g,
       CASE WHEN g % 13 = 0 THEN NULL ELSE repeat(md5(g::text), 4) || E'\\t tab \\\\ back\\nline' END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE jsonb_build_object('g', g, 's', md5(g::text)) END,
       CASE WHEN g % 97 = 0 THEN (SELECT string_agg(md5((g * i)::text), '') FROM generate_series(1, 300) i) END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
       timestamptz '2025-01-01' + g * interval '1 minute'
  FROM generate_series(1, 12000) g;
UPDATE public.big SET note = coalesce(note, 'was null') || ' updated' WHERE id % 7 = 0;
DELETE FROM public.big WHERE id % 11 = 0 OR id BETWEEN 4000 AND 5000;
VACUUM public.big;
INSERT INTO public.big SELECT g, 'refill ' || g, NULL, NULL, NULL, NULL FROM generate_series(20001, 21000) g;
CREATE TABLE public.small (id int PRIMARY KEY, big_id int REFERENCES public.big (id), v text);
INSERT INTO public.small SELECT g, g, 'v' || g FROM generate_series(1, 50) g WHERE g % 11 <> 0;
"""


class StateWhenDataLoaded(NullReporter):
    """Reads, at the restore's "data loaded" milestone (every table's rows in, before the final
    post-data and ANALYZE steps), which of the split table's post-data steps are already done."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.state: dict[str, bool] = {}

    def event(self, message: str, **fields: Any) -> None:
        if message != "data loaded":
            return
        with psycopg.connect(self.dsn) as conn:
            def exists(query: str) -> bool:
                return bool(postgres.scalar(conn, f"SELECT EXISTS ({query})"))
            self.state = {
                "big_pkey": exists("SELECT FROM pg_index WHERE indrelid = 'public.big'::regclass AND indisprimary"),
                "big_statistics": exists("SELECT FROM pg_stats WHERE schemaname = 'public' AND tablename = 'big'"),
                "small_fkey": exists("SELECT FROM pg_constraint WHERE conrelid = 'public.small'::regclass"
                                     " AND contype = 'f'"),
            }


def split_settings(repo: str, dsn: str) -> Settings:
    return Settings(repo, dsn, Policy(retention=Retention(max_chain_length=10),
                                      backup=BackupSettings(jobs=2, split_table_mb=1)))


def test_a_split_table_backs_up_in_parts_and_every_reader_restores_it_row_for_row(
        s3_repo: str, fresh_db: Callable[..., Any], cli: Cli) -> None:
    db = fresh_db("split")
    for statement in AWKWARD.split(";\n"):
        if statement.strip():
            db.execute(statement)
    settings = split_settings(s3_repo, db.dsn)
    assert int(db.scalar("SELECT pg_table_size('public.big')")) > 2 * 2**20

    full = backup.backup_full(settings)
    big = full.table("public", "big")
    assert big is not None and big.object is None and len(big.parts) >= 3
    assert full.format == TYPED_COLUMN_FORMAT > SPLIT_TABLE_FORMAT
    assert full.checksum_method is ChecksumMethod.TYPED_COLUMN
    assert len({p.key for p in big.parts}) == len(big.parts)
    assert all(p.key.startswith(f"backups/{full.id}/") for p in big.parts)
    small = full.table("public", "small")
    assert small is not None and small.object is not None and not small.parts
    with psycopg.connect(db.dsn) as conn:
        assert (big.rows, big.checksum) == postgres.table_checksum(conn, "public", "big", big.columns,
                                                                             full.checksum_method)

    restored = fresh_db("split_r")
    seen = StateWhenDataLoaded(restored.dsn)
    result = restore_full(settings, restored.dsn, full.id, reporter=seen)
    assert result.validation is not None and result.validation.ok
    assert seen.state == {"big_pkey": True, "big_statistics": True, "small_fkey": False}, \
        "a split table's primary key and ANALYZE come right after its parts, while other tables load"
    assert dbcompare.table_hashes(restored.dsn) == dbcompare.table_hashes(db.dsn)

    altered = fresh_db("split_v")
    restore_full(settings, altered.dsn, full.id)
    altered.execute("UPDATE public.big SET note = note || '.' WHERE id = 9000")  # a row in a later part
    out = cli.json("validate", "--repo", s3_repo, "--dsn", altered.dsn, "--against", full.id, expect_rc=3)
    failed = [c for c in out["checks"] if not c["ok"]]
    assert failed and "public.big" in " ".join(c["detail"] for c in failed)

    db.execute("UPDATE public.small SET v = v || '!' WHERE id = 1")
    incremental = backup.backup_incremental(settings)
    assert incremental.parent_id == full.id
    assert incremental.table("public", "big") == big, "an unchanged split table references all its parent's parts"
    assert incremental.format == TYPED_COLUMN_FORMAT and incremental.checksum_method is full.checksum_method

    db.execute("DELETE FROM public.small WHERE id = 2; UPDATE public.big SET doc = '{\"changed\": 1}' WHERE id = 5")
    second = backup.backup_incremental(settings)
    changed = second.table("public", "big")
    assert changed is not None and len(changed.parts) >= 3
    assert all(p.key.startswith(f"backups/{second.id}/") for p in changed.parts)
    again = fresh_db("split_i")
    assert restore_full(settings, again.dsn, second.id).validation.ok  # type: ignore[union-attr]
    assert dbcompare.table_hashes(again.dsn) == dbcompare.table_hashes(db.dsn)

    copy = restore_tables(settings, db.dsn, ["public.big"], backup_ref=incremental.id, into_schema="inspect")
    assert copy.validation is not None and copy.validation.ok
    restored_big = dbcompare.table_hashes(db.dsn, ["inspect.big"])["inspect.big"]
    assert restored_big == dbcompare.table_hashes(restored.dsn, ["public.big"])["public.big"]

    part = big.parts[1].key
    data = bytearray(read_object(s3_repo, part))
    data[len(data) // 2] ^= 0xFF
    write_object(s3_repo, part, bytes(data))
    report = verify(settings, full.id)
    assert not report.ok and part in "; ".join(c.detail for c in report.failed)


def test_a_full_backup_dumps_whole_the_tables_its_sessions_share_the_work_around_and_an_incremental_splits(
        local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """Two tables above ``split_table_mb`` of about the same size: neither's dump is more than
    a session's even share of a full backup's work, so each is one object (one COPY, no TID
    range scans). An incremental, whose work is mostly checksums, still reads a changed one by
    ranges into parts; both restore row for row."""
    db = fresh_db("share")
    for name in ("a", "b"):
        db.execute(f"CREATE TABLE public.{name} (id int PRIMARY KEY, v text);"
                   f"INSERT INTO public.{name} SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 15000) g")
    assert int(db.scalar("SELECT min(pg_table_size(c)) FROM unnest(ARRAY['public.a', 'public.b']::regclass[]) c")) \
        > 2**20
    settings = split_settings(local_repo, db.dsn)

    full = backup.backup_full(settings)
    for name in ("a", "b"):
        entry = full.table("public", name)
        assert entry is not None and entry.object is not None and not entry.parts, name
        assert entry.rows == 15000

    db.execute("UPDATE public.a SET v = 'changed' WHERE id IN (7, 14000)")
    incremental = backup.backup_incremental(settings)
    changed = incremental.table("public", "a")
    assert incremental.parent_id == full.id and changed is not None and len(changed.parts) >= 2
    assert incremental.table("public", "b") == full.table("public", "b")
    for made in (full, incremental):
        restored = fresh_db("share_r")
        assert restore_full(settings, restored.dsn, made.id).validation.ok  # type: ignore[union-attr]
    assert dbcompare.table_hashes(restored.dsn) == dbcompare.table_hashes(db.dsn)


@pytest.mark.parametrize("method", list(ChecksumMethod))
def test_ranges_from_a_stale_block_count_still_cover_every_row_once(fresh_db: Callable[..., Any],
                                                                    method: ChecksumMethod) -> None:
    """Rows stored beyond the block count a backup read (the table grew since) fall in the
    last, open-ended range: the parts' checksums still sum to the whole table's."""
    db = fresh_db("stale")
    db.execute("CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g;"
               "DELETE FROM t WHERE id % 4 = 0; INSERT INTO t SELECT g, 'late' FROM generate_series(5001, 9000) g")
    with psycopg.connect(db.dsn) as conn:
        blocks = postgres.heap_blocks(conn, [int(db.scalar("SELECT 'public.t'::regclass::oid"))])
        measured = next(iter(blocks.values()))
        whole = postgres.table_checksum(conn, "public", "t", ("id", "v"), method)
        parts = [postgres.table_checksum(conn, "public", "t", ("id", "v"), method, r)
                 for r in postgres.block_ranges(measured // 2, 4)]
    assert whole[0] == 3750 + 4000
    assert all(n > 0 for n, _ in parts)
    assert postgres.combine_checksums(parts) == whole
