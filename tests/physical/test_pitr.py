"""Point-in-time recovery end to end: a real PostgreSQL 15 cluster archiving through
`backup-tool wal push %p` (run as the server's OS user), a base backup, three phases of
transactions with WAL switches, a recorded moment between phases, a disaster, then
recoveries to a time, a restore point, an LSN and the archive's end (following the timeline
a previous recovery created), tables as at a time, and refusals. Each recovered state is
compared with the state recorded at that moment by an independent fingerprint."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator

import clioutput
import dbcompare
import psycopg
import pytest
from server_tool import archive_settings, archiving_workspace
from support.cli import Cli
from support.clusters import PgServer, free_port, run_sql, start_pg_server, switch_and_wait_archived
from support.paths import SEED_FILES

pytestmark = pytest.mark.slow


@dataclass
class Scenario:
    server: PgServer
    repo: str
    base: Path
    cli: Cli
    backup: dict[str, Any]
    t1: str
    lsn1: str
    fp_rp: dict[str, Any]
    fp_t1: dict[str, Any]
    fp_after: dict[str, Any]
    recovered: list[Path] = field(default_factory=list)

    def dsn(self, port: int, db: str = "app") -> str:
        return f"postgresql://postgres:{self.server.password}@127.0.0.1:{port}/{db}"

    def pgdata(self) -> Path:
        path = self.server.make_user_dir()
        self.recovered.append(path)
        return path

    def stop_all(self) -> None:
        for path in self.recovered:
            if (path / "postmaster.pid").exists():
                self.server.run_as_os_user([self.server.bin_dir / "pg_ctl", "-D", path, "-m", "immediate",
                                            "stop"], check=False)


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    base, wrapper, repo = archiving_workspace("backup-tool-pitr-test-")
    server = start_pg_server(archive_settings(wrapper, repo))
    shutil.chown(repo, server.os_user, server.os_user)
    workdir = base / "cli"
    workdir.mkdir()
    cli = Cli(workdir=workdir)
    sc: Scenario | None = None
    try:
        server.create_db("app")
        server.load_sql("app", list(SEED_FILES))
        run_sql(server, "app", "CREATE TABLE ledger (id bigserial PRIMARY KEY, phase int NOT NULL, note text)")
        backup = cli.json("backup", "base", "--repo", str(repo), "--dsn", server.dsn("app"))

        run_sql(server, "app", "INSERT INTO ledger (phase, note) SELECT 1, 'one-' || g FROM generate_series(1, 300) g",
                "UPDATE coupons SET code = code || '-p1' WHERE ctid IN (SELECT ctid FROM coupons LIMIT 2)",
                "SELECT pg_create_restore_point('after_phase_one')")
        fp_rp = dbcompare.table_hashes(server.dsn("app"))
        switch_and_wait_archived(server)

        run_sql(server, "app", "INSERT INTO ledger (phase, note) SELECT 2, 'two-' || g FROM generate_series(1, 300) g",
                "DELETE FROM ledger WHERE phase = 1 AND id % 10 = 0")
        time.sleep(0.3)
        t1, lsn1 = run_sql(server, "app", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                                   "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), pg_current_wal_insert_lsn()::text")
        fp_t1 = dbcompare.fingerprint(server.dsn("app"))
        time.sleep(0.3)

        run_sql(server, "app", "INSERT INTO ledger (phase, note) SELECT 3, 'three-' || g FROM generate_series(1, 300) g",
                "UPDATE ledger SET note = note || ' (edited)' WHERE phase = 2")
        switch_and_wait_archived(server)
        run_sql(server, "app", "DELETE FROM ledger", "DROP TABLE coupons CASCADE")
        switch_and_wait_archived(server)
        fp_after = dbcompare.table_hashes(server.dsn("app"))
        sc = Scenario(server, str(repo), base, cli, backup, t1, lsn1, fp_rp, fp_t1, fp_after)
        yield sc
    finally:
        if sc is not None:
            sc.stop_all()
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def first_recovery(scenario: Scenario) -> tuple[Path, int, dict[str, Any]]:
    """PITR to the recorded time with archiving kept on: the new timeline goes to the repository."""
    pgdata, port = scenario.pgdata(), free_port()
    result = scenario.cli.json("restore", "pitr", "--repo", scenario.repo, "--target-time", scenario.t1,
                               "--pgdata", pgdata, "--port", str(port), "--database", "app")
    return pgdata, port, result


def test_base_backup_is_listed_with_its_wal_range(scenario: Scenario) -> None:
    entry = scenario.backup
    assert entry["kind"] == "base" and entry["parent_id"] is None and entry["size_bytes"] > 0
    assert entry["timeline"] == 1 and entry["checkpoint"] == "fast" and entry["method"] == "direct"
    assert entry["start_lsn"] and entry["stop_lsn"]
    listed = scenario.cli.json("list", "--repo", scenario.repo)
    assert [(e["id"], e["kind"]) for e in listed] == [(entry["id"], "base")]
    health = scenario.cli.json("wal", "status", "--repo", scenario.repo)
    assert health["gaps"] == [] and health["segments"] >= 4 and health["timelines"][0] == 1


def test_pitr_to_time_gives_exactly_that_moment(scenario: Scenario,
                                                first_recovery: tuple[Path, int, dict[str, Any]]) -> None:
    pgdata, port, result = first_recovery
    assert result["ok"] is True and result["backup_id"] == scenario.backup["id"]
    assert "app" in result["databases"] and result["backup_finished_at"] == scenario.backup["finished_at"]
    assert result["recovered_to"]["timeline"] == 2
    assert result["recovered_to"]["stop_reason"].startswith("recovery stopping before commit")
    assert {c["name"] for c in result["validation"]["checks"]} >= {"app: foreign_keys_hold", "app: indexes_valid",
                                                                    "app: sequences_not_behind"}
    conf = (pgdata / "postgresql.auto.conf").read_text()
    assert "recovery_target_time = '" in conf and "T" not in conf.split("recovery_target_time = '")[1][:20]
    restored = dbcompare.fingerprint(scenario.dsn(port))
    dbcompare.assert_same(scenario.fp_t1, restored, ignore=("sequences",))
    dbcompare.assert_sequences_not_behind(scenario.fp_t1, restored)


def test_pitr_to_restore_point_and_lsn(scenario: Scenario) -> None:
    pgdata, port = scenario.pgdata(), free_port()
    by_name = scenario.cli.json("restore", "pitr", "--repo", scenario.repo, "--target-name", "after_phase_one",
                                "--pgdata", pgdata, "--port", str(port), "--no-archive", "--no-validate")
    assert 'restore point "after_phase_one"' in by_name["recovered_to"]["stop_reason"]
    assert dbcompare.table_hashes(scenario.dsn(port)) == scenario.fp_rp

    pgdata, port = scenario.pgdata(), free_port()
    by_lsn = scenario.cli.json("restore", "pitr", "--repo", scenario.repo, "--target-lsn", scenario.lsn1,
                               "--pgdata", pgdata, "--port", str(port), "--no-archive", "--no-validate")
    assert "WAL location" in by_lsn["recovered_to"]["stop_reason"]
    assert dbcompare.table_hashes(scenario.dsn(port)) == scenario.fp_t1["tables"]


def test_second_recovery_follows_the_promoted_timeline(scenario: Scenario,
                                                       first_recovery: tuple[Path, int, dict[str, Any]]) -> None:
    _, port, _ = first_recovery
    with psycopg.connect(scenario.dsn(port), autocommit=True) as conn:
        conn.execute("INSERT INTO ledger (phase, note) VALUES (7, 'written on timeline 2')")
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < last:
            assert time.monotonic() < deadline, "timeline 2 was not archived"
            time.sleep(0.1)
    expected = dbcompare.table_hashes(scenario.dsn(port))
    health = scenario.cli.json("wal", "status", "--repo", scenario.repo)
    assert 2 in health["timelines"] and health["gaps"] == []

    pgdata, port2 = scenario.pgdata(), free_port()
    result = scenario.cli.json("restore", "pitr", "--repo", scenario.repo, "--latest", "--pgdata", pgdata,
                               "--port", str(port2), "--no-archive")
    assert result["ok"] is True and result["recovered_to"]["timeline"] == 3
    assert dbcompare.table_hashes(scenario.dsn(port2)) == expected
    # restore pitr itself read the WAL ahead of recovery: the segments it replayed were waiting
    assert result["wal_prefetched"] > 0


def test_tables_at_a_time_beside_the_live_ones(scenario: Scenario) -> None:
    leftovers = set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*"))
    result = scenario.cli.json("restore", "tables", "--repo", scenario.repo, "--tables", "public.ledger",
                               "--target-time", scenario.t1, "--target-dsn", scenario.server.dsn("app"),
                               "--into-schema", "as_of_t1")
    assert result["ok"] is True
    bases = [e["id"] for e in scenario.cli.json("list", "--repo", scenario.repo) if e["kind"] == "base"]
    assert (result["database"], result["snapshot_at"]) == ("app", scenario.t1.replace(".000000Z", "Z"))
    assert result["backup_id"] in bases
    now = dbcompare.table_hashes(scenario.server.dsn("app"))
    assert now['as_of_t1.ledger'] == scenario.fp_t1["tables"]["public.ledger"]
    assert {k: v for k, v in now.items() if not k.startswith("as_of_t1.")} == scenario.fp_after
    assert set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*")) - leftovers == set()
    run_sql(scenario.server, "app", "DROP SCHEMA as_of_t1 CASCADE")


def test_targets_outside_the_archive_are_refused(scenario: Scenario) -> None:
    cli, repo = scenario.cli, scenario.repo
    for args, words in (
        (["--target-time", "2001-01-01T00:00:00Z"], ["covers", "before the oldest base backup"]),
        (["--target-time", "2099-01-01T00:00:00Z"], ["covers", "not archived yet"]),
        (["--target-lsn", "FF/0"], ["covers LSN"]),
        (["--target-name", "no_such_point"], ["not found in the archived WAL"]),
        (["--latest", "--database", "shop"], ["no base backup", "holding database 'shop'"]),
    ):
        pgdata = scenario.pgdata()
        proc = cli("restore", "pitr", "--repo", repo, *args, "--pgdata", pgdata, "--port", str(free_port()))
        assert proc.returncode == 1, proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr
        assert list(pgdata.iterdir()) == []
    taken = cli("restore", "pitr", "--repo", repo, "--latest", "--pgdata", scenario.pgdata(),
                "--port", str(scenario.server.port))
    assert taken.returncode == 1 and "already in use" in taken.stderr
    busy = scenario.pgdata()
    (busy / "PG_VERSION").write_text("15\n")
    proc = cli("restore", "pitr", "--repo", repo, "--latest", "--pgdata", busy)
    assert proc.returncode == 1 and "not empty" in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["PG_VERSION"]
    usage = cli("restore", "pitr", "--repo", repo, "--latest", "--target-time", scenario.t1, "--pgdata", busy)
    assert usage.returncode == 2


def test_damaged_archive_never_reaches_postgres(scenario: Scenario) -> None:
    """A corrupt segment stops recovery with the reason; a missing one is refused up front."""
    copy = scenario.server.make_user_dir("repo-copy")
    copy.rmdir()
    shutil.copytree(scenario.repo, copy)
    subprocess.run(["chown", "-R", f"{scenario.server.os_user}:", str(copy)], check=True)
    target_seg = subprocess.run(["ls", copy / "wal" / "0000000100000000"], capture_output=True, text=True,
                                check=True).stdout.split()
    seg_of_t1 = next(k for k in target_seg if k.startswith(_segment_of(scenario.lsn1)))
    path = copy / "wal" / "0000000100000000" / seg_of_t1
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x55
    path.write_bytes(bytes(data))

    pgdata = scenario.pgdata()
    proc = scenario.cli("restore", "pitr", "--repo", str(copy), "--target-time", scenario.t1, "--pgdata", pgdata,
                        "--port", str(free_port()), "--no-archive", "--target-timeline", "1")
    assert proc.returncode == 1, proc.stderr
    assert "corrupt" in proc.stderr and seg_of_t1[:24] in proc.stderr
    assert not (pgdata / "postmaster.pid").exists()

    tables = scenario.cli("restore", "tables", "--repo", str(copy), "--tables", "public.ledger", "--target-time",
                          scenario.t1, "--target-dsn", scenario.server.dsn("app"), "--into-schema", "never_made")
    assert tables.returncode == 1, tables.stderr
    kept = re.search(r"the server log is kept at (\S+\.log)$", clioutput.only_line(tables))
    assert kept and "corrupt" in tables.stderr, tables.stderr
    log = Path(kept.group(1))
    assert "corrupt" in log.read_text() and "backup-tool-tables-at-" not in kept.group(1)
    log.unlink()

    path.unlink()
    pgdata = scenario.pgdata()
    proc = scenario.cli("restore", "pitr", "--repo", str(copy), "--target-time", scenario.t1, "--pgdata", pgdata,
                        "--no-archive", "--target-timeline", "1")
    assert proc.returncode == 1 and "gap" in proc.stderr and seg_of_t1[:24] in proc.stderr
    assert list(pgdata.iterdir()) == []


def test_a_damaged_base_backup_frame_stops_the_lay_out_and_leaves_nothing(scenario: Scenario) -> None:
    """The parallel lay-out checks every frame against the index before its bytes count: a
    flipped byte fails the restore naming the frame, and --pgdata is left empty."""
    copy = scenario.server.make_user_dir("repo-damaged-base")
    copy.rmdir()
    shutil.copytree(scenario.repo, copy)
    subprocess.run(["chown", "-R", f"{scenario.server.os_user}:", str(copy)], check=True)
    tar = copy / "backups" / scenario.backup["id"] / "base.tar.zst"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x55
    tar.write_bytes(bytes(data))
    pgdata = scenario.pgdata()
    proc = scenario.cli("restore", "pitr", "--repo", str(copy), "--latest", "--pgdata", pgdata, "--no-start")
    assert proc.returncode == 3, proc.stderr
    assert re.search(r"base\.tar\.zst is corrupt at frame \d+", proc.stderr), proc.stderr
    assert list(pgdata.iterdir()) == []


def _segment_of(lsn: str) -> str:
    hi, lo = (int(x, 16) for x in lsn.split("/"))
    return f"00000001{hi:08X}{(lo >> 24):08X}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tables_at_a_time_cleans_up_when_interrupted(scenario: Scenario, sig: signal.Signals) -> None:
    before = set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*"))
    argv = [*scenario.cli.command, "restore", "tables", "--repo", scenario.repo, "--tables", "public.ledger",
            "--target-time", scenario.t1, "--target-dsn", scenario.server.dsn("app"), "--into-schema", "never"]
    proc = subprocess.Popen(argv, env=scenario.cli.base_env(), cwd=scenario.cli.workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        running: list[Path] = []
        while not running:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary cluster never started"
            running = [p for p in set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*")) - before
                       if (p / "data" / "postmaster.pid").exists()]
            time.sleep(0.05)
        pid_line = (running[0] / "data" / "postmaster.pid").read_text().splitlines()[0]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    assert not running[0].exists(), "temporary directory left behind"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid_line}").exists():
        status = Path(f"/proc/{pid_line}/status").read_text() if Path(f"/proc/{pid_line}/status").exists() else ""
        assert time.monotonic() < deadline, f"temporary server left running: {status[:200]} {err[-2000:]}"
        time.sleep(0.1)
    with psycopg.connect(scenario.server.dsn("app")) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'never'").fetchone() == (0,)


def test_check_reports_archiving_health(scenario: Scenario, tmp_path: Path) -> None:
    """check: archive_command pushes to this repository, no archiver failure, no gap, fresh WAL."""
    report = scenario.cli.json("check", "--repo", scenario.repo, "--dsn", scenario.server.dsn("app"))
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("archive_command", "archiver_failures", "archive_destination", "wal_continuity", "wal_newest_age"):
        assert checks[name]["ok"] is True, checks[name]
    other = tmp_path / "other-repo"
    other.mkdir()
    proc = scenario.cli("check", "--repo", str(other), "--dsn", scenario.server.dsn("app"), "--json")
    assert proc.returncode == 3
    bad = {c["name"]: c["detail"] for c in proc.json()["checks"] if not c["ok"]}
    assert "another repository" in bad["archive_destination"]


def test_a_time_whose_next_commit_is_not_archived_is_refused_before_anything_is_written(scenario: Scenario) -> None:
    """Issue 13: after T one large transaction fills segments that are archived, but its commit
    (the first after T) sits in the current, unarchived segment. Recovery to T cannot stop
    there yet: both restore commands refuse up front, naming the remedy; with --wait the
    table restore succeeds once the source switches WAL, and says the moment it recovered."""
    server, cli, repo = scenario.server, scenario.cli, scenario.repo
    with server.admin_conn() as conn:
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("SELECT pg_reload_conf()")
    switch_and_wait_archived(server)
    with server.admin_conn() as conn, server.admin_conn() as watch:
        target = conn.execute("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
                              "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").fetchone()[0]
        time.sleep(0.3)
        with conn.transaction():
            conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 90000) g")
            filled = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
            deadline = time.monotonic() + 60
            while (watch.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < \
                    f"{filled[:16]}{int(filled[16:], 16) - 1:08X}":
                assert time.monotonic() < deadline, "the filled segments were not archived"
                time.sleep(0.1)
    leftovers = set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*"))
    try:
        started = time.monotonic()
        refused = cli("restore", "tables", "--repo", repo, "--tables", "public.ledger", "--target-time", target,
                      "--target-dsn", server.dsn("app"), "--into-schema", "as_of_wait")
        assert refused.returncode == 1, refused.stderr
        line = clioutput.only_line(refused)
        assert "no commit after it is archived" in line and "pg_switch_wal()" in line and "--wait" in line, line
        assert "archive_timeout" in line and time.monotonic() - started < 30
        assert set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*")) - leftovers == set()
        pgdata = scenario.pgdata()
        refused = cli("restore", "pitr", "--repo", repo, "--target-time", target, "--pgdata", pgdata,
                      "--port", str(free_port()), "--no-archive")
        assert refused.returncode == 1 and "pg_switch_wal()" in clioutput.only_line(refused), refused.stderr
        assert list(pgdata.iterdir()) == []

        argv = [*cli.command, "restore", "tables", "--repo", repo, "--tables", "public.ledger", "--target-time",
                target, "--target-dsn", server.dsn("app"), "--into-schema", "as_of_wait", "--wait", "120"]
        proc = subprocess.Popen(argv, env=cli.base_env(), cwd=cli.workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2)
            assert proc.poll() is None, proc.communicate()
            assert set(Path(tempfile.gettempdir()).glob("backup-tool-tables-at-*")) - leftovers == set()
            switch_and_wait_archived(server)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
        m = re.match(r"restored public\.ledger as of (\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d\.\d\d) UTC "
                     r"\(last commit before (\d\d:\d\d:\d\d(?:\.\d+)?)\) into ", out)
        assert m, out
        recovered = datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}+00:00")
        at = datetime.fromisoformat(target.replace("Z", "+00:00"))
        assert m.group(3) == at.strftime("%H:%M:%S.%f").rstrip("0").rstrip(".")
        assert at - timedelta(minutes=5) < recovered <= at
        assert "verdict: OK" in out
        now = dbcompare.table_hashes(server.dsn("app"))
        assert now["as_of_wait.ledger"] == now["public.ledger"]
    finally:
        run_sql(server, "app", "DROP SCHEMA IF EXISTS as_of_wait CASCADE")
        with server.admin_conn() as conn:
            conn.execute("DROP TABLE IF EXISTS filler")
            conn.execute("ALTER SYSTEM RESET autovacuum")
            conn.execute("SELECT pg_reload_conf()")


def test_tables_at_a_time_into_the_live_table_are_validated_against_the_recovered_rows(scenario: Scenario) -> None:
    """Without --into-schema the rows at the time go into the live table (emptied since) or
    over it (--replace), copied straight from the recovered cluster. The verdict compares
    them with that cluster's rows at the time: when the live table's note column became
    char(20) since, every copied note is padded, and the restore exits 3 naming the table."""
    server, cli = scenario.server, scenario.cli
    argv = ["restore", "tables", "--repo", scenario.repo, "--tables", "public.ledger", "--target-time", scenario.t1,
            "--target-dsn", server.dsn("app")]
    run_sql(server, "app", "ALTER TABLE ledger ALTER COLUMN note TYPE char(20)")
    try:
        padded = cli(*argv, "--json")
        assert padded.returncode == 3, padded.stderr
        assert "public.ledger" in clioutput.only_line(padded)
        report = padded.json()
        assert report["mode"] == "restore" and report["ok"] is False
        failed = {c["name"]: c["detail"] for c in report["validation"]["checks"] if not c["ok"]}
        assert set(failed) == {"content_checksums"} and "public.ledger" in failed["content_checksums"]

        refused = cli(*argv)
        assert refused.returncode == 1 and "not empty" in clioutput.only_line(refused), refused.stderr

        run_sql(server, "app", "ALTER TABLE ledger ALTER COLUMN note TYPE text")
        replaced = cli.json(*argv, "--replace")
        assert replaced["ok"] is True and replaced["mode"] == "replace"
        assert replaced["rows"] == scenario.fp_t1["tables"]["public.ledger"]["rows"]
        assert dbcompare.table_hashes(server.dsn("app"))["public.ledger"] == scenario.fp_t1["tables"]["public.ledger"]
    finally:
        run_sql(server, "app", "ALTER TABLE ledger ALTER COLUMN note TYPE text", "TRUNCATE ledger")
