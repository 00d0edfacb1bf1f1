"""``backup full|incremental`` into S3 with their first repository reads made ahead by a thread
while the command line loads (cli/ahead.py ``start_backup``): the same backups, the reads the
backup starts with answered from the journal, and the listing the backup makes again under
its lock taken from the store."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.cli import Cli

pytestmark = pytest.mark.slow

READ_AHEAD_EVENT = "repository reads made ahead"  # backup_tool.cli.backup.READ_AHEAD_EVENT


@pytest.fixture
def repo(s3_server: Any) -> Iterator[str]:
    client = s3_server.client()
    bucket = f"bt-backup-ahead-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/backups"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def source(pg_server: Any, seed_template: str) -> Iterator[Any]:
    db = pg_server.create_db(f"backup_ahead_{uuid.uuid4().hex[:6]}", template=seed_template)
    yield db
    pg_server.drop_db(db.name)


def backup(cli: Cli, kind: str, repo: str, source: Any, env: dict[str, str] | None = None) -> tuple[Any, list[str] | None]:
    """The backup's JSON result and the reads answered ahead (None: none were made ahead)."""
    proc = cli("backup", kind, "--repo", repo, "--dsn", source.dsn, "--json", env={"BACKUP_TOOL_LOG": "json", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    ahead = [json.loads(line) for line in proc.stderr.splitlines()
             if line.startswith("{") and json.loads(line).get("event") == READ_AHEAD_EVENT]
    return json.loads(proc.stdout), (ahead[0]["reads"] if ahead else None)


def test_an_incremental_starts_from_the_reads_made_ahead(tmp_path: Any, repo: str, source: Any) -> None:
    cli = Cli(workdir=tmp_path)
    full, reads = backup(cli, "full", repo, source)
    assert reads is not None and "list encryption/" in reads and reads.count("list manifests/") == 1, reads
    source.execute("UPDATE public.crm_projects SET name = name || ' (v2)'")
    incremental, reads = backup(cli, "incremental", repo, source)
    assert (incremental["kind"], incremental["parent_id"]) == ("incremental", full["id"])
    assert reads is not None, "no reads were made ahead"
    assert f"get manifests/{full['id']}.json" in reads, reads
    assert "list catalog/" in reads, reads
    assert reads.count("list manifests/") == 1, "the listing under the lock must come from the store"
    listing = cli.json("list", "--repo", repo)
    assert [e["id"] for e in listing if e["kind"] == "incremental"] == [incremental["id"]]


def test_without_read_ahead_nothing_is_read_ahead(tmp_path: Any, repo: str, source: Any) -> None:
    full, reads = backup(Cli(workdir=tmp_path), "full", repo, source, env={"BACKUP_TOOL_READ_AHEAD": "0"})
    assert reads is None and full["kind"] == "full"


def test_an_encrypted_repository_is_guarded_and_read_ahead_alike(tmp_path: Any, repo: str, source: Any) -> None:
    """The key guard's read (the key marker) is made ahead; a backup without the key is refused
    exactly as without read-ahead, before anything is written."""
    cli = Cli(workdir=tmp_path)
    key = {"BACKUP_TOOL_ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode()}
    full, _ = backup(cli, "full", repo, source, env=key)
    incremental, reads = backup(cli, "incremental", repo, source, env=key)
    assert incremental["parent_id"] == full["id"]
    assert reads is not None and any(r.startswith("exists encryption/") for r in reads), reads
    argv = ("backup", "incremental", "--repo", repo, "--dsn", source.dsn, "--json")
    refused = [cli(*argv, env=off) for off in ({}, {"BACKUP_TOOL_READ_AHEAD": "0"})]
    assert refused[0].returncode == refused[1].returncode == 1 and "key id" in refused[0].stderr
    assert (refused[0].stdout, refused[0].stderr) == (refused[1].stdout, refused[1].stderr)


def test_a_missing_bucket_is_reported_exactly_as_without_read_ahead(tmp_path: Any, source: Any) -> None:
    cli = Cli(workdir=tmp_path)
    argv = ("backup", "incremental", "--repo", f"s3://bt-missing-{uuid.uuid4().hex[:10]}/x", "--dsn", source.dsn)
    runs = [cli(*argv, env=off) for off in ({}, {"BACKUP_TOOL_READ_AHEAD": "0"})]
    assert runs[0].returncode == runs[1].returncode == 1 and "does not exist" in runs[0].stderr
    assert (runs[0].stdout, runs[0].stderr) == (runs[1].stdout, runs[1].stderr)
