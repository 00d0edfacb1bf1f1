"""Large objects restore on a server sized like the one backed up.

Each large object created by a restore keeps a lock until its transaction ends: 20,000 of
them backed up on a default server could not be restored onto it in one transaction (out of
shared memory) where ``pg_restore`` without ``--single-transaction`` could. They are now
restored in transactions the target's lock table holds, in the archive's order, owners,
grants and comments included; one changed afterwards fails ``large_objects``."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.slow


def test_more_large_objects_than_the_lock_table_holds_restore_whole_with_owners_grants_and_comments(
        pg_cluster_factory: Callable[..., Any], cli: Any, local_repo: str) -> None:
    server = pg_cluster_factory(max_locks_per_transaction="10", max_connections="10", autovacuum="off")
    db = server.create_db("blobs")
    db.execute("CREATE ROLE lo_reader; CREATE ROLE lo_keeper;"
               "CREATE TABLE public.docs (id int PRIMARY KEY, body oid);"
               "INSERT INTO public.docs SELECT g, lo_from_bytea(0, convert_to(repeat('é', g % 90) || g, 'UTF8')) "
               "FROM generate_series(1, 500) g")
    first, last = db.scalar("SELECT min(body)::text || ',' || max(body)::text FROM public.docs").split(",")
    db.execute(f"COMMENT ON LARGE OBJECT {first} IS 'first, with a ''quote'''; "
               f"GRANT SELECT ON LARGE OBJECT {first} TO lo_reader; ALTER LARGE OBJECT {last} OWNER TO lo_keeper")
    made = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert made["rows"] == 500
    target = server.create_db("blobs_restored")
    report = cli.json("restore", "full", "--repo", local_repo, "--database", "blobs", "--target-dsn", target.dsn)
    assert report["validation"]["ok"] is True
    checks = {c["name"]: c for c in report["validation"]["checks"]}
    assert checks["large_objects"]["ok"] is True and "500" in checks["large_objects"]["detail"]
    described = ("SELECT count(*)::text || obj_description(min(oid), 'pg_largeobject') || "
                 "(SELECT lomacl::text FROM pg_largeobject_metadata WHERE oid = {first}) || "
                 "(SELECT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata WHERE oid = {last}) "
                 "FROM pg_largeobject_metadata")
    query = described.format(first=first, last=last)
    assert target.scalar(query) == db.scalar(query)
    assert target.scalar("SELECT sum(length(lo_get(body))) FROM public.docs") == \
        db.scalar("SELECT sum(length(lo_get(body))) FROM public.docs")
    target.execute(f"SELECT lo_put({last}, 0, '\\x01')")
    altered = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", made["id"], "--json")
    assert altered.returncode == 3, altered.stdout + altered.stderr
    failed = [c["name"] for c in json.loads(altered.stdout)["checks"] if not c["ok"]]
    assert failed == ["large_objects"], failed
