"""``wal push`` ahead of PostgreSQL: a detached process pushes the ready segments and each
archive_command call waits for its own acknowledgement, given only once the segment is
durable in the repository with the file's content."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.paths import REPO_ROOT

from backup_tool.core.walnames import segment_name
from backup_tool.physical import walack
from backup_tool.repository.storage import open_storage
from backup_tool.repository.walarchive import find_archived

SEG = 16 << 20
NAMES = [segment_name(1, n) for n in range(1, 7)]


def fake_pg_wal(root: Path, names: list[str]) -> Path:
    """``pg_wal`` with files PostgreSQL marked ready (content unique per file)."""
    pg_wal = root / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    for i, name in enumerate(names):
        (pg_wal / name).write_bytes(os.urandom(4096) + bytes([i]) * (SEG // 64))
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    return pg_wal


def archived(repo: str, name: str) -> bytes | None:
    """The archived content of ``name`` (decompressed, sha256 checked), or None."""
    from backup_tool.physical import wal

    storage = open_storage(repo)
    found = find_archived(storage, name)
    if not found:
        return None
    return b"".join(wal.read_archived(storage, found[0]))


def pusher_gone(spool: Path) -> bool:
    """No push-ahead process holds the spool's lock (it has lingered out)."""
    fd = walack._take_lock(str(spool))
    if fd is None:
        return False
    os.close(fd)
    return True


def done(pg_wal: Path, name: str) -> None:
    """What PostgreSQL does after archive_command succeeded."""
    (pg_wal / "archive_status" / f"{name}.ready").rename(pg_wal / "archive_status" / f"{name}.done")


def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_push_command_lines_the_hot_path_answers() -> None:
    env: dict[str, str] = {}
    assert walack.parse_push(["wal", "push", "p/x", "--repo", "s3://b/p", "--batch", "4"], env) == ("p/x", "s3://b/p", 4)
    assert walack.parse_push(["wal", "push", "--batch=1", "x", "--repo=/r"], env) == ("x", "/r", 1)
    assert walack.parse_push(["wal", "push", "x"], {"BACKUP_TOOL_REPO": "/env"}) == ("x", "/env", 16)
    for other in (["wal", "push", "x", "--json"], ["wal", "push", "x", "y"], ["wal", "push", "x", "--batch", "0"],
                  ["wal", "push", "x", "--batch", "two"], ["wal", "push"], ["wal", "fetch", "x", "y"]):
        assert walack.parse_push(other, env) is None, other
    assert walack.repo_identity("s3://b/p/") == "s3://b/p"
    assert walack.repo_identity("file:///srv/repo/../repo") == "/srv/repo"


def test_each_call_returns_once_its_segment_is_durable(cli: Any, repo: str, tmp_path: Path) -> None:
    """As PostgreSQL's archiver: one call per ready segment, in order, .ready renamed .done
    after each. Every call's segment is in the repository, byte-identical, when it returns,
    and the calls were answered by one push-ahead process, not by pushing themselves."""
    pg_wal = fake_pg_wal(tmp_path, NAMES)
    for name in NAMES[:-1]:
        pushed = cli("wal", "push", pg_wal / name, "--repo", repo)
        assert pushed.returncode == 0 and pushed.stdout == "" and pushed.stderr == "", pushed.stderr
        assert archived(repo, name) == (pg_wal / name).read_bytes()
        done(pg_wal, name)
    out = cli.json("wal", "push", pg_wal / NAMES[-1], "--repo", repo)
    assert set(out) == {"name", "key", "raw_size", "stored_size", "sha256", "already_archived", "pushed_ahead",
                        "from_spool"}
    assert out["name"] == NAMES[-1] and out["raw_size"] == (pg_wal / NAMES[-1]).stat().st_size
    assert out["key"] == find_archived(open_storage(repo), NAMES[-1])[0].key and len(out["sha256"]) == 64
    done(pg_wal, NAMES[-1])
    spool = pg_wal / walack.SPOOL_DIR
    assert (spool / walack.LOCK_NAME).exists()
    assert not list(spool.glob("*.error")) and not (spool / walack.PUSHER_ERROR).exists()
    wait_for(lambda: not list(spool.glob("*.pushed")) or pusher_gone(spool), "the pusher never ended")
    if list(spool.glob("*.pushed")):
        # It lingered out before the archiver's last rename (a slow machine): the next
        # pusher drops the markers of segments PostgreSQL no longer needs at its first scan.
        next_segment = fake_pg_wal(tmp_path / "next", [segment_name(1, 0x2A)])
        for name in [segment_name(1, 0x2A)]:
            (next_segment / name).rename(pg_wal / name)
            (next_segment / "archive_status" / f"{name}.ready").rename(pg_wal / "archive_status" / f"{name}.ready")
        assert cli("wal", "push", pg_wal / segment_name(1, 0x2A), "--repo", repo).returncode == 0
        done(pg_wal, segment_name(1, 0x2A))
        wait_for(lambda: sorted(p.name for p in spool.glob("*.pushed")) in ([], [f"{segment_name(1, 0x2A)}.pushed"]),
                 "markers outlived the .ready files")


