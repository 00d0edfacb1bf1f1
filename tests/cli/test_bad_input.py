"""Every bad input a user can give, as a table: each case runs the real CLI and must end with
its exit code (1 failed, 2 usage, 3 integrity) and exactly one clear line on stderr that
says what is wrong (and what to do), with no traceback and no secret.

The failures are real, not simulated: a closed port and an unresolvable name, a wrong
password, a role without SELECT on a table, a bucket that does not exist, an S3 endpoint that
enforces credentials and permissions (a second moto server with authentication on), a 1 MiB
tmpfs that fills up, repositories edited to hold a newer format or broken JSON.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from clioutput import only_line
from support.cli import Cli
from support.clusters import DbHandle, PgServer, free_port

pytestmark = pytest.mark.slow

WRONG_PASSWORD = "wrong-pw-7c1e"
KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()


@dataclass
class AuthS3:
    endpoint: str
    bucket: str
    reader_key: str
    reader_secret: str


@dataclass
class World:
    server: PgServer
    db: DbHandle
    cli: Cli
    base: Path
    repo: str
    enc_repo: str
    backup_id: str
    enc_backup_id: str
    newer_repo: str
    newer_enc_repo: str
    broken_repo: str
    auth_s3: AuthS3
    noread_dsn: str
    full_disk: str | None
    big_db: DbHandle
    two_db_repo: str

    def target(self, name: str = "target") -> str:
        return self.server.dsn(f"bad_input_{name}")


def copy_repo(src: str, dest: Path) -> str:
    shutil.copytree(src, dest)
    return str(dest)


def rewrite_manifest(repo: str, backup_id: str, edit: Callable[[dict[str, Any]], None]) -> None:
    from backup_tool.repository.manifest import _digest

    path = Path(repo) / "manifests" / f"{backup_id}.json"
    body = json.loads(path.read_bytes())
    edit(body)
    body["manifest_sha256"] = _digest(body)
    path.write_text(json.dumps(body))


def add_backup_of(repo: str, backup_id: str, database: str) -> str:
    """A second manifest, of another database, sharing ``backup_id``'s objects."""
    from backup_tool.repository.manifest import _digest

    body = json.loads((Path(repo) / "manifests" / f"{backup_id}.json").read_bytes())
    body.update(id=backup_id[:-4] + "beef", database=database)
    body["manifest_sha256"] = _digest(body)
    (Path(repo) / "manifests" / f"{body['id']}.json").write_text(json.dumps(body))
    return str(body["id"])


