"""Throwaway PostgreSQL clusters (initdb/pg_ctl on loopback, run as an unprivileged OS user when
the tests run as root), seeded databases and their fixtures."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from support.paths import SEED_FILES

SEED_TEMPLATE = "seed_template"
PG_MAJOR = 15
FALLBACK_OS_USER = "backuptool-test"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _major_version(bin_dir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for token in out.split():
        if token[:1].isdigit():
            return int(token.split(".")[0])
    return None


def extra_majors_dir() -> Path:
    """Where scripts/pg-majors installs the PostgreSQL majors other than 15 (DIR/<major>/bin)."""
    return Path(os.environ.get("BACKUP_TOOL_TEST_PG_MAJORS_DIR", "/var/tmp/backup-tool-pg"))


def find_pg_bin_dir(major: int = PG_MAJOR) -> Path:
    """The bin dir of a PostgreSQL `major` server installation (initdb, pg_ctl, postgres,
    pg_dump...).

    For 15, `BACKUP_TOOL_TEST_PG_BINDIR` wins; then scripts/pg-majors' directory, the Debian
    path, `pg_config --bindir`, and `pg_ctl` on PATH. Raises if none of them is that major.
    """
    candidates: list[Path] = []
    if major == PG_MAJOR and (env := os.environ.get("BACKUP_TOOL_TEST_PG_BINDIR")):
        candidates.append(Path(env))
    candidates.append(extra_majors_dir() / str(major) / "bin")
    candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
            candidates.append(Path(out.stdout.strip()))
        except subprocess.CalledProcessError:
            pass
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).resolve().parent)
    for cand in candidates:
        if (cand / "pg_ctl").exists() and (cand / "initdb").exists() and _major_version(cand) == major:
            return cand
    how = f"install postgresql-{major} or set BACKUP_TOOL_TEST_PG_BINDIR" if major == PG_MAJOR \
        else f"run scripts/pg-majors {major}"
    raise RuntimeError(
        f"PostgreSQL {major} server binaries not found (looked in {', '.join(map(str, candidates))}); {how}"
    )


def server_os_user() -> str:
    """The OS user the test clusters run as: ourselves unless root; then `postgres`, or a
    `backuptool-test` system user created on demand."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", FALLBACK_OS_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER],
        check=True,
        capture_output=True,
    )
    return FALLBACK_OS_USER


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class DbHandle:
    """One database on a test server."""

    server: PgServer
    name: str

    @property
    def dsn(self) -> str:
        """libpq URL with the superuser password embedded."""
        return self.server.dsn(self.name)

    def connect(self) -> psycopg.Connection[Any]:
        """Autocommit superuser connection; the caller closes it."""
        return self.server.admin_conn(self.name)

    def execute(
        self, query: str | sql.SQL | sql.Composed, params: Sequence[Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit and return its rows (empty if none)."""
        with self.connect() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str | sql.SQL | sql.Composed, params: Sequence[Any] | None = None) -> Any:
        """First column of the first row; raises if the statement returns no row."""
        rows = self.execute(query, params)
        if not rows:
            raise LookupError(f"no row from {query!r}")
        return rows[0][0]

    def wait_alone(self, timeout: float = 30) -> None:
        """Wait until no other session is connected to the database: a command's sessions
        write their last activity counts (``pg_stat_*``) as they exit."""
        deadline = time.monotonic() + timeout
        while self.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND pid <> pg_backend_pid()") and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class PgServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, owned and run by `os_user`.

    Host connections (including replication) need the superuser `postgres` with `password`
    (scram-sha-256). `base_dir` is root-owned 0755; `data_dir`, `socket_dir` and `log_file`
    belong to `os_user`.
    """

    bin_dir: Path
    os_user: str
    base_dir: Path
    port: int
    password: str = field(repr=False)
    settings: dict[str, str] = field(default_factory=dict)
    initdb_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    user: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def libpq_env(self, dbname: str = "postgres") -> dict[str, str]:
        """PG* variables for client tools; the password travels only in PGPASSWORD."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
        }

    def admin_conn(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """Autocommit superuser connection over TCP; the caller closes it."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    def create_db(self, name: str, template: str | None = None) -> DbHandle:
        with self.admin_conn() as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
            conn.execute(query)
        return DbHandle(self, name)

    def drop_db(self, name: str) -> None:
        """Drop the database if it exists, disconnecting its sessions."""
        with self.admin_conn() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def run_as_os_user(
        self, argv: Sequence[str | os.PathLike[str]], *, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run argv as `os_user` (via runuser when we are root), text output captured."""
        argv = [os.fspath(a) for a in argv]
        if os.geteuid() == 0 and self.os_user != "root":
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        env = dict(kwargs.pop("env", None) or os.environ)
        env["HOME"] = str(self.base_dir)
        kwargs.setdefault("cwd", self.base_dir)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("capture_output", True)
        return subprocess.run(argv, check=check, text=True, env=env, **kwargs)

    def load_sql(self, dbname: str, files: Sequence[Path]) -> None:
        """Apply SQL files in one `psql -v ON_ERROR_STOP=1` session over TCP; raise with
        psql's output on error."""
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        for f in files:
            argv += ["-f", str(f)]
        env = {**os.environ, **self.libpq_env(dbname)}
        res = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            names = [Path(f).name for f in files]
            raise RuntimeError(f"loading {names} into {dbname} failed:\n{res.stdout}\n{res.stderr}")

    def make_user_dir(self, name: str | None = None) -> Path:
        """A new empty directory under base_dir owned by os_user (mode 0700), e.g. for a
        PITR target PGDATA or a WAL spool the server writes to."""
        path = self.base_dir / (name or f"dir-{uuid.uuid4().hex[:8]}")
        path.mkdir(mode=0o700)
        shutil.chown(path, self.os_user, self.os_user)
        return path

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run_as_os_user([self.bin_dir / "pg_ctl", "-D", self.data_dir, *args], check=check)

    # lifecycle ------------------------------------------------------------------

    def init(self) -> None:
        """initdb with scram-sha-256 everywhere and append this server's settings."""
        for d in (self.data_dir, self.socket_dir, self.log_file.parent):
            d.mkdir(mode=0o700)
            shutil.chown(d, self.os_user, self.os_user)
        self.socket_dir.chmod(0o755)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        shutil.chown(pwfile, self.os_user, self.os_user)
        try:
            self.run_as_os_user(
                [
                    self.bin_dir / "initdb",
                    "-D",
                    self.data_dir,
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                    *self.initdb_args,
                ]
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "password_encryption": "scram-sha-256",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "fsync": "off",
            "synchronous_commit": "off",
            "shared_buffers": "128MB",
            "max_connections": "50",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            **self.settings,
        }
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# backup_tool test cluster\n")
            f.writelines(f"{k} = {_conf_quote(v)}\n" for k, v in conf.items())

    def start(self) -> None:
        """Start and wait until it accepts connections; raise with the log tail otherwise."""
        res = self.pg_ctl("-l", str(self.log_file), "-w", "-t", "60", "start", check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL failed to start on port {self.port} (pg_ctl exit {res.returncode}):\n"
                f"{res.stdout}{res.stderr}\n--- {self.log_file} ---\n{_tail(self.log_file)}"
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.admin_conn().close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL not reachable on port {self.port}:\n{_tail(self.log_file)}"
                    ) from exc
                time.sleep(0.2)

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.pg_ctl("-m", "fast", "-w", "-t", "60", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def set_config(self, restart: bool = False, **settings: str | int) -> None:
        """ALTER SYSTEM each setting, then reload (or restart, for postmaster-level ones)."""
        with self.admin_conn() as conn:
            for key, value in settings.items():
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(key), sql.Literal(str(value))))
            if not restart:
                conn.execute("SELECT pg_reload_conf()")
        if restart:
            self.restart()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def start_pg_server(settings: Mapping[str, str] | None = None, attempts: int = 3,
                    major: int = PG_MAJOR, initdb_args: Sequence[str] = ()) -> PgServer:
    """initdb (with `initdb_args` added) + start a new PostgreSQL `major` cluster in a fresh
    /tmp dir on a free port (retrying on a port race).

    The caller owns the returned server and must call `destroy()`.
    """
    bin_dir = find_pg_bin_dir(major)
    os_user = server_os_user()
    last_error: Exception | None = None
    for _ in range(attempts):
        base = Path(tempfile.mkdtemp(prefix="backuptool-pg-", dir="/tmp"))
        base.chmod(0o755)
        server = PgServer(
            bin_dir=bin_dir,
            os_user=os_user,
            base_dir=base,
            port=free_port(),
            password=f"pgpw-{secrets.token_hex(12)}",
            settings=dict(settings or {}),
            initdb_args=tuple(initdb_args),
        )
        try:
            server.init()
            server.start()
            return server
        except Exception as exc:  # noqa: BLE001 - retried, then re-raised
            last_error = exc
            server.destroy()
            if "already in use" not in str(exc):
                raise
    assert last_error is not None
    raise last_error


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL 15 cluster (see PgServer)."""
    server = start_pg_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_cluster_factory() -> Iterator[Callable[..., PgServer]]:
    """Start extra clusters for one test, e.g.
    `pg_cluster_factory(archive_mode="on", archive_command="cp %p /x/%f")` (raw values,
    quoted when written); each is stopped and removed after the test."""
    servers: list[PgServer] = []

    def make(**settings: str) -> PgServer:
        server = start_pg_server(settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.destroy()


def _unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fresh_db(pg_server: PgServer) -> Iterator[Callable[[str], DbHandle]]:
    """Factory: `fresh_db(prefix="t")` creates a new empty database with a unique name;
    all are dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "t") -> DbHandle:
        handle = pg_server.create_db(_unique_name(prefix))
        created.append(handle.name)
        return handle

    yield make
    for name in created:
        pg_server.drop_db(name)


@pytest.fixture
def empty_db(fresh_db: Callable[[str], DbHandle]) -> DbHandle:
    """One new empty database for this test."""
    return fresh_db("empty")


@pytest.fixture(scope="session")
def seed_template(pg_server: PgServer) -> str:
    """Name of the template database holding the seed (connections to it are disallowed,
    so that `CREATE DATABASE ... TEMPLATE` never finds it busy)."""
    pg_server.create_db(SEED_TEMPLATE)
    pg_server.load_sql(SEED_TEMPLATE, SEED_FILES)
    with pg_server.admin_conn() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                sql.Identifier(SEED_TEMPLATE)
            )
        )
    return SEED_TEMPLATE


