"""End to end: full backup → repository → full restore, through the real CLI, real
PostgreSQL 15 and both repository kinds, proved with an independent fingerprint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import dbcompare
import psycopg
import pytest
from clioutput import one_line
from support.objects import read_object, write_object

pytestmark = pytest.mark.slow


@pytest.fixture
def backed_up(cli: Any, repo: str, seed_db: Any) -> dict[str, Any]:
    entry = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn)
    return entry


def test_round_trip_is_identical(cli: Any, repo: str, seed_db: Any, backed_up: dict[str, Any],
                                 fresh_db: Callable[..., Any], pg_server: Any) -> None:
    entry = backed_up
    assert entry["kind"] == "full" and entry["parent_id"] is None
    assert entry["database"] == seed_db.name and entry["size_bytes"] > 0
    listed = cli.json("list", "--repo", repo)
    assert [e["id"] for e in listed] == [entry["id"]]
    assert listed[0] == {**listed[0], **{k: entry[k] for k in ("id", "kind", "started_at", "size_bytes")}}

    target_name = f"restored_{entry['id'][-5:].lower()}"
    target_dsn = pg_server.dsn(target_name)
    try:
        result = cli.json("restore", "full", "--repo", repo, "--backup", entry["id"],
                          "--target-dsn", target_dsn, "--create")
        assert result["ok"] is True
        assert {c["name"] for c in result["validation"]["checks"]} >= {
            "schema_matches", "rls_policies", "foreign_keys_hold", "indexes_valid", "functions_present",
            "row_counts", "content_checksums", "sequences_not_behind"}
        dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(target_dsn))
        again = cli.json("validate", "--repo", repo, "--dsn", target_dsn, "--against", "latest")
        assert again["ok"] is True
    finally:
        pg_server.drop_db(target_name)


def test_tables_of_a_mebibyte_or_more_arrive_frozen_smaller_ones_skip_the_truncate(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """COPY FREEZE needs a TRUNCATE in the loading transaction, and a TRUNCATE scans the whole
    buffer pool twice: worth it for a table of 1 MiB of rows or more, not for a small one."""
    db = fresh_db("freeze")
    db.execute("CREATE TABLE public.big (id int PRIMARY KEY, v text);"
               "INSERT INTO public.big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 12000) g;"
               "CREATE TABLE public.small (id int PRIMARY KEY, v text);"
               "INSERT INTO public.small SELECT g, md5(g::text) FROM generate_series(1, 50) g")
    assert db.scalar("SELECT sum(length(v) + 7) FROM public.big") >= 1 << 20  # COPY text: v, id, tab, newline
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    target = fresh_db("freeze_r")
    assert cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn)["ok"] is True
    assert_loaded_frozen(target.dsn, "public.big")
    with pytest.raises(AssertionError):
        assert_loaded_frozen(target.dsn, "public.small")
    assert dbcompare.table_hashes(db.dsn) == dbcompare.table_hashes(target.dsn)


def test_each_restored_table_is_analyzed_once_its_rows_counted_first(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """A loaded table's rows reach the server's statistics before its ANALYZE resets the count
    of rows changed since the last one: counted after, they read as the whole table changed
    and autovacuum analyzes it a second time. One loading session, tables loaded well within
    the second a session otherwise waits between two writes of its counts."""
    db = fresh_db("stats")
    db.execute(";".join(f"CREATE TABLE public.t{i} (id int PRIMARY KEY, v text);"
                        f"INSERT INTO public.t{i} SELECT g, md5(g::text) FROM generate_series(1, 2000) g"
                        for i in range(8)))
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    target = fresh_db("stats_r")
    assert cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--jobs", "1")["ok"] is True
    target.wait_alone()  # the restore's sessions write their last counts as they exit
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        stats = conn.execute("SELECT relname, n_mod_since_analyze, last_analyze IS NOT NULL, last_autoanalyze IS NULL"
                             " FROM pg_stat_user_tables WHERE schemaname = 'public' ORDER BY relname").fetchall()
    assert stats == [(f"t{i}", 0, True, True) for i in range(8)]


def test_a_restore_analyzes_each_partition_once_on_sessions_it_reuses(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """ANALYZE of a partitioned table analyzes each partition too: the restore analyzed every
    partition twice (alone, then through its root), and ran each ANALYZE and each refresh of
    a materialized view on a session of its own (a server backend started per relation:
    with 3,000 partitions, 15 server CPU-s). Now each partition once, through its root, the
    inheritance parents and materialized views (refreshed, then analyzed after the data, as
    the partitioned root) on a few sessions reused, and the statistics are all there."""
    partitions = parents = views = 40
    db = fresh_db("parts")
    db.execute("CREATE TABLE public.ev (id bigint, day int, note text, PRIMARY KEY (id, day)) PARTITION BY LIST (day);"
               + ";".join(f"CREATE TABLE public.ev_{d} PARTITION OF public.ev FOR VALUES IN ({d})"
                          for d in range(partitions))
               + f";INSERT INTO public.ev SELECT g, g % {partitions}, md5(g::text) FROM generate_series(1, 4000) g;"
               + ";".join(f"CREATE TABLE public.up_{m} (note text);CREATE TABLE public.kid_{m} () INHERITS (public.up_{m});"
                          f"INSERT INTO public.kid_{m} VALUES ('n')" for m in range(parents)) + ";"
               + ";".join(f"CREATE MATERIALIZED VIEW public.mv_{v} AS SELECT note FROM public.ev_{v}"
                          for v in range(views)))
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    target = fresh_db("parts_r")
    assert cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--jobs", "2")["ok"] is True
    target.wait_alone()  # the restore's sessions write their last counts as they exit
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        counts = conn.execute("SELECT relname, analyze_count FROM pg_stat_user_tables"
                              " WHERE schemaname = 'public' AND relname LIKE 'ev\\_%' ORDER BY relname").fetchall()
        with_stats = conn.execute("SELECT tablename, bool_or(inherited) FROM pg_stats WHERE schemaname = 'public'"
                                  " AND attname = 'note' AND tablename LIKE 'ev%' GROUP BY 1").fetchall()
        inherited = conn.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'public'"
                                 " AND tablename LIKE 'up\\_%' AND inherited").fetchone()
        refreshed = conn.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'public'"
                                 " AND tablename LIKE 'mv\\_%'").fetchone()
        sessions = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert sorted(counts) == sorted((f"ev_{d}", 1) for d in range(partitions))
    assert sorted(with_stats) == sorted([("ev", True), *((f"ev_{d}", False) for d in range(partitions))])
    assert inherited == (parents,)
    assert refreshed == (views,)
    assert sessions is not None and sessions[0] < views, sessions


def assert_loaded_frozen(dsn: str, table: str) -> None:
    """Rows a restore created its table for arrive frozen (COPY FREEZE): every tuple on the
    first page has both HEAP_XMIN_COMMITTED and HEAP_XMIN_INVALID set (= frozen)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        masks = [r[0] for r in conn.execute(
            "SELECT t_infomask FROM heap_page_items(get_raw_page(%s, 0)) WHERE t_infomask IS NOT NULL",
            (table,))]
        conn.execute("DROP EXTENSION pageinspect")
    assert masks and all(m & 0x0300 == 0x0300 for m in masks), [hex(m) for m in masks[:5]]