def start_auth_s3(base: Path) -> tuple[subprocess.Popen[bytes], AuthS3]:
    """A moto server that checks credentials and IAM permissions after its first three calls."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, cwd=base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    boto3.client("s3", **admin).create_bucket(Bucket="locked")
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    return proc, AuthS3(endpoint, "locked", key["AccessKeyId"], key["SecretAccessKey"])


def mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def world(pg_server: PgServer, seed_db: DbHandle, s3_server: Any) -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="backup-tool-bad-input-"))
    (base / "cli").mkdir()
    cli = Cli(workdir=base / "cli")
    auth_proc, auth = start_auth_s3(base)
    full_disk = base / "full-disk"
    mounted = mount_tmpfs(full_disk)
    big = pg_server.create_db(f"bad_input_big_{uuid.uuid4().hex[:6]}")
    try:
        big.execute("CREATE TABLE big AS SELECT g AS id, md5(random()::text) || md5(random()::text) AS noise"
                    " FROM generate_series(1, 60000) g")
        with pg_server.admin_conn(seed_db.name) as conn:
            conn.execute("DROP ROLE IF EXISTS bt_noread")
            conn.execute("CREATE ROLE bt_noread LOGIN PASSWORD 'noread-pw-2f9a'")
            for schema in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                                       "AND nspname <> 'information_schema'").fetchall():
                conn.execute(f'GRANT USAGE ON SCHEMA "{schema[0]}" TO bt_noread')
                conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema[0]}" TO bt_noread')
                conn.execute(f'GRANT SELECT ON ALL SEQUENCES IN SCHEMA "{schema[0]}" TO bt_noread')
            conn.execute("REVOKE SELECT ON public.coupons FROM bt_noread")
        repo, enc_repo = str(base / "repo"), str(base / "enc-repo")
        backup_id = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn)["id"]
        enc_id = cli.json("backup", "full", "--repo", enc_repo, "--dsn", seed_db.dsn,
                          env={"BACKUP_TOOL_ENCRYPTION_KEY": KEY})["id"]
        newer = copy_repo(repo, base / "newer-repo")
        rewrite_manifest(newer, backup_id, lambda body: body.update(format=99))
        newer_enc = copy_repo(enc_repo, base / "newer-enc-repo")
        schema_key = json.loads((Path(enc_repo) / "manifests" / f"{enc_id}.json").read_text())["schema"]["key"]
        obj = Path(newer_enc) / schema_key
        data = bytearray(obj.read_bytes())
        data[5] = 9
        obj.chmod(0o644)
        obj.write_bytes(bytes(data))
        broken = copy_repo(repo, base / "broken-repo")
        (Path(broken) / "manifests" / f"{backup_id}.json").write_text('{"format": 1, "id": ')
        two_dbs = copy_repo(repo, base / "two-db-repo")
        add_backup_of(two_dbs, backup_id, "bench")
        yield World(pg_server, seed_db, cli, base, repo, enc_repo, backup_id, enc_id, newer, newer_enc, broken,
                    auth, f"postgresql://bt_noread:noread-pw-2f9a@127.0.0.1:{pg_server.port}/{seed_db.name}",
                    str(full_disk) if mounted else None, big, two_dbs)
    finally:
        auth_proc.terminate()
        auth_proc.wait()
        if mounted:
            subprocess.run(["umount", str(full_disk)], check=False)
        pg_server.drop_db(big.name)
        with pg_server.admin_conn() as conn:
            leftovers = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'bad\\_input\\_%'")]
        for name in leftovers:
            pg_server.drop_db(name)
        with pg_server.admin_conn(seed_db.name) as conn:
            conn.execute("DROP OWNED BY bt_noread")
            conn.execute("DROP ROLE IF EXISTS bt_noread")
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class Case:
    name: str
    args: Callable[[World], list[str]]
    code: int
    needles: tuple[str, ...]
    env: Callable[[World], dict[str, str]] = lambda w: {}


def dsn_with(w: World, **parts: str) -> str:
    host, port = parts.get("host", "127.0.0.1"), parts.get("port", str(w.server.port))
    password, db = parts.get("password", w.server.password), parts.get("db", w.db.name)
    return f"postgresql://postgres:{password}@{host}:{port}/{db}"


BAD_TIMES = ("2026-13-45", "yesterday", "25/11/2026", "2026-11-25T25:00", "2026-02-30T00:00:00Z")

CASES = [
    # database
    Case("unreachable host", lambda w: ["backup", "full", "--repo", w.repo, "--dsn", dsn_with(w, port="1")],
         1, ("cannot connect", "127.0.0.1")),
    Case("unknown host name", lambda w: ["backup", "full", "--repo", w.repo,
                                         "--dsn", dsn_with(w, host="no-such-host.invalid")],
         1, ("cannot connect", "no-such-host.invalid")),
    Case("wrong password", lambda w: ["backup", "full", "--repo", w.repo,
                                      "--dsn", dsn_with(w, password=WRONG_PASSWORD)],
         1, ("password authentication failed",)),
    Case("missing database", lambda w: ["backup", "full", "--repo", w.repo, "--dsn", dsn_with(w, db="no_such_db")],
         1, ("no_such_db", "does not exist")),
    Case("no privileges for pg_dump", lambda w: ["backup", "full", "--repo", w.repo, "--dsn", w.noread_dsn],
         1, ("bt_noread may not read", "public.coupons", "grant")),
    Case("malformed DSN", lambda w: ["backup", "full", "--repo", w.repo, "--dsn", "host=127.0.0.1 port"],
         2, ("not a valid PostgreSQL connection string",)),
    # repository
    Case("missing bucket", lambda w: ["list", "--repo", "s3://no-such-bucket-bt/prod"], 1,
         ("bucket 'no-such-bucket-bt' does not exist",)),
    Case("unknown S3 credentials", lambda w: ["list", "--repo", f"s3://{w.auth_s3.bucket}/prod"], 1,
         ("access denied", "credentials"),
         lambda w: {"AWS_ENDPOINT_URL_S3": w.auth_s3.endpoint, "AWS_ACCESS_KEY_ID": "AKIANOTKNOWN",
                    "AWS_SECRET_ACCESS_KEY": "not-a-secret"}),
    Case("access denied by IAM", lambda w: ["backup", "full", "--repo", f"s3://{w.auth_s3.bucket}/prod",
                                            "--dsn", w.db.dsn], 1, ("access denied",),
         lambda w: {"AWS_ENDPOINT_URL_S3": w.auth_s3.endpoint, "AWS_ACCESS_KEY_ID": w.auth_s3.reader_key,
                    "AWS_SECRET_ACCESS_KEY": w.auth_s3.reader_secret}),
    Case("unsupported repository URL", lambda w: ["list", "--repo", "ftp://host/path"], 2,
         ("unsupported repository URL",)),
    Case("full local disk", lambda w: ["backup", "full", "--repo", w.full_disk or "", "--dsn", w.big_db.dsn], 1,
         ("no space left on device",)),
    Case("repository written by a newer format", lambda w: ["show", "--repo", w.newer_repo, w.backup_id], 1,
         ("newer backup-tool", "format 99", "upgrade")),
    Case("object written by a newer encryption format",
         lambda w: ["restore", "full", "--repo", w.newer_enc_repo, "--target-dsn", w.target("newer"), "--create"], 1,
         ("encryption format 9", "upgrade"), lambda w: {"BACKUP_TOOL_ENCRYPTION_KEY": KEY}),
    Case("manifest that is not valid JSON", lambda w: ["show", "--repo", w.broken_repo, w.backup_id], 3,
         ("not valid JSON",)),
    # backups, tables and times
    Case("unknown backup id", lambda w: ["show", "--repo", w.repo, "20990101T000000Z-Fdead"], 1, ("not found",)),
    Case("unknown backup id to restore", lambda w: ["restore", "full", "--repo", w.repo, "--backup", "nope",
                                                    "--target-dsn", w.target()], 1, ("'nope' not found",)),
    Case("latest in a repository of several databases, none named",
         lambda w: ["restore", "full", "--repo", w.two_db_repo, "--target-dsn", w.target("latest")], 2,
         ("ambiguous", "bench", "--database")),
    Case("latest of a database the repository has no backup of",
         lambda w: ["verify", "latest", "--repo", w.repo, "--database", "bench"], 1, ("'bench'", "--database")),
    Case("a backup id of another database than --database",
         lambda w: ["show", w.backup_id, "--repo", w.two_db_repo, "--database", "bench"], 2,
         ("not 'bench'", "is a backup of database")),
    Case("unknown table name", lambda w: ["restore", "tables", "--repo", w.repo, "--tables", "public.cupons",
                                          "--target-dsn", w.target(), "--into-schema", "x"], 1,
         ("public.cupons", "coupons")),
    *[Case(f"malformed timestamp {ts!r} ({opt})", lambda w, cmd=cmd: [*cmd, "--repo", w.repo], 2,
           ("is not an ISO 8601 time",))
      for ts in BAD_TIMES[:1]
      for opt, cmd in (("retention --now", ["retention", "apply", "--now", ts]),
                       ("status --now", ["status", "--now", ts]),
                       ("run-due --now", ["run-due", "--now", ts]),
                       ("audit --now", ["audit", "--now", ts]),
                       ("restore tables --target-time", ["restore", "tables", "--tables", "public.coupons",
                                                         "--target-dsn", "host=127.0.0.1", "--target-time", ts]),
                       ("restore pitr --target-time", ["restore", "pitr", "--target-time", ts, "--pgdata",
                                                       "/nonexistent/pitr"]))],
    *[Case(f"malformed timestamp {ts!r}", lambda w, ts=ts: ["retention", "apply", "--now", ts, "--repo", w.repo],
           2, ("is not an ISO 8601 time",)) for ts in BAD_TIMES[1:]],
    Case("run-due --now without --dry-run (a backup cannot be taken for another time)",
         lambda w: ["run-due", "--repo", w.repo, "--now", "2026-11-26T02:05:00Z"], 2,
         ("run-due --now only plans", "--dry-run")),
    Case("missing local repository", lambda w: ["list", "--repo", str(w.base / "no-such-repo")], 1,
         ("does not exist", "no-such-repo")),
    Case("malformed LSN", lambda w: ["restore", "pitr", "--repo", w.repo, "--target-lsn", "zz/1", "--pgdata",
                                     str(w.base / "pitr")], 2, ("is not an LSN",)),
    Case("PITR target outside the covered window (no base backup)",
         lambda w: ["restore", "pitr", "--repo", w.repo, "--target-time", "2026-01-01T00:00:00Z", "--pgdata",
                    str(w.base / "pitr")], 1, ("no base backup",)),
    # policy and configuration
    # a broken policy blocks the commands that act on it (list and restores only warn: see
    # tests/cli/test_operator_errors.py)
    Case("policy file that is not TOML", lambda w: ["retention", "apply", "--dry-run", "--repo", w.repo,
                                                    "--policy", str(w.base / "bad-syntax.toml")],
         2, ("bad-syntax.toml",)),
    Case("policy value out of range", lambda w: ["retention", "apply", "--dry-run", "--repo", w.repo,
                                                 "--policy", str(w.base / "bad-value.toml")],
         2, ("full_days",)),
    Case("policy with an unknown key", lambda w: ["retention", "apply", "--dry-run", "--repo", w.repo,
                                                  "--policy", str(w.base / "bad-key.toml")],
         2, ("fulldays",)),
    Case("policy file missing", lambda w: ["retention", "apply", "--dry-run", "--repo", w.repo,
                                           "--policy", str(w.base / "missing.toml")],
         2, ("missing.toml",)),
    Case("encryption key that is not base64 of 32 bytes", lambda w: ["list", "--repo", w.repo], 2,
         ("BACKUP_TOOL_ENCRYPTION_KEY does not hold an encryption key",),
         lambda w: {"BACKUP_TOOL_ENCRYPTION_KEY": "c2hvcnQ="}),
    Case("encryption key file missing", lambda w: ["list", "--repo", w.repo], 2,
         ("cannot read the encryption key file",), lambda w: {"BACKUP_TOOL_ENCRYPTION_KEY_FILE": "/nonexistent/key"}),
    Case("restore without the encryption key", lambda w: ["restore", "full", "--repo", w.enc_repo,
                                                          "--target-dsn", w.target("nokey")], 2,
         ("is encrypted with key id", "BACKUP_TOOL_ENCRYPTION_KEY")),
    Case("restore with the wrong encryption key", lambda w: ["restore", "tables", "--repo", w.enc_repo, "--tables",
                                                             "public.coupons", "--target-dsn", w.target("wrongkey"),
                                                             "--into-schema", "x"], 2,
         ("configured key has id",), lambda w: {"BACKUP_TOOL_ENCRYPTION_KEY": OTHER_KEY}),
    Case("unknown S3 server-side encryption mode", lambda w: ["list", "--repo", "s3://any-bucket/p"], 2,
         ("BACKUP_TOOL_S3_SSE='aes'",), lambda w: {"BACKUP_TOOL_S3_SSE": "aes"}),
    # command line
    Case("missing required option", lambda w: ["restore", "full", "--repo", w.repo], 2,
         ("Missing option '--target-dsn'", "--help")),
    Case("unknown option", lambda w: ["list", "--repo", w.repo, "--colour"], 2, ("No such option: --colour",)),
    Case("option value of the wrong type", lambda w: ["backup", "full", "--jobs", "many"], 2, ("'--jobs'",)),
    Case("option value out of range", lambda w: ["backup", "full", "--jobs", "0"], 2, ("'--jobs'",)),
    Case("unknown command", lambda w: ["restor"], 2, ("No such command 'restor'",)),
    Case("conflicting restore modes", lambda w: ["restore", "tables", "--repo", w.repo, "--tables", "public.coupons",
                                                 "--target-dsn", w.target(), "--into-schema", "x", "--replace"], 2,
         ("--into-schema and --replace",)),
    Case("not a WAL file name", lambda w: ["wal", "push", str(w.base / "notwal.txt"), "--repo", w.repo], 2,
         ("is not a WAL file name",)),
    Case("migrations folder that does not exist", lambda w: ["schema", "replay", "--migrations",
                                                             str(w.base / "no-migrations"), "--target-dsn",
                                                             w.target("replay")], 2, ("does not exist",)),
    Case("WAL file that does not exist", lambda w: ["wal", "push", str(w.base / "000000010000000000000042"),
                                                    "--repo", w.repo], 1, ("does not exist",)),
]


@pytest.fixture(scope="module")
def policies(world: World) -> None:
    (world.base / "bad-syntax.toml").write_text("[retention\nfull_days = 30\n")
    (world.base / "bad-value.toml").write_text("[retention]\nfull_days = -1\n")
    (world.base / "bad-key.toml").write_text("[retention]\nfulldays = 30\n")
    (world.base / "notwal.txt").write_text("x")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_with_one_clear_line(world: World, policies: None, case: Case) -> None:
    if case.name == "full local disk" and world.full_disk is None:
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    proc = world.cli(*case.args(world), env=case.env(world), timeout=120)
    assert proc.returncode == case.code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    line = only_line(proc)
    for needle in case.needles:
        assert needle in line, (needle, line)
    output = proc.stdout + proc.stderr
    for secret in (world.server.password, WRONG_PASSWORD, "noread-pw-2f9a", KEY, OTHER_KEY,
                   world.auth_s3.reader_secret):
        assert secret not in output, f"secret leaked in {case.name}"


def test_a_full_disk_leaves_no_backup_and_no_partial_file(world: World, policies: None) -> None:
    if world.full_disk is None:
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    proc = world.cli("backup", "full", "--repo", world.full_disk, "--dsn", world.big_db.dsn)
    assert proc.returncode == 1
    assert world.cli.json("list", "--repo", world.full_disk) == []
    left = [p for p in Path(world.full_disk).rglob("*") if p.is_file()]
    assert left == [], left