@pytest.fixture(scope="session")
def seed_db(pg_server: PgServer, seed_template: str) -> DbHandle:
    """A session-wide seeded database. Read-only by convention: never modify it."""
    return pg_server.create_db("seed_ro", template=seed_template)


@pytest.fixture
def seed_copy(pg_server: PgServer, seed_template: str) -> Iterator[Callable[[str], DbHandle]]:
    """Factory: `seed_copy(prefix="seed")` makes a new writable copy of the seed; all are
    dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "seed") -> DbHandle:
        handle = pg_server.create_db(_unique_name(prefix), template=seed_template)
        created.append(handle.name)
        return handle

    yield make
    for name in created:
        pg_server.drop_db(name)


@pytest.fixture
def seed_db_rw(seed_copy: Callable[[str], DbHandle]) -> DbHandle:
    """One writable copy of the seed for this test."""
    return seed_copy("seed")


def run_sql(server: PgServer, db: str, *statements: str) -> Any:
    """Run statements as the superuser in ``db``; the first row of the last one that returns rows."""
    with server.admin_conn(db) as conn:
        result = None
        for stmt in statements:
            cur = conn.execute(stmt)
            result = cur.fetchone() if cur.description else None
        return result


def switch_and_wait_archived(server: PgServer, timeout: float = 60) -> None:
    """Switch to a new WAL segment and wait until the one holding everything so far is archived."""
    with server.admin_conn() as conn:
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + timeout
        while True:
            done, failed = conn.execute("SELECT last_archived_wal, failed_count FROM pg_stat_archiver").fetchone()
            if done is not None and done >= last:
                return
            assert failed == 0, f"archiving failed, see {server.log_file}"
            assert time.monotonic() < deadline, f"{last} not archived, see {server.log_file}"
            time.sleep(0.05)


def logged_statements(server: PgServer, dbname: str, since: int) -> list[str]:
    """Each statement ``server`` logged (``log_statement = all``) for ``dbname`` after byte
    ``since`` of its log, with its continuation lines."""
    text = server.log_file.read_bytes()[since:].decode("utf-8", "replace")
    entries = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
    return [e for e in entries if f"@{dbname} " in e.split("\n", 1)[0]
            and re.search(r"LOG:  (statement|execute [^:]*):", e)]


def logged_pid(entry: str) -> str:
    """The server process of a :func:`logged_statements` entry."""
    return entry.split("[", 1)[1].split("]", 1)[0]
