"""Scratch directories of table PITR runs that ended without removing them (killed, or their
detached removal did not finish) are removed by the next run; those of live runs are not."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from backup_tool.jobs.table_pitr import OWNER_FILE, SCRATCH_PREFIX, clear_leftovers


def scratch(tmp: Path, name: str, owner: bool = True) -> Path:
    path = tmp / f"{SCRATCH_PREFIX}{name}"
    (path / "data" / "base").mkdir(parents=True)
    (path / "data" / "base" / "1").write_bytes(b"x" * 100)
    if owner:
        (path / OWNER_FILE).touch()
    return path


def fake_postmaster(data: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names ``data``, its pid in ``data/postmaster.pid``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-D", str(data)])
    (data / "postmaster.pid").write_text(f"{proc.pid}\n{data}\n")
    deadline = time.monotonic() + 10
    while str(data).encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # set a moment after exec
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_a_killed_runs_scratch_is_removed_and_its_server_stopped(tmp_path: Path) -> None:
    killed = scratch(tmp_path, "killed")
    server = fake_postmaster(killed / "data")
    live = scratch(tmp_path, "live")
    held = os.open(live / OWNER_FILE, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    other = tmp_path / "unrelated"
    other.mkdir()
    try:
        assert clear_leftovers(tmp_path) == [killed]
        assert server.wait(10) != 0, "the leftover's server was stopped"
        assert not killed.exists() and live.exists() and other.exists()
    finally:
        os.close(held)
        server.kill()
    assert clear_leftovers(tmp_path) == [live]


def test_a_scratch_without_owner_file_is_left_while_young_or_its_server_runs(tmp_path: Path) -> None:
    young = scratch(tmp_path, "young", owner=False)
    running = scratch(tmp_path, "running", owner=False)
    server = fake_postmaster(running / "data")
    old = time.time() - 3600
    os.utime(running, (old, old))
    try:
        assert clear_leftovers(tmp_path) == []
        assert young.exists() and running.exists() and server.poll() is None
        os.utime(young, (old, old))
        assert clear_leftovers(tmp_path) == [young]
    finally:
        server.kill()
        server.wait()
    assert clear_leftovers(tmp_path) == [running]


def test_the_benchmark_waits_for_the_scratch_directories_table_pitr_names() -> None:
    """scripts/bench.py waits, before each measurement, for the scratch directories a table
    PITR hands to a detached removal: it must look for the names table PITR gives them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[2] / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench"]
    assert bench.SCRATCH_PREFIX == SCRATCH_PREFIX