def test_verify_detects_a_flipped_byte_and_restore_refuses_it(cli: Any, repo: str, backed_up: dict[str, Any],
                                                              empty_db: Any) -> None:
    assert cli.json("verify", "--repo", repo, "latest")["ok"] is True
    show = cli.json("show", "--repo", repo, backed_up["id"])
    victim = max((t for t in show["tables"] if t["object"]), key=lambda t: t["size_bytes"])
    data = bytearray(read_object(repo, victim["object"]))
    data[len(data) // 2] ^= 0x01
    write_object(repo, victim["object"], bytes(data))

    proc = cli("verify", "--repo", repo, "all", "--json")
    assert proc.returncode == 3
    report = proc.json()
    assert report["ok"] is False
    assert victim["object"] in " ".join(c["detail"] for c in report["checks"] if not c["ok"])

    restore = cli("restore", "full", "--repo", repo, "--target-dsn", empty_db.dsn)
    assert restore.returncode == 3, restore.stderr
    assert victim["object"] in one_line(restore)
    schema, _, table = victim["table"].partition(".")
    rows = empty_db.execute(f'SELECT count(*) FROM "{schema}"."{table}"')
    assert rows == [(0,)], "a corrupt object must never leave rows behind"


def test_damaged_manifest_is_reported_not_trusted(cli: Any, local_repo: str, seed_db: Any) -> None:
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn)
    key = f"manifests/{entry['id']}.json"
    write_object(local_repo, key, read_object(local_repo, key).replace(b'"rows": ', b'"rows": 1', 1))
    proc = cli("show", "--repo", local_repo, entry["id"])
    assert proc.returncode == 3
    assert "checksum" in one_line(proc)
    listed = cli("list", "--repo", local_repo, "--json")
    assert listed.returncode == 3 and listed.json() == []


