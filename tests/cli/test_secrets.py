"""Secrets never leak: every command of the CLI, run against an encrypted repository and an
archiving PostgreSQL 15 cluster with a distinctive database password and encryption key,
while a watcher reads ``/proc/*/cmdline`` of every process on the machine.

Checked for the password and the key (base64, hex and raw forms): each command's stdout and
stderr, every process's arguments while the commands run (pg_dump, psql, pg_restore,
pg_basebackup, the archiver's ``wal push``, the restored server's ``wal fetch``...), every
object in the repository (decrypted and decompressed), the server logs and the recovered
data directory's configuration. The list of commands is read from the CLI itself, so a new
command without a case here fails the test.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import zstandard
from server_tool import install_source, write_wrapper
from support.cli import Cli
from support.clusters import PgServer, free_port, start_pg_server
from support.paths import FIXTURES_DIR, SEED_FILES

from backup_tool.repository.storage.encrypted import EncryptionKey, decrypt_stream

pytestmark = pytest.mark.slow


@dataclass
class Watched:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    cmdlines: set[bytes]


@dataclass
class Leak:
    where: str
    secret: str


@dataclass
class World:
    server: PgServer
    base: Path
    repo: Path
    key: EncryptionKey
    key_file: Path
    wrapper: Path
    cli: Cli
    watched: list[Watched] = field(default_factory=list)
    pgdatas: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    @property
    def password(self) -> str:
        return self.server.password

    def secrets(self) -> dict[str, bytes]:
        return {"database password": self.password.encode(),
                "key (base64)": base64.b64encode(self.key.secret),
                "key (hex)": self.key.secret.hex().encode(),
                "key (raw)": self.key.secret}

    def env(self) -> dict[str, str]:
        """What a cron job would set: the DSN (with its password) and the key, in the environment."""
        return {**self.cli.base_env(), "DATABASE_URL": self.server.dsn("app"),
                "BACKUP_TOOL_ENCRYPTION_KEY": base64.b64encode(self.key.secret).decode(),
                "BACKUP_TOOL_REPO": str(self.repo), "BACKUP_TOOL_SERVER_COMMAND": str(self.wrapper),
                "PGPASSWORD": self.password}

    def dsn_without_password(self, db: str, port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.server.port}/{db}"

    def run(self, *args: str | Path, expect: int | tuple[int, ...] = 0) -> Watched:
        """Run the CLI while recording every process's arguments that hold a secret (or a tool name)."""
        argv = [sys.executable, "-m", "backup_tool", *map(str, args)]
        proc = subprocess.Popen(argv, env=self.env(), cwd=self.cli.workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        result: dict[str, bytes] = {}
        reader = threading.Thread(target=lambda: result.update(zip(("out", "err"), proc.communicate(), strict=True)))
        reader.start()
        needles = list(self.secrets().values()) + [b"pg_dump", b"psql", b"pg_restore", b"pg_basebackup",
                                                   b"wal\x00push", b"wal\x00fetch"]
        seen: set[bytes] = set()
        me = str(os.getpid())
        while reader.is_alive():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if any(n in cmdline for n in needles) and b"pytest" not in cmdline:
                    seen.add(cmdline)
            time.sleep(0.002)
        reader.join()
        watched = Watched([str(a) for a in args], proc.returncode, result["out"].decode(errors="replace"),
                          result["err"].decode(errors="replace"), seen)
        self.watched.append(watched)
        assert watched.returncode in (expect if isinstance(expect, tuple) else (expect,)), \
            (args, watched.returncode, failed_checks(watched.stdout), watched.stderr[-2000:])
        return watched


def failed_checks(stdout: str) -> Any:
    """The failed checks of a --json report (the whole stdout's tail if it is not one)."""
    try:
        body = json.loads(stdout)
    except ValueError:
        return stdout[-2000:]
    checks = (body.get("validation") or body).get("checks", []) if isinstance(body, dict) else []
    return [c for c in checks if not c.get("ok")] or stdout[-2000:]


def wait_archived(server: PgServer) -> None:
    with server.admin_conn() as conn:
        conn.execute("SELECT pg_logical_emit_message(false, 'backup-tool-test', 'tick')")
        last = conn.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 60
        while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0] or "") < last:
            assert time.monotonic() < deadline, f"{last} not archived:\n{server.log_file.read_text()[-3000:]}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="backup-tool-secrets-", dir="/tmp"))
    base.chmod(0o755)
    key = EncryptionKey(secrets.token_bytes(32))
    key_file = base / "repo.key"
    key_file.write_text(base64.b64encode(key.secret).decode() + "\n")
    wrapper = write_wrapper(base / "bin" / "backup-tool", install_source(base / "src"),
                            {"BACKUP_TOOL_ENCRYPTION_KEY_FILE": str(key_file)})
    repo = base / "repo"
    repo.mkdir()
    server = start_pg_server({"archive_mode": "on", "archive_command": f"{wrapper} wal push %p --repo {repo}"})
    for path in (repo, key_file):
        shutil.chown(path, server.os_user, server.os_user)
    key_file.chmod(0o600)
    workdir = base / "cli"
    workdir.mkdir()
    w = World(server, base, repo, key, key_file, wrapper, Cli(workdir=workdir))
    try:
        server.create_db("app")
        server.load_sql("app", list(SEED_FILES))
        yield w
    finally:
        for pgdata in w.pgdatas:
            if (pgdata / "postmaster.pid").exists():
                server.run_as_os_user([server.bin_dir / "pg_ctl", "-D", pgdata, "-m", "immediate", "stop"],
                                      check=False)
        server.destroy()
        shutil.rmtree(base, ignore_errors=True)


