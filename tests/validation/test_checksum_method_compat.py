"""Backups written before checksum methods were recorded (row-text checksums, no
``checksum_method``, an older format), or with the typed-row method before typed-column
(format 5), keep validating and restoring: validation computes with the manifest's method, so
their checksums still compare, and a changed row still fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from support.cli import Cli

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.postgres import connection as postgres
from backup_tool.repository.manifest import CHECKSUM_METHOD_FORMAT, TYPED_COLUMN_FORMAT, _digest

pytestmark = pytest.mark.slow


def as_written_by(repo: str, backup_id: str, dsn: str, method: ChecksumMethod, fmt: int) -> dict[str, Any]:
    """Rewrites the backup's manifest as an earlier version wrote it: every table's checksum by
    ``method`` (read from the unchanged source), recorded as that version did, format ``fmt``."""
    path = Path(repo) / "manifests" / f"{backup_id}.json"
    body = json.loads(path.read_text())
    assert body.pop("checksum_method") == "typed-column" and body["format"] == TYPED_COLUMN_FORMAT
    with postgres.ConnInfo(dsn).connect() as conn:
        for t in body["tables"]:
            if t["relkind"] == "r":
                rows, digest = postgres.table_checksum(conn, t["schema"], t["name"], t["columns"], method)
                assert rows == t["rows"]
                assert digest != t["checksum"] or rows == 0
                t["checksum"] = digest
    if method is not ChecksumMethod.ROW_TEXT:
        body["checksum_method"] = str(method)
    body["format"] = fmt
    body["manifest_sha256"] = _digest(body)
    path.write_text(json.dumps(body, indent=1, sort_keys=True))
    return body


def as_written_before_methods(repo: str, backup_id: str, dsn: str) -> dict[str, Any]:
    """As the version before checksum methods wrote it: row text, no method, format 1."""
    return as_written_by(repo, backup_id, dsn, ChecksumMethod.ROW_TEXT, 1)


def test_a_row_text_manifest_still_validates_restores_and_catches_a_changed_row(
        cli: Cli, local_repo: str, seed_copy: Callable[..., Any], fresh_db: Callable[..., Any]) -> None:
    db = seed_copy("methods")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    old = as_written_before_methods(local_repo, entry["id"], db.dsn)

    live = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", entry["id"])
    sums = next(c for c in live["checks"] if c["name"] == "content_checksums")
    assert live["ok"] is True and sums["detail"].startswith(f"{sum(t['relkind'] == 'r' for t in old['tables'])} ")

    db.execute("UPDATE public.crm_clients SET name = name || '?' "
               "WHERE ctid = (SELECT ctid FROM public.crm_clients LIMIT 1)")
    incremental = cli.json("backup", "incremental", "--repo", local_repo, "--dsn", db.dsn)
    chained = json.loads((Path(local_repo) / "manifests" / f"{incremental['id']}.json").read_text())
    assert incremental["parent_id"] == entry["id"] and "checksum_method" not in chained, "a chain keeps its method"
    fresh = {f"{t['schema']}.{t['name']}" for t in chained["tables"]
             if t["object"] and t["object"]["key"].startswith(f"backups/{incremental['id']}/")}
    assert fresh == {"public.crm_clients"}, "only the changed table is dumped again"
    assert cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", incremental["id"])["ok"] is True

    target = fresh_db("methods_r")
    restored = cli.json("restore", "full", "--repo", local_repo, "--backup", entry["id"],
                        "--target-dsn", target.dsn)
    assert restored["ok"] is True, [c for c in restored["validation"]["checks"] if not c["ok"]]

    target.execute("UPDATE public.crm_clients SET name = name || '!' "
                   "WHERE ctid = (SELECT ctid FROM public.crm_clients LIMIT 1)")
    broken = cli.json("validate", "--repo", local_repo, "--dsn", target.dsn, "--against", entry["id"], expect_rc=3)
    failed = {c["name"]: c["detail"] for c in broken["checks"] if not c["ok"]}
    assert set(failed) == {"content_checksums"} and "public.crm_clients" in failed["content_checksums"]


def test_a_typed_row_manifest_still_validates_and_catches_a_changed_row(
        cli: Cli, local_repo: str, seed_copy: Callable[..., Any]) -> None:
    db = seed_copy("typed_row")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    old = as_written_by(local_repo, entry["id"], db.dsn, ChecksumMethod.TYPED_ROW, CHECKSUM_METHOD_FORMAT)
    live = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", entry["id"])
    sums = next(c for c in live["checks"] if c["name"] == "content_checksums")
    assert live["ok"] is True and sums["detail"].startswith(f"{sum(t['relkind'] == 'r' for t in old['tables'])} ")
    db.execute("UPDATE public.crm_clients SET name = name || '!' "
               "WHERE ctid = (SELECT ctid FROM public.crm_clients LIMIT 1)")
    broken = cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", entry["id"], expect_rc=3)
    failed = {c["name"]: c["detail"] for c in broken["checks"] if not c["ok"]}
    assert set(failed) == {"content_checksums"} and "public.crm_clients" in failed["content_checksums"]
