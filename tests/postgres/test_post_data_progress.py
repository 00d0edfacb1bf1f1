"""Progress of a parallel post-data replay counts every table-of-contents item exactly once,
however pg_restore reports it (worker, leader, interleaved lines)."""

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


def test_parallel_replay_counts_each_item_once(fresh_db: Any, tmp_path: Path) -> None:
    src = fresh_db("passes_src")
    src.execute(SCHEMA)
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(subprocess.run([schema.find_tool("pg_dump", 15), "--format=custom", "--schema-only",
                                        "--dbname", src.dsn], check=True, capture_output=True).stdout)
    total = len(schema.section_ids(archive, 15, "post-data"))
    assert total > 70
    for n in range(3):
        dst = fresh_db(f"passes_dst{n}")
        target = ConnInfo(dst.dsn)
        schema.restore_section(archive, target, 15, "pre-data")
        done: list[int] = []
        schema.restore_section(archive, target, 15, "post-data", jobs=4, on_item=lambda d=done: d.append(1))
        assert len(done) == total