def cli_commands() -> set[str]:
    """Every leaf command of the CLI, as 'group name' or 'name'."""
    import typer.main

    from backup_tool.cli.program import app

    found: set[str] = set()

    def walk(group: Any, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix}{name} ")
            else:
                found.add(f"{prefix}{name}")

    walk(typer.main.get_command(app), "")
    return found


def readable_forms(key: str, raw: bytes, repo_key: EncryptionKey) -> Iterator[tuple[str, bytes]]:
    """The object as stored, decrypted, decompressed, and (for base backups) its tar members."""
    yield key, raw
    if raw.startswith(b"BTENC"):
        raw = b"".join(decrypt_stream(repo_key, key, [raw]))
        yield f"{key} (decrypted)", raw
    if raw.startswith(b"\x28\xb5\x2f\xfd"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read()
        yield f"{key} (decompressed)", raw
        if b"ustar" in raw[:1024]:
            import io

            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar:
                    if member.isfile():
                        data = tar.extractfile(member)
                        assert data is not None
                        yield f"{key}:{member.name}", data.read()


def find_leaks(world: World) -> list[Leak]:
    leaks: list[Leak] = []

    def scan(where: str, data: bytes) -> None:
        for name, secret in world.secrets().items():
            if secret in data:
                leaks.append(Leak(where, name))

    for w in world.watched:
        scan(f"stdout of {' '.join(w.args)}", w.stdout.encode())
        scan(f"stderr of {' '.join(w.args)}", w.stderr.encode())
        for cmdline in w.cmdlines:
            scan(f"arguments {cmdline[:120]!r} (during {' '.join(w.args)})", cmdline)
    objects = [p for p in world.repo.rglob("*") if p.is_file()]
    assert len(objects) > 20
    for path in objects:
        key = path.relative_to(world.repo).as_posix()
        for where, data in readable_forms(key, path.read_bytes(), world.key):
            scan(f"repository object {where}", data)
    for log in [world.server.log_file, *(p / "log" for p in world.pgdatas)]:
        for path in ([log] if log.is_file() else log.rglob("*") if log.is_dir() else []):
            scan(f"server log {path}", path.read_bytes())
    for path in world.written:
        scan(f"file written by the tool {path}", path.read_bytes())
    for pgdata in world.pgdatas:
        for name in ("postgresql.auto.conf", "postgresql.conf"):
            if (pgdata / name).exists():
                scan(f"{pgdata / name}", (pgdata / name).read_bytes())
    return leaks


def test_no_command_leaks_a_secret(world: World) -> None:
    server, run = world.server, world.run
    covered: set[str] = set()

    def cmd(name: str, *args: str | Path, expect: int | tuple[int, ...] = 0) -> Watched:
        covered.add(name)
        return run(*name.split(), *args, expect=expect)

    cmd("version")
    cmd("check")
    full = cmd("backup full", "--json")
    # This server's port in the child's conninfo: another test's processes (parallel runs) do not count.
    assert any((b"psql" in c or b"pg_dump" in c) and f"port={server.port}".encode() in c for c in full.cmdlines), \
        "the watcher saw no child process"
    with server.admin_conn("app") as conn:
        conn.execute("UPDATE public.coupons SET code = code || '-x' WHERE ctid IN "
                     "(SELECT ctid FROM public.coupons LIMIT 1)")
    cmd("backup incremental")
    wait_archived(server)
    cmd("backup base", "--json")
    wait_archived(server)
    cmd("list")
    cmd("show", "latest")
    cmd("verify", "all", "--restore-test")
    cmd("validate", "--against", "latest")
    target = world.dsn_without_password("restored")
    cmd("restore full", "--target-dsn", target, "--create", "--backup", json.loads(full.stdout)["id"])
    cmd("restore tables", "--tables", "public.coupons", "--target-dsn", world.dsn_without_password("app"),
        "--into-schema", "secrets_check")

    segment = world.base / "spool" / "000000090000000000000001"
    segment.parent.mkdir()
    segment.write_bytes(secrets.token_bytes(1 << 16))
    cmd("wal push", segment, "--batch", "1")
    cmd("wal fetch", segment.name, world.base / "fetched")
    assert (world.base / "fetched").read_bytes() == segment.read_bytes()
    cmd("wal status")

    wait_archived(server)
    pgdata = server.make_user_dir("recovered")
    world.pgdatas.append(pgdata)
    cmd("restore pitr", "--latest", "--pgdata", pgdata, "--port", str(free_port()), "--no-archive", "--json")

    migrations = FIXTURES_DIR / "migrations"
    with server.admin_conn() as conn:
        conn.execute("CREATE DATABASE replayed")
    cmd("schema replay", "--migrations", migrations, "--target-dsn", world.dsn_without_password("replayed"))
    cmd("schema diff", "--migrations", migrations, "--against", "latest", expect=(0, 3))
    for fmt in ("cron", "systemd", "kubernetes"):
        cmd("schedule", "--format", fmt)
    cmd("run-due")
    cmd("health", "--record", "--full", expect=(0, 3))
    metrics = world.base / "metrics.prom"
    cmd("status", "--prometheus", metrics, expect=(0, 1, 2))
    report = world.base / "audit.html"
    cmd("audit", "--format", "html", "--output", report)
    cmd("audit", "--format", "markdown")
    cmd("retention apply", "--dry-run")
    cmd("retention apply")
    world.written += [metrics, report]

    wrong = world.password[::-1]
    bad = cmd("backup full", "--dsn", server.dsn("app").replace(world.password, wrong), "--debug", expect=1)
    assert "password authentication failed" in bad.stderr and "Traceback" in bad.stderr
    assert wrong not in bad.stdout + bad.stderr

    missing = set(cli_commands()) - covered
    assert not missing, f"commands without a secrets case: {sorted(missing)}"
    leaks = find_leaks(world)
    assert not leaks, "\n".join(f"{leak.secret} found in {leak.where}" for leak in leaks)