def test_a_changed_file_is_never_acknowledged_from_the_marker_of_its_old_content(
        cli: Any, local_repo: str, tmp_path: Path) -> None:
    """Rewritten in place, same size, modification time set back: the marker left by the
    pushed content must not acknowledge it; the push refuses (the archive holds other bytes)."""
    pg_wal = fake_pg_wal(tmp_path, NAMES[:3])
    assert cli("wal", "push", pg_wal / NAMES[0], "--repo", local_repo, "--batch", "4").returncode == 0
    done(pg_wal, NAMES[0])
    target = pg_wal / NAMES[1]
    wait_for(lambda: walack.acknowledged(str(target), local_repo) is not None, "never pushed ahead")
    before = target.stat()
    with open(target, "r+b") as fh:
        fh.write(b"\xff" * 4096)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    again = cli("wal", "push", target, "--repo", local_repo, "--batch", "4")
    assert again.returncode == 1, again.stderr
    assert "different content" in again.stderr and "Traceback" not in again.stderr
    assert archived(local_repo, NAMES[1]) != target.read_bytes()


@pytest.mark.parametrize("point", ["wal:upload", "wal:before-ack"])
def test_a_killed_pusher_acknowledges_nothing_and_the_call_pushes_itself(
        repo: str, tmp_path: Path, point: str) -> None:
    """kill -9 of the push-ahead process mid-upload, and after the upload but before its
    marker: the waiting call does not return until it has pushed the segment itself. The
    process got no credentials on its command line."""
    pg_wal = fake_pg_wal(tmp_path, NAMES[:1])  # one ready segment: the one the pusher pauses on
    flag = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BACKUP_TOOL_TEST_PAUSE_AT": point,
           "BACKUP_TOOL_TEST_PAUSE_FILE": str(flag), "BACKUP_TOOL_TEST_PAUSE_AFTER_BYTES": "1"}
    call = subprocess.Popen([sys.executable, "-m", "backup_tool", "wal", "push", str(pg_wal / NAMES[0]), "--repo", repo],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: flag.exists() and flag.read_text(), f"the push-ahead process never paused at {point}")
        pusher = int(flag.read_text())
        assert pusher != call.pid and call.poll() is None
        cmdline = Path(f"/proc/{pusher}/cmdline").read_bytes()
        for secret in (os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_ACCESS_KEY_ID")):
            assert not secret or secret.encode() not in cmdline
        assert walack.acknowledged(str(pg_wal / NAMES[0]), repo) is None
        assert (archived(repo, NAMES[0]) is not None) == (point == "wal:before-ack")
        os.kill(pusher, signal.SIGKILL)
        flag.unlink()
        wait_for(lambda: flag.exists() or call.poll() is not None, "the call neither pushed nor ended")
        assert call.poll() is None, call.communicate()
        wait_for(lambda: not flag.exists() or flag.read_text(), "pause flag never written")
        assert int(flag.read_text()) == call.pid  # the call itself, now pushing synchronously
        flag.unlink()
        _out, err = call.communicate(timeout=60)
        assert call.returncode == 0, err
    finally:
        if call.poll() is None:
            call.kill()
            call.wait()
    assert archived(repo, NAMES[0]) == (pg_wal / NAMES[0]).read_bytes()


def test_after_a_failure_the_archivers_retry_succeeds(cli: Any, local_repo: str, tmp_path: Path) -> None:
    pg_wal = fake_pg_wal(tmp_path, NAMES[:2])
    blocker = Path(local_repo) / "wal"
    blocker.write_text("not a directory")
    failed = cli("wal", "push", pg_wal / NAMES[0], "--repo", local_repo)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) <= 2, failed.stderr
    assert walack.acknowledged(str(pg_wal / NAMES[0]), local_repo) is None
    blocker.unlink()
    retried = cli("wal", "push", pg_wal / NAMES[0], "--repo", local_repo)
    assert retried.returncode == 0, retried.stderr
    assert archived(local_repo, NAMES[0]) == (pg_wal / NAMES[0]).read_bytes()


