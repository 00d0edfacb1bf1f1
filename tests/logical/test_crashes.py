"""Crashes, signals, interrupted restores and overlapping runs, through the real CLI.

Commands are stopped at named moments with the test-only pause points of
``backup_tool/core/testhooks.py`` (``BACKUP_TOOL_TEST_PAUSE_AT``), then killed with SIGKILL,
interrupted with SIGINT sent to their process group (a terminal's Ctrl-C) or SIGTERM (what
systemd and cron send), or let go. What must hold afterwards: no listed partial backup, the
garbage invisible to list/show/restore, the next run succeeding, no unfinished multipart
upload or temporary file after a signal, the lock released, an interrupted restore clearly
marked unfinished and finished by ``--restart-unfinished``, and overlapping backups
serialised by the lock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import dbcompare
import pytest
from clioutput import add_bulk, one_line
from server_tool import install_source, write_wrapper
from support.clusters import PgServer, start_pg_server

from backup_tool.physical.wal import segment_name, segment_number

pytestmark = pytest.mark.slow

MULTIPART_PAUSE = str(9 << 20)


# ------------------------------------------------------------------------ helpers


@dataclass
class Running:
    """A CLI process started in its own session (process group = its pid)."""

    proc: subprocess.Popen[bytes]
    flag: Path
    out: Path
    err: Path

    def wait_paused(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before pausing:\n{self.stderr()}")
            assert time.monotonic() < deadline, f"never paused:\n{self.stderr()}"
            time.sleep(0.05)

    def resume(self) -> None:
        self.flag.unlink()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")


@pytest.fixture
def start(cli: Any, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``start(*args, pause_at=POINT, env={...})``: run the CLI in the background."""
    started: list[Running] = []

    def run(*args: str, pause_at: str | None = None, env: dict[str, str] | None = None) -> Running:
        n = len(started)
        flag = tmp_path / f"paused-{n}"
        full_env = {**cli.base_env(), **(env or {})}
        if pause_at:
            full_env.update(BACKUP_TOOL_TEST_PAUSE_AT=pause_at, BACKUP_TOOL_TEST_PAUSE_FILE=str(flag))
        out, err = tmp_path / f"out-{n}", tmp_path / f"err-{n}"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "backup_tool", *args], env=full_env, cwd=cli.workdir,
                                    stdin=subprocess.DEVNULL, stdout=o, stderr=e, start_new_session=True)
        running = Running(proc, flag, out, err)
        started.append(running)
        return running

    yield run
    for r in started:
        if r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait(30)


def s3_parts(repo: str) -> tuple[Any, str, str]:
    bucket, _, prefix = repo[5:].partition("/")
    return boto3.client("s3"), bucket, prefix.strip("/") + "/"


def keys(repo: str, under: str = "") -> list[str]:
    if repo.startswith("s3://"):
        client, bucket, prefix = s3_parts(repo)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + under)
        return sorted(o["Key"][len(prefix):] for p in pages for o in p.get("Contents", []))
    root = Path(repo)
    return sorted(p.relative_to(root).as_posix() for p in (root / under).rglob("*") if p.is_file()) \
        if (root / under).exists() else []


def unfinished_uploads(repo: str) -> list[str]:
    if repo.startswith("s3://"):
        client, bucket, prefix = s3_parts(repo)
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]
    return [k for k in keys(repo) if ".partial-" in k]


def listed(cli: Any, repo: str) -> list[str]:
    return [e["id"] for e in cli.json("list", "--repo", repo)]


def running_ids(repo: str) -> list[str]:
    return [k[len("running/"):-len(".json")] for k in keys(repo, "running/")]


