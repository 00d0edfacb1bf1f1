"""What the operator reads when something is wrong: a connection error keeps libpq's reason
(not only its last line), a missing restore target mentions --create, and a typo in the
policy file blocks only the commands that use the policy."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest
from clioutput import only_line
from support.cli import Cli
from support.clusters import DbHandle, PgServer, free_port

from backup_tool.postgres.connection import describe_connect_error


def _connect_error(conninfo: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(conninfo, connect_timeout=5)
    return info.value


@pytest.fixture
def closing_server() -> Iterator[int]:
    """A TCP port whose server reads the startup packet and hangs up, like a crashing
    backend or a misconfigured pooler: libpq's message then ends "before or while
    processing the request."."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(1024)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_server_closed_connection_keeps_the_reason(closing_server: int) -> None:
    exc = _connect_error(f"host=127.0.0.1 port={closing_server} dbname=app user=app sslmode=disable")
    message = str(describe_connect_error(exc, "PostgreSQL at app@127.0.0.1"))
    assert "\n" not in message
    assert message.startswith(f'cannot connect to PostgreSQL at app@127.0.0.1: connection to server at "127.0.0.1", '
                              f"port {closing_server} failed: server closed the connection unexpectedly This probably "
                              "means the server terminated abnormally before or while processing the request.")
    assert "dropped the connection" in message


def test_refused_connection_keeps_the_reason_once_per_error() -> None:
    port = free_port()
    exc = _connect_error(f"host=127.0.0.1,127.0.0.1 port={port},{port} dbname=app")
    message = str(describe_connect_error(exc, "PostgreSQL at 127.0.0.1"))
    assert message.count("Connection refused") == 1 and "Multiple connection attempts" not in message
    assert f'connection to server at "127.0.0.1", port {port} failed: Connection refused Is the server running' in message


def test_no_server_on_the_local_socket_says_to_name_a_host(tmp_path: Path) -> None:
    exc = _connect_error(f"host={tmp_path} port=5432 dbname=app")
    message = str(describe_connect_error(exc, "PostgreSQL at localhost:5432/app"))
    assert "No such file or directory" in message
    assert "no server listens on that local socket" in message and "name the server's host and port" in message


def test_missing_database_mentions_create(pg_server: PgServer) -> None:
    exc = _connect_error(pg_server.dsn("no_such_restore_target"))
    message = str(describe_connect_error(exc, "PostgreSQL"))
    assert 'database "no_such_restore_target" does not exist' in message
    assert "add --create (restore full)" in message


def test_a_server_without_a_free_connection_slot_says_so_and_writes_no_backup(
        cli: Cli, tmp_path: Path, pg_cluster_factory: Callable[..., PgServer]) -> None:
    """max_connections reached (a small server, other clients holding every slot): one line
    naming the server's refusal and what to do about it (it said to check --dsn), exit 1,
    and the repository holds no backup."""
    server = pg_cluster_factory(max_connections="4", superuser_reserved_connections="0")
    held = [server.admin_conn() for _ in range(4)]
    try:
        repo = tmp_path / "repo"
        proc = cli("backup", "full", "--jobs", "4", "--repo", str(repo), "--dsn", server.dsn())
    finally:
        for conn in held:
            conn.close()
    assert proc.returncode == 1, proc.stderr
    line = only_line(proc.stderr)
    assert "too many clients" in line and "no free connection slot" in line and "--jobs" in line, line
    assert "check --dsn" not in line, line
    assert cli("list", "--repo", str(repo), "--json").json() == [] or not repo.exists()


def test_a_created_database_is_dropped_when_the_server_runs_out_of_slots_before_the_restore_claims_it(
        cli: Cli, tmp_path: Path, pg_cluster_factory: Callable[..., PgServer]) -> None:
    """restore full --create on a server with one free connection slot: the database is created,
    the first connection to it is refused (too many clients), and the database is dropped on
    the session that created it. It was left behind, empty and unmarked, since the drop
    needed a new connection too (a warning said it could not drop it)."""
    server = pg_cluster_factory(max_connections="8", superuser_reserved_connections="0")
    with server.admin_conn() as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
    repo = str(tmp_path / "repo")
    cli.json("backup", "full", "--repo", repo, "--dsn", server.dsn())
    DbHandle(server, "postgres").wait_alone()
    held = [server.admin_conn() for _ in range(7)]
    try:
        proc = cli("restore", "full", "--repo", repo, "--target-dsn", server.dsn("landing"), "--create",
                   "--dsn", server.dsn())
        assert proc.returncode == 1, proc.stderr
        assert "too many clients" in only_line(proc.stderr)
        present = held[0].execute("SELECT count(*) FROM pg_database WHERE datname = 'landing'").fetchone()
    finally:
        for conn in held:
            conn.close()
    assert present == (0,), "a refused restore full --create leaves no database"


def test_broken_policy_blocks_only_the_commands_that_use_it(cli: Cli, tmp_path: Path) -> None:
    policy = tmp_path / "typo.toml"
    policy.write_text("[retention]\nkeep_dialy = 7\n")
    (tmp_path / "repo").mkdir()
    repo = str(tmp_path / "repo")
    listed = cli("list", "--repo", repo, "--policy", str(policy), "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.json() == []
    warning = [ln for ln in listed.stderr.splitlines() if str(policy) in ln]
    assert len(warning) == 1 and "keep_dialy" in warning[0] and "built-in policy defaults" in warning[0]
    strict = cli("retention", "apply", "--repo", repo, "--policy", str(policy))
    assert strict.returncode == 2
    line = only_line(strict)
    assert str(policy) in line and "keep_dialy" in line


def test_output_cut_short_by_its_reader_is_no_error(cli: Cli, tmp_path: Path) -> None:
    """`backup-tool schedule | head -3`: the reader closing the pipe is not a failure to report
    ("unexpected BrokenPipeError — rerun with --debug"); the command stops writing, says
    nothing on stderr and exits 141, as a program killed by SIGPIPE does."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*cli.command, "schedule", "--repo", str(tmp_path / "repo")], stdout=write_end,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli.base_env(),
                              cwd=cli.workdir, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_an_empty_backup_reference_is_refused_not_read_as_latest(cli: Cli, tmp_path: Path,
                                                                  pg_server: PgServer) -> None:
    """`--backup "$BACKUP"` with BACKUP unset (the restore-tables walk-through sets it to the
    newest backup before the damage): exit 2, one line, nothing written. It restored `latest`,
    which may be a backup taken after the damage, and `--replace` then put that in place;
    `validate --against ""` compared with no backup at all."""
    db = pg_server.create_db("empty_ref")
    db.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    repo = str(tmp_path / "repo")
    cli.json("backup", "full", "--repo", repo, "--dsn", db.dsn)
    db.execute("DELETE FROM t")
    for args in (("restore", "tables", "--tables", "public.t", "--backup", "", "--replace"),
                 ("restore", "tables", "--tables", "public.t", "--backup", " ", "--into-schema", "copy"),
                 ("restore", "full", "--backup", "", "--create"),
                 ("show", ""), ("verify", ""), ("validate", "--against", "", "--dsn", db.dsn)):
        target = pg_server.dsn("empty_ref_copy") if args[:2] == ("restore", "full") else db.dsn
        proc = cli(*args, "--repo", repo, *(("--target-dsn", target) if args[0] == "restore" else ()))
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "the backup reference is empty" in only_line(proc.stderr), args
    assert db.scalar("SELECT count(*) FROM t") == 0
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'copy'") == 0
    assert db.scalar("SELECT count(*) FROM pg_database WHERE datname = 'empty_ref_copy'") == 0