def test_one_call_per_segment_loads_no_command_line_while_waiting(tmp_path: Path, local_repo: str) -> None:
    """The waiting call imports neither the CLI framework nor the repository client."""
    pg_wal = fake_pg_wal(tmp_path, NAMES[:2])
    done_call = subprocess.run([sys.executable, "-X", "importtime", "-m", "backup_tool", "wal", "push",
                                str(pg_wal / NAMES[0]), "--repo", local_repo], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done_call.returncode == 0, done_call.stderr[-2000:]
    imported = {ln.split("|")[-1].strip() for ln in done_call.stderr.splitlines() if ln.startswith("import time:")}
    ours = {m for m in imported if m.split(".")[0] == "backup_tool"}
    assert ours == {"backup_tool", "backup_tool.cli", "backup_tool.cli.entry", "backup_tool.config",
                    "backup_tool.config.locations", "backup_tool.physical", "backup_tool.physical.walack"}
    assert not {m for m in imported if m.split(".")[0] in ("typer", "psycopg", "boto3", "botocore", "zstandard")}
    assert archived(local_repo, NAMES[0]) == (pg_wal / NAMES[0]).read_bytes()


def test_the_pusher_records_each_ready_file_once_it_is_stored(local_repo: str, tmp_path: Path) -> None:
    """In-process, on a pg_wal without a spool yet: every ready file stored, byte-identical,
    and recorded for its repository; at most ``batch`` ahead of PostgreSQL's calls."""
    from backup_tool.config.settings import resolve_settings
    from backup_tool.physical import walpush

    pg_wal = fake_pg_wal(tmp_path, NAMES)

    def target() -> walpush.PushTarget:
        return walpush.open_push_target(resolve_settings(local_repo, None, None))

    walpush.run_pusher(pg_wal, target, batch=4, linger=0)
    recorded = [n for n in NAMES if walack.acknowledged(str(pg_wal / n), local_repo)]
    assert recorded == NAMES[:4]
    assert [n for n in NAMES if archived(local_repo, n) == (pg_wal / n).read_bytes()] == NAMES[:4]
    assert not any(walack.acknowledged(str(pg_wal / n), local_repo + "-other") for n in NAMES)
    for name in NAMES[:4]:
        done(pg_wal, name)
    walpush.run_pusher(pg_wal, target, batch=4, linger=0)
    assert [n for n in NAMES if archived(local_repo, n) == (pg_wal / n).read_bytes()] == NAMES
    assert sorted(p.name for p in (pg_wal / walack.SPOOL_DIR).glob("*.pushed")) == [f"{n}.pushed" for n in NAMES[4:]]