def other_sessions(db: Any) -> list[str]:
    return [r[0] for r in db.execute("SELECT coalesce(query, '') FROM pg_stat_activity "
                                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")]


def wait_no_sessions(db: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (left := other_sessions(db)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"sessions left behind: {left}"


# ------------------------------------------------------------------------ kill -9 of backups


CRASH_POINTS = {
    "s3": [("full", "backup:upload"), ("full", "backup:before-manifest"),
           ("incremental", "backup:upload"), ("incremental", "backup:between-objects")],
    "local": [("full", "backup:between-objects"), ("incremental", "backup:before-manifest")],
}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_kill_9_leaves_only_invisible_garbage_and_the_next_run_succeeds(
        where: str, request: pytest.FixtureRequest, cli: Any, start: Callable[..., Running],
        seed_copy: Callable[..., Any], fresh_db: Callable[..., Any]) -> None:
    repo = str(request.getfixturevalue(f"{where}_repo"))
    db = seed_copy("crash")
    add_bulk(db)
    common = ["--repo", repo, "--dsn", db.dsn, "--jobs", "1"]
    first = cli.json("backup", "full", *common)["id"]
    garbage: list[str] = []
    for n, (kind, point) in enumerate(CRASH_POINTS[where]):
        db.execute("UPDATE public.bulk SET payload = md5(payload) WHERE id = %s", (n + 1,))
        env = {"BACKUP_TOOL_TEST_PAUSE_AFTER_BYTES": MULTIPART_PAUSE} if point == "backup:upload" and where == "s3" else {}
        run = start("backup", kind, *common, pause_at=point, env=env)
        run.wait_paused()
        new = [i for i in running_ids(repo) if i not in garbage]
        assert len(new) == 1, (kind, point, running_ids(repo))
        if point == "backup:upload":
            assert unfinished_uploads(repo), f"{kind}/{point}: expected an upload in flight"
        if point == "backup:before-manifest":
            assert keys(repo, f"backups/{new[0]}/data/"), "all objects are written by now"
        run.kill9()
        garbage += new
        assert listed(cli, repo) == [first], (kind, point)

    assert keys(repo, "backups/") and set(garbage) <= set(running_ids(repo))
    assert cli("show", "--repo", repo, garbage[-1]).returncode == 1
    assert cli("restore", "full", "--repo", repo, "--backup", garbage[-1], "--target-dsn", db.dsn).returncode == 1
    after = cli.json("backup", "incremental", *common, "--lock-timeout", "30")
    assert after["kind"] == "incremental" and after["parent_id"] == first
    assert listed(cli, repo) == [first, after["id"]]
    assert cli.json("verify", "--repo", repo, "all")["ok"] is True
    target = fresh_db("after_crash")
    assert cli.json("restore", "full", "--repo", repo, "--target-dsn", target.dsn)["ok"] is True
    assert dbcompare.table_hashes(db.dsn) == dbcompare.table_hashes(target.dsn)


def test_kill_9_of_base_backup_and_wal_push(cli: Any, start: Callable[..., Running]) -> None:
    """A real cluster archiving through `wal push`: kill -9 mid-upload and after the upload but
    before the acknowledgement; PostgreSQL retries and every segment it counts as archived is in
    the repository, byte-identical. Then kill -9 of `backup base` mid-stream and before its
    manifest: nothing listed, and the next base backup succeeds."""
    base = Path(tempfile.mkdtemp(prefix="backup-tool-crash-test-", dir="/tmp"))
    base.chmod(0o755)
    server: PgServer | None = None
    try:
        source = install_source(base / "src")
        repo = base / "repo"
        repo.mkdir()
        plain = write_wrapper(base / "bin" / "backup-tool", source)
        flagdir = base / "flags"
        flagdir.mkdir(mode=0o777)
        flagdir.chmod(0o777)
        pausing = {point: write_wrapper(base / "bin" / f"backup-tool-{point.replace(':', '-')}", source,
                                        {"BACKUP_TOOL_TEST_PAUSE_AT": point,
                                         "BACKUP_TOOL_TEST_PAUSE_FILE": str(flagdir / point.replace(":", "-"))})
                   for point in ("wal:upload", "wal:before-ack")}
        server = start_pg_server({"archive_mode": "on",
                                  "archive_command": f"{plain} wal push %p --batch 1 --repo {repo}"})
        shutil.chown(repo, server.os_user, server.os_user)
        srv = server

        def archiver(wrapper: Path) -> None:
            # "|| exit 1": a killed archive_command then reads as an ordinary failure, retried
            # within a second, rather than one that makes the archiver restart (10 s later).
            srv.set_config(archive_command=f"{wrapper} wal push %p --batch 1 --repo {repo} || exit 1")

        def switch() -> str:
            with srv.admin_conn() as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS t (id serial, v text)")
                conn.execute("INSERT INTO t (v) SELECT md5(g::text) FROM generate_series(1, 2000) g")
                name = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
                conn.execute("SELECT pg_switch_wal()")
            return str(name)

        def archived() -> tuple[str, int]:
            with srv.admin_conn() as conn:
                row = conn.execute("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver").fetchone()
            return str(row[0]), int(row[1])

        def in_repo(name: str) -> list[str]:
            return [k for k in keys(str(repo), "wal/") if k.split("/")[-1].startswith(name + "-")]

        settled = switch()
        deadline = time.monotonic() + 60
        while archived()[0] < settled:
            assert time.monotonic() < deadline, f"archiving does not work: see {srv.log_file}"
            time.sleep(0.1)
        for point in ("wal:upload", "wal:before-ack"):
            archiver(pausing[point])
            segment = switch()
            flag = flagdir / point.replace(":", "-")
            deadline = time.monotonic() + 60
            while not flag.exists():
                assert time.monotonic() < deadline, f"archive_command never paused at {point}"
                time.sleep(0.05)
            assert archived()[0] < segment, "not acknowledged while the push is still running"
            assert bool(in_repo(segment)) == (point == "wal:before-ack"), keys(str(repo))
            os.kill(int(flag.read_text()), signal.SIGKILL)
            flag.unlink()
            archiver(plain)
            deadline = time.monotonic() + 60
            while archived()[0] < segment:
                assert time.monotonic() < deadline, f"{segment} never archived after the crash: see {srv.log_file}"
                time.sleep(0.1)
            assert len(in_repo(segment)) == 1
            fetched = base / f"fetched-{segment}"
            assert cli("wal", "fetch", segment, str(fetched), "--repo", str(repo)).returncode == 0
            wal_file = srv.data_dir / "pg_wal" / segment
            if wal_file.exists():
                assert fetched.read_bytes() == wal_file.read_bytes()
        last, failures = archived()
        assert failures >= 2
        stored = {k.split("/")[-1].split("-")[0] for k in keys(str(repo), "wal/")}
        acknowledged = [segment_name(1, n) for n in range(1, segment_number(last) + 1)]
        assert [name for name in acknowledged if name not in stored] == [], \
            "every segment PostgreSQL counts as archived is in the repository"

        dsn = srv.dsn()
        for point in ("base:upload", "base:before-manifest"):
            run = start("backup", "base", "--fast-checkpoint", "--repo", str(repo), "--dsn", dsn, pause_at=point)
            run.wait_paused()
            run.kill9()
            assert cli.json("list", "--repo", str(repo)) == []
        entry = cli.json("backup", "base", "--fast-checkpoint", "--repo", str(repo), "--dsn", dsn)
        assert [e["id"] for e in cli.json("list", "--repo", str(repo))] == [entry["id"]]
        assert cli.json("verify", "--repo", str(repo), "all")["ok"] is True
    finally:
        if server is not None:
            server.destroy()
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------ signals


def test_ctrl_c_to_the_process_group_aborts_cleanly(cli: Any, start: Callable[..., Running], s3_repo: str,
                                                    fresh_db: Callable[..., Any], tmp_path: Path) -> None:
    db = fresh_db("sigint")
    add_bulk(db)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = start("backup", "full", "--repo", s3_repo, "--dsn", db.dsn, "--jobs", "1", pause_at="backup:upload",
                env={"BACKUP_TOOL_TEST_PAUSE_AFTER_BYTES": MULTIPART_PAUSE, "TMPDIR": str(scratch)})
    run.wait_paused()
    assert unfinished_uploads(s3_repo) and running_ids(s3_repo)
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(60) == 130
    assert "interrupted" in one_line(run.stderr())
    assert unfinished_uploads(s3_repo) == [], "the multipart upload must be aborted"
    assert keys(s3_repo) == [], "objects, running marker: all removed"
    assert list(scratch.iterdir()) == []
    wait_no_sessions(db)
    started = time.monotonic()
    assert cli.json("backup", "full", "--repo", s3_repo, "--dsn", db.dsn)["kind"] == "full"
    assert time.monotonic() - started < 60


def test_sigterm_aborts_backup_and_restore_cleanly(cli: Any, start: Callable[..., Running], local_repo: str,
                                                   seed_copy: Callable[..., Any], fresh_db: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    db = seed_copy("sigterm")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = start("backup", "full", "--repo", local_repo, "--dsn", db.dsn, "--jobs", "1",
                pause_at="backup:between-objects", env={"TMPDIR": str(scratch)})
    run.wait_paused()
    assert keys(local_repo, "backups/")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(60) == 1
    assert "interrupted" in one_line(run.stderr())
    assert keys(local_repo) == [] and list(scratch.iterdir()) == []
    wait_no_sessions(db)
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)

    target = fresh_db("sigterm_target")
    run = start("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--jobs", "1",
                pause_at="restore:loading", env={"TMPDIR": str(scratch)})
    run.wait_paused()
    assert list(scratch.iterdir()), "the restore keeps its schema archive in a temporary directory"
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(60) == 1
    assert list(scratch.iterdir()) == []
    wait_no_sessions(target)
    proc = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], "--json")
    assert proc.returncode == 3
    assert not {c["name"]: c["ok"] for c in proc.json()["checks"]}["restore_finished"]


def test_sigterm_during_parallel_table_loads_leaves_the_target_as_it_was(
        cli: Any, start: Callable[..., Running], local_repo: str, seed_copy: Callable[..., Any]) -> None:
    """``restore tables`` of two dropped tables by two sessions, stopped by SIGTERM once one
    table is loaded and committed, then again with its control session terminated at that
    moment: each time the tables it created are dropped again (in a new session when its own
    is lost) and the target dumps as before the command."""
    db = seed_copy("sigterm_tables")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DROP TABLE public.email_logs, analytics.\"feature usage\"")
    before = dbcompare.fingerprint(db.dsn)
    run = start("restore", "tables", "--repo", local_repo, "--target-dsn", db.dsn, "--jobs", "2",
                "--tables", 'public.email_logs,analytics."feature usage"', pause_at="tables:loaded")
    run.wait_paused()
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relname IN ('email_logs', 'feature usage')") == 2
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(60) == 1
    assert "interrupted" in one_line(run.stderr())
    wait_no_sessions(db)
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))

    run = start("restore", "tables", "--repo", local_repo, "--target-dsn", db.dsn, "--jobs", "2",
                "--tables", 'public.email_logs,analytics."feature usage"', pause_at="tables:loaded")
    run.wait_paused()
    assert db.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'"
                     " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())") == 1
    run.resume()
    assert run.finish(60) == 1, run.stderr()
    assert "Traceback" not in run.stderr() and run.stderr().count("\n") == 1, run.stderr()
    wait_no_sessions(db)
    dbcompare.assert_same(before, dbcompare.fingerprint(db.dsn))


