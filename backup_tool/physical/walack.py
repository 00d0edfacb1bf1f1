"""``wal push`` answered from the spool: the archive_command hot path.

PostgreSQL runs ``archive_command`` once per 16 MiB segment and waits for it, so a call
whose segment a push-ahead process already stored must cost little more than starting the
interpreter. This module therefore imports only ``os``, ``time``, ``fcntl`` and
:mod:`backup_tool.config.locations` (no json, pathlib, dataclasses or typing), and the
executable's entry point consults it before loading anything else.

Spool layout (``pg_wal/backup-tool-spool``): ``<name>.pushed`` a marker, one line of
tab-separated fields (:data:`MARKER_FIELDS`); ``<name>.error`` a push of that file failed;
``pusher.error`` the push-ahead process could not start; ``pushing.lock`` held (flock) by
the push-ahead process for as long as it runs.

Guarantees:

- A marker is written (temporary file renamed into place) only once the file's object is
  durable in the repository, and records the repository, the object, the content's sha256
  and the file's identity (device, inode, size, modification and change times), taken
  before and after reading the content that was pushed and equal in both.
- A call is acknowledged from a marker only for the same repository and a file whose
  identity is unchanged. Any write, truncation, ``utime`` or rename over the file changes
  its change time (ctime), which no process can set back, so a changed file is never
  acknowledged from a marker left by its earlier content.
- At most one push-ahead process runs per spool: a call that finds none takes the lock
  and forks one that inherits it, so no other call can start a second. A call never waits
  on a process that is gone: when the lock is free and its marker is still missing, or
  when an error was reported for its file or for the process, it answers
  :data:`PUSH_YOURSELF` and the caller pushes the file synchronously, reporting any error
  as usual (PostgreSQL then retries the call as for any failure).
- The push-ahead process is forked, not executed: it inherits the environment
  (credentials) and its command line is the caller's own.
"""

from __future__ import annotations

import fcntl
import os
import time

from backup_tool.config.locations import default_repo

TYPE_CHECKING = False  # not typing's: importing typing costs every call a few milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable

SPOOL_DIR = "backup-tool-spool"
LOCK_NAME = "pushing.lock"
PUSHER_ERROR = "pusher.error"
MARKER_FIELDS = ("repo", "key", "sha256", "raw_size", "stored_size", "already_archived", "identity")
ACKNOWLEDGED = "acknowledged"
PUSH_YOURSELF = "push"
WAIT_TIMEOUT = 600.0
POLL_SECONDS = 0.004


def spool_of(wal_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(wal_path)), SPOOL_DIR)


def repo_identity(url: str) -> str:
    """The repository URL as markers record it (without opening the repository)."""
    if url.startswith("s3://"):
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def file_identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def marker_line(repo_url: str, key: str, sha256: str, raw_size: int, stored_size: int,
                already_archived: bool, identity: str) -> str:
    return "\t".join((repo_identity(repo_url), key, sha256, str(raw_size), str(stored_size),
                      "1" if already_archived else "0", identity)) + "\n"


