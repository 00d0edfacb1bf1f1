"""``backup full|incremental`` into S3 with their first repository reads made ahead by a thread
while the command line loads (cli/ahead.py ``start_backup``): the same backups, the reads the
backup starts with answered from the journal, and the listing the backup makes again under
its lock taken from the store."""

from __future__ import annotations

import json
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
