"""A parallel post-data replay of a multi-level partitioned schema: every partitioned index
comes back valid, and progress counts every table-of-contents item exactly once, however
pg_restore reports it (worker, leader, interleaved lines; serial attachment pass).

Before the replay attached partition indexes in a pass of their own
(:func:`schema.post_data_passes`), 4 plain ``pg_restore --jobs=4`` replays of this schema in 120
left ``tp_pkey`` or ``tp_c`` invalid (or failed on the foreign key that needs ``tp_pkey``); the loop
gives that a fair chance to show."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo

LEVELS = "".join(
    f"CREATE TABLE tp_{i} PARTITION OF tp FOR VALUES IN ({i}) PARTITION BY LIST (b);"
    + "".join(f"CREATE TABLE tp_{i}_{j} PARTITION OF tp_{i} FOR VALUES IN ({j});" for j in (1, 2, 3))
    for i in range(1, 13))
SCHEMA = ("CREATE TABLE tp (a int, b int, c text, PRIMARY KEY (a, b)) PARTITION BY LIST (a);" + LEVELS
          + "CREATE UNIQUE INDEX tp_c ON tp (a, b, c);"
          + "CREATE TABLE ref (a int, b int, FOREIGN KEY (a, b) REFERENCES tp);"
          + "CREATE INDEX ref_a ON ref (a);"
          + "COMMENT ON INDEX tp_pkey IS 'root key';")


def test_parallel_replay_leaves_indexes_valid_and_counts_each_item_once(fresh_db: Any, tmp_path: Path) -> None:
    src = fresh_db("passes_src")
    src.execute(SCHEMA)
    archive = tmp_path / "schema.pgdump"
    archive.write_bytes(subprocess.run([schema.find_tool("pg_dump", 15), "--format=custom", "--schema-only",
                                        "--dbname", src.dsn], check=True, capture_output=True).stdout)
    total = len(schema.section_ids(archive, 15, "post-data"))
    assert total > 100
    for n in range(8):
        dst = fresh_db(f"passes_dst{n}")
        target = ConnInfo(dst.dsn)
        schema.restore_section(archive, target, 15, "pre-data")
        done: list[int] = []
        schema.restore_section(archive, target, 15, "post-data", jobs=4, on_item=lambda d=done: d.append(1))
        invalid = dst.scalar("SELECT string_agg(indexrelid::regclass::text, ', ') FROM pg_index WHERE NOT indisvalid")
        assert invalid is None, f"run {n}: invalid after the replay: {invalid}"
        assert dst.scalar("SELECT count(*) FROM pg_class WHERE relkind = 'I'") == 2 * 13
        assert dst.scalar("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conparentid = 0") == 1
        assert dst.scalar("SELECT obj_description('tp_pkey'::regclass)") == "root key"
        assert len(done) == total
