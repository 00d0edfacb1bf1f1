"""Large objects (``lo_*``, ``pg_largeobject``): backed up, restored and validated.

Large objects live outside every table, so per-table COPY does not see them. A backup whose
database holds any writes one more object, ``large_objects.pgdump.zst``: pg_dump's custom
archive of the large objects alone (their OIDs, owners, ACLs, comments and contents),
taken in the backup's snapshot. A restore replays it with pg_restore after the tables are
loaded (in one transaction, or several where the target's lock table needs, see :func:`restore`), so large objects come back with the same OIDs the tables
reference. The manifest inventory records ``large_objects``: the count and an
order-independent checksum over (oid, owner, ACL as a sorted set, comment, md5 of the
content); validation compares both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg

from backup_tool.postgres import schema
from backup_tool.postgres.connection import ConnInfo, find_tool, hash_sum_sql
from backup_tool.repository.storage import Storage
from backup_tool.streams import pipeline

_CHECKSUM_SQL = "SELECT count(*), " + hash_sum_sql("""hashtextextended(concat_ws(':', m.oid,
    pg_get_userbyid(m.lomowner), (SELECT string_agg(a::text, ',' ORDER BY a::text) FROM unnest(m.lomacl) a),
    obj_description(m.oid, 'pg_largeobject'), md5(lo_get(m.oid))), 0)""") + " FROM pg_largeobject_metadata m"


def summary(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """``{"count": n, "checksum": hex}`` of the database's large objects."""
    row = conn.execute(_CHECKSUM_SQL).fetchone()
    assert row is not None
    return {"count": int(row[0]), "checksum": f"{int(row[1]):016x}"}


def dump_stream(conninfo: ConnInfo, major: int, snapshot_id: str) -> pipeline.Process:
    """pg_dump writing the large objects (and nothing else) of the snapshot to stdout.

    ``--data-only`` drops the schema; excluding every table's data (``*.*``: a bare ``*``
    matches only the schemas on the search path) leaves the large objects and their
    ownership, ACL and comment entries, which pg_dump files as data.
    """
    argv = [find_tool("pg_dump", major), "--format=custom", "--compress=0", "--data-only",
            "--exclude-table-data=*.*", f"--snapshot={snapshot_id}", "--dbname", conninfo.tool_conninfo()]
    return pipeline.Process(argv, conninfo.tool_env(), "pg_dump (large objects)")


def restore(conninfo: ConnInfo, major: int, storage: Storage, key: str, sha256: str, size: int,
            workdir: Path, on_chunk: Callable[[int], None] | None = None) -> None:
    """Replay the stored large-object archive into the target: in one transaction, unless it
    holds more large objects than a quarter of the target's lock table (each one created
    keeps a lock until its transaction ends: 20,000 of them did not fit a default server,
    where ``pg_restore`` without ``--single-transaction`` does), then in transactions of
    :func:`schema.entries_per_transaction` entries, in the archive's order (the restore's
    unfinished-restore marker covers a failure between them)."""
    path = workdir / "large_objects.pgdump"
    with open(path, "wb") as fh:
        for chunk in pipeline.read_stored(storage, key, sha256, size, on_chunk):
            fh.write(chunk)
    argv = [find_tool("pg_restore", major), "--data-only", "--exit-on-error", "--single-transaction",
            "--dbname", conninfo.tool_conninfo()]
    ids = schema.section_listing(path, major, None)
    per = schema.entries_per_transaction(schema.lock_table_size(conninfo)) \
        if len(ids) > schema.MIN_ENTRIES_PER_TRANSACTION else len(ids)
    if len(ids) <= per:
        pipeline.run([*argv, str(path)], conninfo.tool_env(), "pg_restore (large objects)")
    else:
        listing = workdir / "large_objects.list"
        for batch in schema.batches(ids, per):
            listing.write_text("".join(f"{i}\n" for i in batch))
            pipeline.run([*argv, f"--use-list={listing}", str(path)], conninfo.tool_env(),
                         "pg_restore (large objects)")
        listing.unlink()
    path.unlink()


def chunks_of(proc: pipeline.Process) -> Iterator[bytes]:
    """The process's stdout, then its exit status checked (a failed dump never stores)."""
    yield from proc.chunks()
    proc.finish()
