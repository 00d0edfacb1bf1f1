"""LocalServer's cheap looks at a server: ``postmaster.pid`` and the log (a stand-in process
for most, one real private start)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support.clusters import find_pg_bin_dir, free_port

from backup_tool.physical.pitr import LOG_PAUSED, LOG_PROMOTED, LogWatch
from backup_tool.postgres.cluster import LocalServer, is_root, run_as


def server_in(tmp: Path) -> LocalServer:
    (tmp / "data").mkdir()
    return LocalServer(pgdata=tmp / "data", os_user="nobody", bin_dir=Path("/nonexistent"), port=5432,
                       private_dir=tmp / "s", log_file=tmp / "server.log")


def pid_file(server: LocalServer, pid: int, status: str | None) -> None:
    lines = [str(pid), str(server.pgdata), "1764150000", "5432", "/tmp", "", "  1234  5678"]
    if status is not None:
        lines.append(f"{status:<8}")
    (server.pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")


def test_postmaster_reads_pid_and_state_of_a_live_process_only(tmp_path: Path) -> None:
    server = server_in(tmp_path)
    assert server.postmaster() is None and not server.running()
    pid_file(server, os.getpid(), None)
    assert server.postmaster() == (os.getpid(), "")
    pid_file(server, os.getpid(), "ready")
    assert server.postmaster() == (os.getpid(), "ready") and server.running()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid_file(server, gone.pid, "ready")
    assert server.postmaster() is None


def test_stop_signals_the_postmaster_and_returns_once_it_is_gone(tmp_path: Path) -> None:
    """A stand-in postmaster that, like PostgreSQL's, removes postmaster.pid as it exits on
    SIGINT (a fast shutdown) a moment after the signal."""
    server = server_in(tmp_path)
    script = ("import os, signal, sys, time\n"
              "def bye(*_):\n    time.sleep(0.2)\n    os.unlink(sys.argv[1])\n    os._exit(0)\n"
              "signal.signal(signal.SIGINT, bye)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", script, str(server.pgdata / "postmaster.pid"), str(ready)])
    try:
        while not ready.exists():
            time.sleep(0.01)
        pid_file(server, proc.pid, "ready")
        began = time.monotonic()
        server.stop("fast")
        took = time.monotonic() - began
        assert not (server.pgdata / "postmaster.pid").exists()
        assert 0.2 <= took < 5
        assert proc.wait(5) == 0
    finally:
        proc.kill()


def test_log_watch_finds_lines_across_reads_and_ignores_what_came_before(tmp_path: Path) -> None:
    server = server_in(tmp_path)
    server.log_file.write_text(f"LOG:  {LOG_PROMOTED}\n")
    watch = LogWatch(server, (LOG_PROMOTED, LOG_PAUSED), server.log_offset())
    assert not watch.saw(LOG_PROMOTED)
    with server.log_file.open("a") as log:
        log.write("LOG:  database system is ready to accept read-only connections\nLOG:  pausing at the e")
    assert not watch.saw(LOG_PAUSED) and not watch.saw(LOG_PROMOTED)
    with server.log_file.open("a") as log:
        log.write("nd of recovery\n")
    assert watch.saw(LOG_PAUSED) and not watch.saw(LOG_PROMOTED)
    with server.log_file.open("a") as log:
        log.write(f"LOG:  {LOG_PROMOTED}\n")
    assert watch.saw(LOG_PROMOTED) and watch.saw(LOG_PAUSED)


def test_a_private_start_logs_to_its_log_file_whatever_the_configuration_says() -> None:
    """The waits read the server log: a restored configuration logging to syslog must not
    hide the start (or recovery's end) from them."""
    user = "postgres" if is_root() else pwd.getpwuid(os.geteuid()).pw_name
    base = Path(tempfile.mkdtemp(prefix="backup-tool-cluster-test-"))
    base.chmod(0o755)
    if is_root():
        shutil.chown(base, user)
    bin_dir = find_pg_bin_dir()
    server = LocalServer(pgdata=base / "data", os_user=user, bin_dir=bin_dir, port=free_port(),
                         private_dir=base / "s", log_file=base / "log" / "server.log")
    try:
        done = run_as(user, [str(bin_dir / "initdb"), "-D", str(server.pgdata), "-U", "postgres", "--no-sync",
                             "-A", "trust"])
        assert done.returncode == 0, done.stderr
        with (server.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.write("log_destination = 'syslog'\nlog_min_messages = 'error'\n")
        log = LogWatch(server, (LOG_PROMOTED,), server.log_offset())
        server.start_private()
        server.wait_until(lambda: log.saw(LOG_PROMOTED) and server.postmaster() is not None, 60, "the start")
        assert server.postmaster() is not None and server.postmaster()[1] == "ready"  # type: ignore[index]
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
