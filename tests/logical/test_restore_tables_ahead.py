"""``restore tables`` from S3 with its repository reads made ahead by a forked process
(cli/ahead.py): the same backup, the same rows, the same verdict, and, when a read fails or
the reading process dies, the same outcome as without it. No process outlives the command."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbcompare
import pytest
from support.cli import Cli

pytestmark = pytest.mark.slow

TABLE = "public.crm_projects"
READ_AHEAD_EVENT = "repository reads made ahead"


@dataclass
class Backed:
    cli: Cli
    pg: Any
    repo: str
    bucket: str
    source: Any
    full_id: str
    incremental_id: str
    s3: Any


@pytest.fixture(scope="module")
def backed(pg_server: Any, seed_template: str, s3_server: Any, tmp_path_factory: Any) -> Iterator[Backed]:
    """A full backup of the seed and an incremental after a change to the table, in S3."""
    client = s3_server.client()
    bucket = f"bt-ahead-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    workdir = tmp_path_factory.mktemp("ahead")
    cli = Cli(workdir=workdir)
    source = pg_server.create_db(f"ahead_src_{uuid.uuid4().hex[:6]}", template=seed_template)
    repo = f"s3://{bucket}/backups"
    try:
        full = cli.json("backup", "full", "--repo", repo, "--dsn", source.dsn)
        source.execute(f"UPDATE {TABLE} SET name = name || ' (v2)'")
        incremental = cli.json("backup", "incremental", "--repo", repo, "--dsn", source.dsn)
        yield Backed(cli, pg_server, repo, bucket, source, full["id"], incremental["id"], client)
    finally:
        pg_server.drop_db(source.name)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)


@pytest.fixture
def target(backed: Backed) -> Iterator[Any]:
    """A copy of the source without the table."""
    db = backed.pg.create_db(f"ahead_dst_{uuid.uuid4().hex[:6]}", template=backed.source.name)
    db.execute(f"DROP TABLE {TABLE} CASCADE")
    yield db
    backed.pg.drop_db(db.name)


def events(stderr: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[record["event"]] = record
    return found


def survivors(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a fork keeps its parent's)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def restore(backed: Backed, target: Any, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    return backed.cli("restore", "tables", "--repo", backed.repo, "--tables", TABLE, "--target-dsn", target.dsn,
                      "--json", env={"BACKUP_TOOL_LOG": "json", **(env or {})})


def test_the_latest_backups_table_comes_back_through_the_reads_made_ahead(backed: Backed, target: Any) -> None:
    proc = restore(backed, target)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["backup_id"] == backed.incremental_id
    assert dbcompare.table_hashes(target.dsn)[TABLE] == dbcompare.table_hashes(backed.source.dsn)[TABLE]
    ahead = events(proc.stderr)[READ_AHEAD_EVENT]
    assert ahead["answered"] >= 5 and ahead["store_opened"] is False, ahead
    assert survivors(target.dsn) == []


def test_without_read_ahead_nothing_is_read_ahead(backed: Backed, target: Any) -> None:
    proc = restore(backed, target, {"BACKUP_TOOL_READ_AHEAD": "0"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backup_id"] == backed.incremental_id
    assert READ_AHEAD_EVENT not in events(proc.stderr)


def test_a_reading_process_killed_mid_way_leaves_the_restore_to_the_store(backed: Backed, target: Any,
                                                                          tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    env = {**backed.cli.base_env(), "BACKUP_TOOL_LOG": "json", "BACKUP_TOOL_TEST_PAUSE_AT": "ahead:planned",
           "BACKUP_TOOL_TEST_PAUSE_FILE": str(pause)}
    proc = subprocess.Popen([*backed.cli.command, "restore", "tables", "--repo", backed.repo, "--tables", TABLE,
                             "--target-dsn", target.dsn, "--json"], env=env, cwd=backed.cli.workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pause.exists() and pause.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    reader = int(pause.read_text())
    assert reader != proc.pid
    os.kill(reader, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["backup_id"] == backed.incremental_id
    assert dbcompare.table_hashes(target.dsn)[TABLE] == dbcompare.table_hashes(backed.source.dsn)[TABLE]
    ahead = events(err)[READ_AHEAD_EVENT]
    assert ahead["store_opened"] is True, ahead
    assert not Path(f"/proc/{reader}").exists() and survivors(target.dsn) == []


def test_a_failing_fetch_fails_the_restore_exactly_as_without_read_ahead(backed: Backed, target: Any) -> None:
    """The incremental's schema archive is gone from the bucket: the reading process fails
    to fetch it, the command then fetches it itself and fails with the same message and exit
    code as with the read-ahead off, leaving the target as it was."""
    show = backed.cli.json("show", "--repo", backed.repo, backed.incremental_id)
    schema_key = next(o["key"] for o in show["objects"] if o["key"].endswith("schema.pgdump.zst"))
    copy = f"{schema_key}.saved"
    full_key = f"backups/{schema_key}"
    backed.s3.copy_object(Bucket=backed.bucket, Key=f"backups/{copy}", CopySource={"Bucket": backed.bucket,
                                                                                      "Key": full_key})
    backed.s3.delete_object(Bucket=backed.bucket, Key=full_key)
    try:
        before = dbcompare.table_hashes(target.dsn)
        ahead = restore(backed, target)
        plain = restore(backed, target, {"BACKUP_TOOL_READ_AHEAD": "0"})
    finally:
        backed.s3.copy_object(Bucket=backed.bucket, Key=full_key, CopySource={"Bucket": backed.bucket,
                                                                              "Key": f"backups/{copy}"})
    assert ahead.returncode == plain.returncode == 1, (ahead.stderr, plain.stderr)
    assert "missing" in plain.stderr and schema_key in plain.stderr
    assert json.loads(ahead.stdout) == json.loads(plain.stdout)
    errors = [[e for e in (json.loads(line) for line in p.stderr.splitlines() if line.startswith("{"))
               if e["level"] == "error"] for p in (ahead, plain)]
    assert [[(e["event"], e["hint"], e["exit_code"]) for e in es] for es in errors] == [
        [(e["event"], e["hint"], e["exit_code"]) for e in errors[1]]] * 2
    assert events(ahead.stderr)[READ_AHEAD_EVENT]["store_opened"] is True
    assert dbcompare.table_hashes(target.dsn) == before
    assert survivors(target.dsn) == []


def test_a_missing_bucket_is_reported_exactly_as_without_read_ahead(backed: Backed, target: Any) -> None:
    argv = ("restore", "tables", "--repo", f"s3://bt-nowhere-{uuid.uuid4().hex[:8]}/x", "--tables", TABLE,
            "--target-dsn", target.dsn)
    ahead = backed.cli(*argv)
    plain = backed.cli(*argv, env={"BACKUP_TOOL_READ_AHEAD": "0"})
    assert ahead.returncode == plain.returncode == 1
    assert ahead.stderr == plain.stderr and "does not exist" in ahead.stderr


def test_an_encrypted_repository_is_read_ahead_and_decrypted_by_the_command(backed: Backed, target: Any) -> None:
    """Reads made ahead carry the stored (encrypted) bytes; the command authenticates the
    manifests and decrypts the objects with its key. A wrong key fails exactly as without."""
    key, wrong = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()
    repo = f"s3://{backed.bucket}/encrypted"
    backed.cli.json("backup", "full", "--repo", repo, "--dsn", backed.source.dsn,
                    env={"BACKUP_TOOL_ENCRYPTION_KEY": key})
    argv = ("restore", "tables", "--repo", repo, "--tables", TABLE, "--target-dsn", target.dsn, "--json")
    refused = [backed.cli(*argv, env={"BACKUP_TOOL_ENCRYPTION_KEY": wrong, **off})
               for off in ({}, {"BACKUP_TOOL_READ_AHEAD": "0"})]
    assert refused[0].returncode == refused[1].returncode != 0 and "key id" in refused[0].stderr
    assert refused[0].stdout == refused[1].stdout and refused[0].stderr == refused[1].stderr
    proc = backed.cli(*argv, env={"BACKUP_TOOL_ENCRYPTION_KEY": key, "BACKUP_TOOL_LOG": "json"})
    assert proc.returncode == 0, proc.stderr
    assert dbcompare.table_hashes(target.dsn)[TABLE] == dbcompare.table_hashes(backed.source.dsn)[TABLE]
    ahead = events(proc.stderr)[READ_AHEAD_EVENT]
    assert ahead["answered"] >= 4 and ahead["store_opened"] is False, ahead