def write_marker(wal_path: str, line: str) -> None:
    """Record that ``wal_path`` is durable in the repository (call only once it is)."""
    spool = spool_of(wal_path)
    os.makedirs(spool, mode=0o700, exist_ok=True)
    name = os.path.basename(wal_path)
    tmp = os.path.join(spool, f".{name}.pushed.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(line)
    os.replace(tmp, os.path.join(spool, f"{name}.pushed"))


def read_marker(spool: str, name: str) -> dict[str, str] | None:
    try:
        with open(os.path.join(spool, f"{name}.pushed")) as fh:
            fields = fh.read().rstrip("\n").split("\t")
    except OSError:
        return None
    return dict(zip(MARKER_FIELDS, fields, strict=True)) if len(fields) == len(MARKER_FIELDS) else None


def acknowledged(wal_path: str, repo_url: str) -> dict[str, str] | None:
    """The marker that proves ``wal_path``, as it is now, durable in ``repo_url``; else None."""
    try:
        identity = file_identity(os.stat(wal_path))
    except OSError:
        return None
    marker = read_marker(spool_of(wal_path), os.path.basename(wal_path))
    if marker is None or marker["identity"] != identity or marker["repo"] != repo_identity(repo_url):
        return None
    return marker


def parse_push(argv: list[str], environ: dict[str, str] | None = None) -> tuple[str, str, int] | None:
    """(WAL path, repository, batch) of a plain ``wal push WAL_PATH [--repo URL] [--batch N]``;
    None for any other command line (the full command handles it)."""
    env = os.environ if environ is None else environ
    if argv[:2] != ["wal", "push"]:
        return None
    rest = argv[2:]
    repo: str | None = None
    path: str | None = None
    batch = "16"
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--repo", "--batch") and i + 1 < len(rest):
            repo, batch = (rest[i + 1], batch) if arg == "--repo" else (repo, rest[i + 1])
            i += 2
            continue
        if arg.startswith("--repo="):
            repo = arg[len("--repo="):]
        elif arg.startswith("--batch="):
            batch = arg[len("--batch="):]
        elif arg.startswith("-") or path is not None:
            return None
        else:
            path = arg
        i += 1
    if path is None or not batch.isdigit() or not 1 <= int(batch) <= 64:
        return None
    return path, repo or env.get("BACKUP_TOOL_REPO") or default_repo(), int(batch)


def is_ready(wal_path: str) -> bool:
    """PostgreSQL marked the file ready for archiving (what the push-ahead process pushes)."""
    folder, name = os.path.split(os.path.abspath(wal_path))
    return os.path.exists(os.path.join(folder, "archive_status", f"{name}.ready"))


def _take_lock(spool: str) -> int | None:
    """The push-ahead lock, if no process holds it (an open descriptor holding it)."""
    fd = os.open(os.path.join(spool, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def spawn_detached(lock_fd: int, run: Callable[[], None]) -> None:
    """Fork a detached process (own session, stdio on /dev/null, no other descriptor but the
    lock's) that calls ``run()`` holding the lock, and return at once."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for entry in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
            if int(entry) > 2 and int(entry) != lock_fd:
                try:
                    os.close(int(entry))
                except OSError:
                    pass
        if os.fork():
            os._exit(0)
        run()
    except BaseException:  # noqa: BLE001 - detached: the waiting calls push for themselves
        pass
    finally:
        os._exit(0)


def _take_error(spool: str, name: str) -> bool:
    """True (and the report removed) if a push of ``name`` or the push-ahead process failed."""
    found = False
    for entry in (f"{name}.error", PUSHER_ERROR):
        try:
            os.unlink(os.path.join(spool, entry))
            found = True
        except FileNotFoundError:
            pass
    return found


def await_push(wal_path: str, repo_url: str, start: Callable[[int], None], timeout: float = WAIT_TIMEOUT) -> str:
    """Wait until a push-ahead process made ``wal_path`` durable in ``repo_url``, starting one
    (``start(lock_fd)``) when none runs: :data:`ACKNOWLEDGED`, or :data:`PUSH_YOURSELF` when
    it cannot be (see the module docstring)."""
    spool = spool_of(wal_path)
    name = os.path.basename(wal_path)
    try:
        os.makedirs(spool, mode=0o700, exist_ok=True)
    except OSError:
        return PUSH_YOURSELF
    if _take_error(spool, name):
        return PUSH_YOURSELF
    started = False
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        if acknowledged(wal_path, repo_url) is not None:
            return ACKNOWLEDGED
        if _take_error(spool, name) or time.monotonic() > deadline:
            return PUSH_YOURSELF
        if polls % 8 == 0:
            fd = _take_lock(spool)
            if fd is not None:
                if started:
                    os.close(fd)
                    return ACKNOWLEDGED if acknowledged(wal_path, repo_url) is not None else PUSH_YOURSELF
                try:
                    start(fd)
                finally:
                    os.close(fd)
                started = True
        polls += 1
        time.sleep(POLL_SECONDS)


def acknowledge_or_push_ahead(wal_path: str, repo_url: str, batch: int, push_ahead: Callable[[], None]) -> bool:
    """True once a marker proves ``wal_path`` durable in ``repo_url``: already, or after a
    push-ahead process (``push_ahead()`` run detached, when none runs) stored it. False: the
    caller pushes the file itself, synchronously (``batch`` 1, a file PostgreSQL has not
    marked ready, or the push-ahead could not make it durable)."""
    if acknowledged(wal_path, repo_url) is not None:
        return True
    if batch <= 1 or not is_ready(wal_path):
        return False
    return await_push(wal_path, repo_url, lambda fd: spawn_detached(fd, push_ahead)) == ACKNOWLEDGED

