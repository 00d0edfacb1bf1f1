"""A PostgreSQL server on a restored data directory, run and supervised by this tool.

``initdb`` and ``postgres`` refuse to run as root, so when the tool runs as root the server
runs as an unprivileged OS user (``postgres`` by default, or the data directory's owner)
through ``runuser``; files the tool writes for it are owned by that user.

While the tool supervises recovery the server is *private*: no TCP listener, a Unix socket
in a directory only the server user (and root) can enter, and a temporary pg_hba.conf
trusting that socket alone. Nobody else can connect to a database that has not been
recovered and validated yet, and the tool needs no password of the restored cluster. The
server's own configuration applies again when it is restarted normally.

Waiting for the server (a start, the end of recovery, a stop) looks at ``postmaster.pid``
every :data:`POLL_SECONDS`, as ``pg_ctl -w`` does every 0.1 s: the postmaster writes its
state there ("starting", "standby", "ready", "stopping") and removes the file as it exits.
A stop signals the postmaster exactly as ``pg_ctl stop`` does.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from backup_tool.errors import DatabaseError, RefusedError
from backup_tool.postgres import tools as pg_tools
from backup_tool.postgres.connection import ConnInfo

DEFAULT_OS_USER = "postgres"
POLL_SECONDS = 0.02
"""How often a wait for the server looks again (a cheap read of ``postmaster.pid`` first)."""
TICK_SECONDS = 0.3
"""How often a wait calls its progress callback."""
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def is_root() -> bool:
    return os.geteuid() == 0


def server_os_user(pgdata: Path, requested: str | None = None) -> str:
    """The OS user that will own and run the restored cluster."""
    if not is_root():
        me = pwd.getpwuid(os.geteuid()).pw_name
        if requested and requested != me:
            raise RefusedError(f"--os-user {requested} needs root (running as {me})",
                               "run as root or leave --os-user out")
        return me
    if requested:
        candidates = [requested]
    else:
        candidates = []
        probe = pgdata
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        owner = pwd.getpwuid(probe.stat().st_uid).pw_name if probe.exists() else "root"
        if owner != "root" and probe == pgdata:
            candidates.append(owner)
        candidates.append(DEFAULT_OS_USER)
    for name in candidates:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        if name == "root":
            raise RefusedError("PostgreSQL cannot run as root", "pass --os-user with an unprivileged user")
        return name
    raise RefusedError(f"OS user {candidates[-1]} does not exist to run the restored server",
                       "pass --os-user NAME (an unprivileged user that will own the data directory)")


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    if is_root() and user != "root":
        return ["runuser", "-u", user, "--", *argv]
    return list(argv)


def run_as(user: str, argv: Sequence[str], env: dict[str, str] | None = None,
           cwd: str | Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_user(user, argv), env=env if env is not None else dict(os.environ),
                          cwd=cwd or "/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def chown_to(path: Path, user: str) -> None:
    if is_root():
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def user_can_write(user: str, path: Path) -> bool:
    return run_as(user, ["test", "-w", str(path), "-a", "-x", str(path)]).returncode == 0


def tool_candidates(explicit: str | None, archive_command: str, argv0: str, python: str) -> list[str]:
    """Command prefixes that may run this tool for the server user, best first."""
    found = []
    if explicit:
        found.append(explicit)
    if env := os.environ.get("BACKUP_TOOL_SERVER_COMMAND"):
        found.append(env)
    match = re.match(r"^(.*?)\s+wal\s+push\b", archive_command or "")
    if match and match.group(1).strip():
        found.append(match.group(1).strip())
    if os.path.isabs(argv0) and Path(argv0).name == "backup-tool":
        found.append(shlex.quote(argv0))
    if which := shutil.which("backup-tool"):
        found.append(shlex.quote(which))
    found.append(f"{shlex.quote(python)} -m backup_tool")
    unique: list[str] = []
    for f in found:
        if f not in unique:
            unique.append(f)
    return unique


def server_tool_command(user: str, candidates: list[str]) -> str:
    """The first candidate the server user can actually run (``<cmd> version`` succeeds)."""
    for candidate in candidates:
        try:
            done = run_as(user, ["/bin/sh", "-c", f"{candidate} version"], timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and "backup-tool" in done.stdout:
            return candidate
    raise RefusedError(
        f"OS user {user} cannot run backup-tool (tried: {'; '.join(candidates)}), so PostgreSQL's "
        "restore_command could not fetch WAL",
        "install backup-tool where that user can run it (e.g. a venv under /opt) and pass "
        "--server-command /opt/backup-tool/bin/backup-tool, or set BACKUP_TOOL_SERVER_COMMAND")


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class LocalServer:
    """A server on ``pgdata`` run as ``os_user``; ``private_dir`` holds its socket and hba."""

    pgdata: Path
    os_user: str
    bin_dir: Path
    port: int
    private_dir: Path
    log_file: Path
    superuser: str = "postgres"
    database: str = "postgres"
    """The database :meth:`conninfo` connects to unless told another."""

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_as(self.os_user, [str(self.bin_dir / "pg_ctl"), "-D", str(self.pgdata), *args],
                      timeout=timeout)

    def config_value(self, name: str) -> str:
        """The effective value of a setting, as the server would read its configuration."""
        done = run_as(self.os_user, [str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-C", name])
        if done.returncode != 0:
            raise DatabaseError(f"cannot read the restored configuration: {done.stderr.strip()}")
        return done.stdout.strip()

    def prepare_private(self) -> None:
        self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        chown_to(self.private_dir, self.os_user)
        hba = self.private_dir / "pg_hba.conf"
        hba.write_text("# backup-tool: private socket while recovery is supervised\nlocal all all trust\n")
        chown_to(hba, self.os_user)

    def request_promotion(self) -> bool:
        """Ask the server to promote, without waiting and without a connection (``pg_ctl
        promote -W``: the promote signal file, then a signal); False when pg_ctl refused."""
        return self._ctl("promote", "-W", timeout=30).returncode == 0

    def start_private(self, extra: dict[str, str] | None = None) -> None:
        """Start without waiting; only the private socket accepts (trusted) connections. The
        server logs in English to ``log_file`` whatever its configuration says (the tool
        reads recovery's progress and end there)."""
        self.prepare_private()
        settings = {"listen_addresses": "", "unix_socket_directories": str(self.private_dir),
                    "hba_file": str(self.private_dir / "pg_hba.conf"), "port": str(self.port),
                    "lc_messages": "C", "logging_collector": "off", "log_destination": "stderr",
                    "log_min_messages": "warning",
                    "ssl": "off", **(extra or {})}
        options = " ".join(f"-c {k}={shlex.quote(v)}" for k, v in settings.items())
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        chown_to(self.log_file.parent, self.os_user)
        done = self._ctl("-l", str(self.log_file), "-o", options, "-W", "start")
        if done.returncode != 0:
            raise DatabaseError(f"the restored server did not start: {done.stderr.strip() or done.stdout.strip()}",
                                f"see {self.log_file}")

    def start_normal(self, timeout: int = 300) -> None:
        """Start with the server's own configuration and wait until it accepts connections.
        When its port is taken (the backed-up port, on the machine of the source server), the
        hint says the directory is complete and how to start it on another port."""
        mark = self._log_size()
        done = self._ctl("-l", str(self.log_file), "-W", "start", timeout=60)
        if done.returncode != 0:
            raise DatabaseError(f"the restored server did not start with its own configuration: "
                                f"{self.last_error() or done.stderr.strip()}", self._start_hint(self.log_text()[mark:]))

        def up() -> bool:
            found = self.postmaster()
            if found is not None:
                return found[1] in ("ready", "standby")
            failed = self.last_error(self.log_text()[mark:])
            if failed:
                raise DatabaseError(f"the restored server did not start with its own configuration: {failed}",
                                    self._start_hint(self.log_text()[mark:]))
            return False
        self.wait_until(up, timeout, "the start with its own configuration")

    def postmaster(self) -> tuple[int, str] | None:
        """(pid, state) of the live postmaster named in ``postmaster.pid`` (state: "" until
        written, "starting", "standby", "ready" or "stopping"); None when there is none."""
        found = pid_file(self.pgdata)
        if found is None:
            return None
        try:
            os.kill(found[0], 0)
        except OSError:
            return None
        return found

    def running(self) -> bool:
        return self.postmaster() is not None

    def stop(self, mode: str = "fast", timeout: float = 120.0) -> None:
        """Stop as ``pg_ctl stop -m mode`` does (the same signal to the postmaster) and return
        once it is gone; a server still there after ``timeout`` is stopped ``immediate``."""
        found = self.postmaster()
        if found is None:
            return
        try:
            os.kill(found[0], STOP_SIGNALS[mode])
        except ProcessLookupError:
            return
        except PermissionError:
            self._ctl("-m", mode, "-w", "-t", str(int(timeout)), "stop", timeout=timeout + 60)
            return
        deadline = time.monotonic() + timeout
        while self.postmaster() is not None:
            if time.monotonic() > deadline:
                self._ctl("-m", "immediate", "-w", "-t", "60", "stop", timeout=120)
                return
            time.sleep(POLL_SECONDS / 2)

    def conninfo(self, dbname: str | None = None) -> ConnInfo:
        dbname = dbname or self.database
        return ConnInfo(f"host={self.private_dir} port={self.port} user={self.superuser} dbname={dbname}")

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def _log_size(self) -> int:
        return len(self.log_text())

    def log_since(self, offset: int) -> tuple[str, int]:
        """The server log from byte ``offset`` on, and the offset after it."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)

    def log_offset(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _start_hint(self, text: str | None = None) -> str:
        log = self.log_text() if text is None else text
        if "could not create any TCP/IP sockets" in log or "Address already in use" in log:
            return (f"its port is taken on this machine (another server); recovery is complete and "
                    f"{self.pgdata} intact: set port = N (a free one) in its postgresql.auto.conf and start it "
                    f"as {self.os_user} with 'pg_ctl -D {self.pgdata} start', or pass --port next time; "
                    f"see {self.log_file}")
        return f"see {self.log_file}"

    def last_error(self, text: str | None = None) -> str:
        """The last error line of the server log (of ``text``, a part of it, when given)."""
        lines = [ln for ln in (self.log_text() if text is None else text).splitlines()
                 if (re.search(r"\b(FATAL|PANIC|ERROR)\b", ln) and "the database system is starting up" not in ln)
                 or "backup-tool: error" in ln]
        return lines[-1].strip() if lines else ""

    def wait_until(self, ready: Callable[[], bool], timeout: float | None, what: str,
                   on_tick: Callable[[], None] | None = None, startup_grace: float = 60.0) -> None:
        """Poll ``ready`` every :data:`POLL_SECONDS` until it holds (``on_tick`` every
        :data:`TICK_SECONDS`); raise if the server stops (or never starts) or time runs out."""
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        next_tick = began + TICK_SECONDS
        seen_running = False
        while True:
            if ready():
                return
            now = time.monotonic()
            if self.running():
                seen_running = True
            elif seen_running or now - began > startup_grace:
                time.sleep(0.5)
                if ready():
                    return
                raise DatabaseError(f"the restored server stopped during {what}: "
                                    f"{self.last_error() or 'no error in its log'}",
                                    f"see {self.log_file}")
            if deadline is not None and now > deadline:
                raise DatabaseError(f"{what} did not finish within {timeout:.0f}s", f"see {self.log_file}")
            if on_tick and now >= next_tick:
                on_tick()
                next_tick = now + TICK_SECONDS
            time.sleep(POLL_SECONDS)


def pid_file(pgdata: Path) -> tuple[int, str] | None:
    """(pid, state) as ``pgdata``'s ``postmaster.pid`` names them, alive or not; None without
    a readable one."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None


def leftover_postmaster(pgdata: Path) -> int | None:
    """The pid of the live (not zombie) postmaster of ``pgdata`` when its command line names
    ``pgdata``: for a directory left by a run that was killed, where the pid in the file may
    since have been reused by another process."""
    found = pid_file(pgdata)
    if found is None:
        return None
    pid = found[0]
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return pid if state != "Z" and str(pgdata).encode() in command else None


def stop_leftover(pgdata: Path, timeout: float = 10.0) -> None:
    """Stop (immediate shutdown) the :func:`leftover_postmaster` of ``pgdata``, if any."""
    pid = leftover_postmaster(pgdata)
    if pid is None:
        return
    try:
        os.kill(pid, STOP_SIGNALS["immediate"])
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while leftover_postmaster(pgdata) == pid and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def find_bin_dir(major: int) -> Path:
    """The directory of PostgreSQL ``major``'s server programs (pg_ctl and postgres of
    exactly that major: a data directory starts under no other); ToolError otherwise."""
    pg_ctl = pg_tools.find("pg_ctl", major)
    server = pg_ctl.path.parent / "postgres"
    version = pg_tools.program_version(server) if server.is_file() else None
    if version is None or int(version.split(".")[0]) != major:
        raise pg_tools.ToolError(f"postgres of PostgreSQL {major} not found beside {pg_ctl.path}",
                                 pg_tools.install_hint("postgres", major, pg_tools.Match.EXACT))
    return pg_ctl.path.parent