def test_non_empty_target_is_refused_untouched(cli: Any, repo: str, backed_up: dict[str, Any],
                                               seed_copy: Callable[..., Any]) -> None:
    target = seed_copy("target")
    target.execute("UPDATE public.user_profiles SET full_name = 'changed' WHERE true")
    before = dbcompare.fingerprint(target.dsn)
    proc = cli("restore", "full", "--repo", repo, "--target-dsn", target.dsn)
    assert proc.returncode == 1
    assert "not empty" in one_line(proc)
    dbcompare.assert_same(before, dbcompare.fingerprint(target.dsn))


def test_missing_roles_are_reported_then_created(cli: Any, local_repo: str, seed_db: Any,
                                                 pg_cluster_factory: Callable[..., Any]) -> None:
    cli.json("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn)
    other = pg_cluster_factory()
    target = other.create_db("fresh")
    proc = cli("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn)
    assert proc.returncode == 1
    line = one_line(proc)
    assert "roles missing" in line and "authenticated" in line and "--with-roles" in line
    assert target.execute("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace") == [(0,)]
    result = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--with-roles")
    assert result["ok"] is True
    dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(target.dsn))


def test_validate_reports_damage_on_a_live_database(cli: Any, local_repo: str, seed_copy: Callable[..., Any]) -> None:
    db = seed_copy("live")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest")["ok"] is True
    db.execute("ALTER TABLE public.projects DISABLE ROW LEVEL SECURITY")
    db.execute("DELETE FROM public.achievements WHERE ctid = (SELECT min(ctid) FROM public.achievements)")
    db.execute("UPDATE public.crm_clients SET name = name || '!' WHERE ctid = (SELECT min(ctid) FROM public.crm_clients)")
    proc = cli("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", "latest", "--json")
    assert proc.returncode == 3
    failed = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
    assert "public.projects" in failed["rls_policies"]
    assert "public.achievements" in failed["row_counts"]
    assert "public.crm_clients" in failed["content_checksums"]
    assert "schema_matches" in failed


def test_validate_counts_orphans_of_not_valid_foreign_keys(cli: Any, seed_copy: Callable[..., Any]) -> None:
    db = seed_copy("orphans")
    with db.connect() as conn:
        fks = conn.execute("""
            SELECT conrelid::regclass::text, conname FROM pg_constraint
             WHERE contype = 'f' AND NOT convalidated""").fetchall()
    assert fks, "the seed must contain a NOT VALID foreign key"
    assert cli.json("validate", "--dsn", db.dsn)["ok"] is True
    alone = cli("validate", "--dsn", db.dsn)
    assert alone.returncode == 0 and alone.stdout.splitlines()[-1] == \
        "verdict: OK — consistent in itself; compared with no backup (--against ID|latest compares its contents)"
    table, name = fks[0]
    with db.connect() as conn:
        col, ref_table = conn.execute("""
            SELECT a.attname, confrelid::regclass::text FROM pg_constraint c
              JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
             WHERE conname = %s""", (name,)).fetchone()
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
        typ = conn.execute(f"SELECT pg_typeof({col})::text FROM {table} LIMIT 1").fetchone()
        orphan = "'00000000-0000-0000-0000-0000000000ff'" if typ and typ[0] == "uuid" else "987654321"
        conn.execute(f"UPDATE {table} SET {col} = {orphan} WHERE ctid = (SELECT min(ctid) FROM {table} WHERE {col} IS NOT NULL)")
        conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({col}) REFERENCES {ref_table} NOT VALID")
    proc = cli("validate", "--dsn", db.dsn, "--json")
    assert proc.returncode == 3
    detail = {c["name"]: c["detail"] for c in proc.json()["checks"]}["foreign_keys_hold"]
    assert name in detail and "(1)" in detail


def test_overlapping_backup_exits_4(cli: Any, local_repo: str, seed_db: Any) -> None:
    with seed_db.connect() as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                     (f"backup-tool:backup:{Path(local_repo).resolve()}:{seed_db.name}",))
        proc = cli("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn)
    assert proc.returncode == 4
    assert "another backup" in one_line(proc)
    assert cli.json("list", "--repo", local_repo) == []


def test_bad_inputs_exit_codes_and_one_line(cli: Any, local_repo: str, s3_server: Any, seed_db: Any,
                                            pg_server: Any, tmp_path: Path) -> None:
    password = pg_server.password
    wrong = seed_db.dsn.replace(password, "not-the-password-xyz")
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text("[retention]\nfull_days = -1\n")
    cases = [
        (["backup", "full", "--repo", local_repo, "--dsn", "postgresql://postgres:pw12345@127.0.0.1:1/x"], 1,
         "cannot connect"),
        (["backup", "full", "--repo", local_repo, "--dsn", wrong], 1, "password authentication failed"),
        (["backup", "full", "--repo", local_repo, "--dsn", pg_server.dsn("no_such_db")], 1, "does not exist"),
        (["backup", "full", "--repo", "s3://no-such-bucket-zz/p", "--dsn", seed_db.dsn], 1, "does not exist"),
        (["show", "--repo", local_repo, "20990101T000000Z-Fdead"], 1, "not found"),
        (["restore", "full", "--repo", local_repo, "--backup", "nope", "--target-dsn", seed_db.dsn], 1, "not found"),
        (["retention", "apply", "--dry-run", "--repo", local_repo, "--policy", str(bad_policy)], 2, "full_days"),
        (["list", "--repo", "ftp://x/y"], 2, "unsupported repository"),
        (["backup", "full", "--repo", local_repo, "--dsn", "host=127.0.0.1 port=notaport"], 1, ""),
        (["restore", "full", "--repo", local_repo], 2, ""),
    ]
    for args, code, needle in cases:
        proc = cli(*args)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        if needle:
            assert needle in one_line(proc), (args, proc.stderr)
        assert password not in proc.stdout + proc.stderr
        assert "pw12345" not in proc.stdout + proc.stderr
        assert "not-the-password-xyz" not in proc.stdout + proc.stderr


def test_secrets_never_reach_output_repository_or_argv(cli: Any, local_repo: str, seed_db: Any,
                                                       pg_server: Any, tmp_path: Path) -> None:
    password = pg_server.password
    procs = [cli("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn, "--debug"),
             cli("list", "--repo", local_repo, "--dsn", seed_db.dsn),
             cli("validate", "--repo", local_repo, "--dsn", seed_db.dsn, "--against", "latest")]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr
    for path in Path(local_repo).rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert password.encode() not in raw, path
            if path.suffix == ".zst":
                import zstandard
                assert password.encode() not in zstandard.ZstdDecompressor().decompressobj().decompress(raw), path
    # Paused inside the first table's stream: the backup and its COPY client are running, so
    # every argv it has is visible in /proc at that moment.
    flag = tmp_path / "pause-flag"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "backup_tool", "backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn],
        env={**cli.base_env(), "BACKUP_TOOL_TEST_PAUSE_AT": "backup:upload",
             "BACKUP_TOOL_TEST_PAUSE_FILE": str(flag)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    seen: dict[int, bytes] = {}
    try:
        for _ in range(6000):
            if flag.exists() or watcher.poll() is not None:
                break
            time.sleep(0.01)
        assert flag.exists(), "the backup never reached its first table stream"
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    seen[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    pass
        # A child caught between fork and exec shows its parent's argv for that instant; one
        # that still carries it a moment later is a process of ours that kept it.
        time.sleep(0.2)
        for pid in [pid for pid, c in seen.items() if password.encode() in c and pid != watcher.pid]:
            try:
                seen[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                seen.pop(pid)
    finally:
        flag.unlink(missing_ok=True)
        watcher.wait(timeout=300)
    assert watcher.returncode == 0
    assert b"backup_tool" in seen[watcher.pid] and password.encode() in seen[watcher.pid]
    # The user gave the password on our own command line; no process we start may carry it.
    assert not [c for pid, c in seen.items() if password.encode() in c and pid not in (watcher.pid, os.getpid())]


def test_backup_memory_stays_bounded(cli: Any, s3_repo: str, fresh_db: Callable[..., Any]) -> None:
    db = fresh_db("big")
    db.execute("CREATE TABLE wide AS SELECT g AS id, md5(g::text) || repeat(md5((g * 7)::text), 6) AS payload"
               " FROM generate_series(1, 400000) g")
    size = db.execute("SELECT pg_table_size('wide')")[0][0]
    assert size > 100 * 2**20
    probe = ("import resource, subprocess, sys; "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "backup_tool", "backup", "full",
                           "--repo", s3_repo, "--dsn", db.dsn], capture_output=True, text=True,
                          env=cli.base_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB for a {size / 2**20:.0f} MiB table"