# ------------------------------------------------------------------------ interrupted restore


def test_interrupted_restore_is_marked_and_a_rerun_finishes_it(cli: Any, start: Callable[..., Running],
                                                               local_repo: str, seed_db: Any,
                                                               fresh_db: Callable[..., Any]) -> None:
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn)
    target = fresh_db("interrupted")
    run = start("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--jobs", "1",
                pause_at="restore:loading")
    run.wait_paused()
    run.kill9()
    wait_no_sessions(target)

    marker = target.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace "
                            "WHERE nspname = 'backup_tool_unfinished_restore'")
    assert marker and marker[0][0].startswith(f"in-progress:{entry['id']}")
    proc = cli("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], "--json")
    assert proc.returncode == 3
    checks = {c["name"]: c for c in proc.json()["checks"]}
    assert not checks["restore_finished"]["ok"] and "--restart-unfinished" in checks["restore_finished"]["detail"]
    check = cli("check", "--repo", local_repo, "--dsn", target.dsn, "--json")
    assert check.returncode == 3
    assert not {c["name"]: c["ok"] for c in check.json()["checks"]}["restore_finished"]

    before = dbcompare.table_hashes(target.dsn)
    refused = cli("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn)
    assert refused.returncode == 1
    line = one_line(refused.stderr)
    assert "unfinished restore" in line and "--restart-unfinished" in line
    assert dbcompare.table_hashes(target.dsn) == before, "a refusal touches nothing"

    result = cli.json("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--restart-unfinished")
    assert result["ok"] is True
    assert {c["name"]: c["ok"] for c in result["validation"]["checks"]}["restore_finished"] is True
    dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(target.dsn))

    complete = dbcompare.fingerprint(target.dsn)
    again = cli("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--restart-unfinished")
    assert again.returncode == 1 and "not empty" in one_line(again.stderr)
    dbcompare.assert_same(complete, dbcompare.fingerprint(target.dsn))


def test_a_row_changed_between_loading_and_checksum_fails_validation_naming_its_table(
        cli: Any, start: Callable[..., Running], local_repo: str, seed_db: Any, fresh_db: Callable[..., Any]) -> None:
    """The checksum a loading session takes right after a table's rows (before building that
    table's indexes) reads what the table holds then: a row altered in between (by anything)
    fails ``content_checksums`` naming the table, though every other table and check passes."""
    cli.json("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn)
    target = fresh_db("altered")
    run = start("restore", "full", "--repo", local_repo, "--target-dsn", target.dsn, "--jobs", "1", "--json",
                pause_at="restore:loaded")
    run.wait_paused()
    loaded = [r for r in target.execute("""
        SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname), quote_ident(a.attname)
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relkind = 'r' AND pg_relation_size(c.oid) > 0 AND a.atttypid IN ('text'::regtype, 'varchar'::regtype)
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'backup_tool_unfinished_restore')
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'c'
                                                            AND a.attnum = ANY(k.conkey))
         ORDER BY a.attnum""")]
    assert loaded, "the first table's rows are committed when the loading session pauses"
    table, quoted, column = loaded[0]
    target.execute(f"UPDATE {quoted} SET {column} = {column} || '!' "
                   f"WHERE ctid = (SELECT min(ctid) FROM {quoted} WHERE {column} IS NOT NULL)")
    run.resume()
    assert run.finish() == 3, run.stderr()
    checks = {c["name"]: c for c in json.loads(run.stdout())["validation"]["checks"]}
    failed = {name for name, c in checks.items() if not c["ok"]}
    assert failed == {"content_checksums"}, checks
    assert checks["content_checksums"]["detail"] == f"content differs: {table}"


# ------------------------------------------------------------------------ overlapping runs


def test_overlapping_backups_wait_or_exit_4_and_never_interleave(cli: Any, start: Callable[..., Running],
                                                                 local_repo: str, seed_db: Any) -> None:
    common = ["--repo", local_repo, "--dsn", seed_db.dsn]
    holder = start("backup", "full", *common, pause_at="backup:before-manifest")
    holder.wait_paused()

    t0 = time.monotonic()
    busy = cli("backup", "full", *common)
    assert busy.returncode == 4 and "another backup" in one_line(busy.stderr)
    assert time.monotonic() - t0 < 15

    t0 = time.monotonic()
    waited = cli("backup", "incremental", *common, "--lock-timeout", "1.5")
    assert waited.returncode == 4 and "waited 1.5 s" in one_line(waited.stderr)
    assert time.monotonic() - t0 >= 1.5

    patient = start("backup", "full", *common, "--lock-timeout", "120", "--json")
    impatient = start("backup", "full", *common, "--lock-timeout", "120")
    time.sleep(2)
    assert patient.proc.poll() is None and impatient.proc.poll() is None
    t0 = time.monotonic()
    os.killpg(impatient.proc.pid, signal.SIGINT)
    assert impatient.finish(30) == 130 and time.monotonic() - t0 < 10
    assert listed(cli, local_repo) == []

    holder.resume()
    assert holder.finish() == 0, holder.stderr()
    assert patient.finish() == 0, patient.stderr()
    second = json.loads(patient.stdout())["id"]
    ids = listed(cli, local_repo)
    assert len(ids) == 2 and ids[1] == second
    assert {k.split("/")[1] for k in keys(local_repo, "backups/")} == set(ids)
    assert running_ids(local_repo) == []
    assert cli.json("verify", "--repo", local_repo, "all")["ok"] is True


def test_a_backup_whose_objects_vanish_is_never_committed(cli: Any, start: Callable[..., Running],
                                                          local_repo: str, seed_db: Any) -> None:
    run = start("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn, pause_at="backup:before-manifest")
    run.wait_paused()
    (backup_id,) = running_ids(local_repo)
    victim = keys(local_repo, f"backups/{backup_id}/data/")[0]
    (Path(local_repo) / victim).unlink()
    run.resume()
    assert run.finish() == 1
    assert "lost 1 object(s)" in one_line(run.stderr())
    assert listed(cli, local_repo) == []


def test_retention_sweeps_crash_garbage_but_never_a_running_backup(cli: Any, start: Callable[..., Running],
                                                                   local_repo: str, seed_db: Any) -> None:
    common = ["--repo", local_repo, "--dsn", seed_db.dsn]
    first = cli.json("backup", "full", *common)["id"]
    crashed = start("backup", "full", *common, "--jobs", "1", pause_at="backup:upload")
    crashed.wait_paused()
    crashed.kill9()
    (dead,) = running_ids(local_repo)
    alive = start("backup", "incremental", *common, pause_at="backup:before-manifest")
    alive.wait_paused()
    (live,) = [i for i in running_ids(local_repo) if i != dead]
    assert unfinished_uploads(local_repo) and keys(local_repo, f"backups/{dead}/")

    three_days_ago = time.time() - 3 * 86400
    root = Path(local_repo)
    for path in [*root.joinpath("backups").rglob("*"), root / f"running/{dead}.json"]:
        os.utime(path, (three_days_ago, three_days_ago))

    swept = cli.json("retention", "apply", "--repo", local_repo)
    assert {g["what"] for g in swept["garbage"]} >= {f"backups/{dead}/", f"running/{dead}.json"}
    assert not [g for g in swept["garbage"] if live in g["what"]]
    assert any(live in n and "in progress" in n for n in swept["notes"])
    assert keys(local_repo, f"backups/{dead}/") == [] and unfinished_uploads(local_repo) == []
    assert running_ids(local_repo) == [live]

    alive.resume()
    assert alive.finish() == 0, alive.stderr()
    assert listed(cli, local_repo) == [first, live]
    assert cli.json("verify", "--repo", local_repo, "all")["ok"] is True
    assert {k.split("/")[1] for k in keys(local_repo, "backups/")} == {first, live}
    assert running_ids(local_repo) == []
