"""Parallel post-data replay attaches partition indexes one at a time.

Concurrent ``ALTER INDEX … ATTACH PARTITION`` at two levels of a multi-level partitioned index
can each miss the other's uncommitted work, leaving the top index invalid for good (seen in 2
of 15 plain ``pg_restore --jobs=4`` runs of the schema below). The replay therefore builds
everything else in parallel, then runs the attach entries alone in one transaction, then the
foreign keys (which need the referenced partitioned index valid)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo

LEVELS = "".join(
    f"CREATE TABLE tp_{i} PARTITION OF tp FOR VALUES IN ({i}) PARTITION BY LIST (b);"
    f"CREATE TABLE tp_{i}_1 PARTITION OF tp_{i} FOR VALUES IN (1);"
    f"CREATE TABLE tp_{i}_2 PARTITION OF tp_{i} FOR VALUES IN (2);" for i in range(1, 13))
SCHEMA = ("CREATE TABLE tp (a int, b int, PRIMARY KEY (a, b)) PARTITION BY LIST (a);" + LEVELS
          + "CREATE TABLE ref (a int, b int, FOREIGN KEY (a, b) REFERENCES tp);"
          + "CREATE INDEX ref_a ON ref (a);")


def _archive(db: Any, path: Path) -> Path:
    tool = schema.find_tool("pg_dump", 15)
    path.write_bytes(subprocess.run([tool, "--format=custom", "--schema-only", "--dbname", db.dsn],
                                    check=True, capture_output=True).stdout)
    return path


def test_attach_entries_run_alone_after_the_indexes_and_before_the_foreign_keys(fresh_db: Any,
                                                                               tmp_path: Path) -> None:
    src = fresh_db("passes_src")
    src.execute(SCHEMA)
    archive = _archive(src, tmp_path / "schema.pgdump")
    passes = schema._post_data_passes(archive, 15)
    assert [parallel for _, parallel in passes] == [True, False, True]
    kinds = [{schema._LIST_DESC.match(ln).group(1) if schema._LIST_DESC.match(ln) else "other" for ln in lines}
             for lines, _ in passes]
    assert kinds == [{"other"}, {"INDEX ATTACH"}, {"FK CONSTRAINT"}]
    assert len(passes[1][0]) == 36
    listed = schema.section_ids(archive, 15, "post-data")
    assert sorted(ln.split(";")[0] for lines, _ in passes for ln in lines) == sorted(listed)


def test_parallel_replay_leaves_every_partitioned_index_valid(fresh_db: Any, tmp_path: Path) -> None:
    src = fresh_db("passes_src2")
    src.execute(SCHEMA)
    archive = _archive(src, tmp_path / "schema.pgdump")
    for n in range(4):
        dst = fresh_db(f"passes_dst{n}")
        target = ConnInfo(dst.dsn)
        schema.restore_section(archive, target, 15, "pre-data")
        done: list[int] = []
        schema.restore_section(archive, target, 15, "post-data", jobs=4, on_item=lambda d=done: d.append(1))
        assert dst.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
        assert len(done) == len(schema.section_ids(archive, 15, "post-data"))
        assert dst.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'f'") >= 1
