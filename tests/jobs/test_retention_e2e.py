"""End to end with real backups of the seed database through the CLI: run-due (idempotent,
lock-aware), status, retention with real deletion, and S3 Object Lock on moto: locked
objects cannot be deleted early, retention skips them and says why, and deletes every
version once the lock has passed; abandoned multipart uploads are swept."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError

from backup_tool.config.policy import load_policy
from backup_tool.jobs.expire import check_object_lock
from backup_tool.logical.backup import lock_name
from backup_tool.repository.storage import open_storage

pytestmark = pytest.mark.slow
UTC = timezone.utc


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_run_due_status_and_retention(cli: Any, local_repo: str, seed_db: Any, tmp_path: Path) -> None:
    common = ["--repo", local_repo, "--dsn", seed_db.dsn]
    first = cli.json("run-due", *common)
    assert [t["kind"] for t in first["taken"]] == ["full"] and first["due"][0]["reason"] == "no full backup yet"
    # The seed has tables without RLS in public: the rls health check run after the backup fails,
    # which status reports as a WARNING (the backups themselves are fine).
    assert [(c["name"], c["ok"]) for c in first["health"]["ran"]["checks"]] == [
        ("schema", True), ("rls", False), ("foreign_keys", True), ("index_performance", False),
        ("function_execution", True)]
    again = cli.json("run-due", *common)
    assert again["taken"] == [] and again["due"] == [] and again["health"]["due"] == []
    status = cli("status", *common)
    assert status.returncode == 1, status.stdout + status.stderr
    assert status.stdout.startswith("BACKUP WARNING - health check rls failed at ")

    tomorrow = datetime.now(UTC).replace(hour=3, minute=30, second=0, microsecond=0) + timedelta(days=1)
    refused = cli("run-due", *common, "--now", _iso(tomorrow))
    assert refused.returncode == 2 and "--dry-run" in refused.stderr, "a real backup is only taken at the real time"
    ahead = cli.json("run-due", *common, "--now", _iso(tomorrow), "--dry-run")
    assert [d["kind"] for d in ahead["due"]] == ["full"] and ahead["taken"] == []
    assert "slot" in ahead["due"][0]["reason"]
    assert len(cli.json("list", "--repo", local_repo)) == 1, "a dry run takes nothing"
    newer = cli.json("backup", "full", *common)
    incr = cli.json("backup", "incremental", *common)
    assert incr["parent_id"] == newer["id"]

    missed = cli("status", *common, "--now", _iso(tomorrow + timedelta(days=2)))
    assert missed.returncode == 2 and "full backup missed" in missed.stdout

    fresh = str(tmp_path / "fresh-repo")
    with psycopg.connect(seed_db.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                     (lock_name(open_storage(fresh).url, seed_db.name),))
        held = cli("run-due", "--repo", fresh, "--dsn", seed_db.dsn)
    assert held.returncode == 4, held.stderr
    assert "another backup" in held.stderr

    listed = [e["id"] for e in cli.json("list", "--repo", local_repo)]
    assert len(listed) == 3
    far = cli.json("retention", "apply", *common, "--now", _iso(datetime.now(UTC) + timedelta(days=45)))
    newest_full = newer["id"]
    assert far["deleted"] == [first["taken"][0]["id"]]
    assert set(far["kept"]) == {newest_full, incr["id"]}
    reasons = {d["id"]: d["reasons"] for d in far["decisions"]}
    assert "newest full" in reasons[newest_full]
    assert any(r.startswith("newest backup") for r in reasons[incr["id"]])
    assert [e["id"] for e in cli.json("list", "--repo", local_repo)] == [newest_full, incr["id"]]
    assert not list((Path(local_repo) / "backups").glob(first["taken"][0]["id"] + "*"))
    restored_ok = cli.json("verify", "--repo", local_repo, "all")
    assert restored_ok["ok"] is True


def _locked_policy(tmp_path: Path, mode: str = "governance") -> str:
    path = tmp_path / f"locked-{mode}.toml"
    path.write_text(f'name = "locked"\n[object_lock]\nmode = "{mode}"\n[retention]\nfull_days = 2\n')
    return str(path)


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    versions = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return [v["Key"] for v in versions.get("Versions", []) + versions.get("DeleteMarkers", [])]


def test_object_lock_on_s3(cli: Any, s3_bucket_factory: Callable[..., str], seed_db: Any, tmp_path: Path) -> None:
    bucket = s3_bucket_factory(object_lock=True)
    repo = f"s3://{bucket}/prod"
    policy = _locked_policy(tmp_path)
    common = ["--repo", repo, "--dsn", seed_db.dsn, "--policy", policy]
    old = cli.json("backup", "full", *common)
    new = cli.json("backup", "full", *common)
    client = boto3.client("s3")
    storage = open_storage(repo)
    assert check_object_lock(storage, load_policy(policy))[0] is True
    plain = open_storage(f"s3://{s3_bucket_factory()}/x")
    ok, detail = check_object_lock(plain, load_policy(policy))
    assert not ok and "Object Lock disabled" in detail

    old_keys = [f"prod/manifests/{old['id']}.json"] + [
        f"prod/{o.key}" for o in storage.list(f"backups/{old['id']}/")]
    head = client.head_object(Bucket=bucket, Key=old_keys[1])
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(ClientError) as err:
        client.delete_object(Bucket=bucket, Key=old_keys[1], VersionId=head["VersionId"])
    assert err.value.response["Error"]["Code"] == "AccessDenied", "a locked object cannot be deleted early"

    future = _iso(datetime.now(UTC) + timedelta(days=5))
    dry = cli.json("retention", "apply", *common, "--dry-run", "--now", future)
    real = cli.json("retention", "apply", *common, "--now", future)
    assert dry["deleted"] == real["deleted"] == []
    reasons = {d["id"]: d["reasons"] for d in real["decisions"]}
    assert any("objects locked (governance) until" in r and "refuses" in r for r in reasons[old["id"]]), reasons
    assert all(_keys(client, bucket, k) for k in old_keys), "nothing was deleted or hidden"
    assert [e["id"] for e in cli.json("list", "--repo", repo)] == [old["id"], new["id"]]

    soon = datetime.now(UTC) + timedelta(seconds=3)
    for key in old_keys:  # an administrator with bypass rights shortens the governance lock
        client.put_object_retention(Bucket=bucket, Key=key, BypassGovernanceRetention=True,
                                    Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon})
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 1.5)
    # the storage's lock has passed: evaluated past the recorded retain-until, the backup is
    # deleted with every version, no delete marker left behind
    later = _iso(datetime.now(UTC) + timedelta(days=40))
    gone = cli.json("retention", "apply", *common, "--now", later)
    assert gone["deleted"] == [old["id"]] and new["id"] in gone["kept"]
    for key in old_keys:
        assert _keys(client, bucket, key) == [], f"{key}: versions or delete markers left"
    assert [e["id"] for e in cli.json("list", "--repo", repo)] == [new["id"]]


def test_s3_abandoned_multipart_uploads(cli: Any, s3_bucket_factory: Callable[..., str]) -> None:
    bucket = s3_bucket_factory()
    repo = f"s3://{bucket}/prod"
    client = boto3.client("s3")
    stale = client.create_multipart_upload(Bucket=bucket, Key="prod/backups/20261101T020000Z-Fdead/data/1.copy.zst")
    active = client.create_multipart_upload(Bucket=bucket, Key="prod/backups/20261125T020000Z-Flive/data/1.copy.zst")
    client.upload_part(Bucket=bucket, Key="prod/backups/20261125T020000Z-Flive/data/1.copy.zst",
                       UploadId=active["UploadId"], PartNumber=1, Body=b"x" * 1024)
    dry = cli.json("retention", "apply", "--repo", repo, "--dry-run")
    assert [g["what"] for g in dry["garbage"]] == ["backups/20261101T020000Z-Fdead/"]
    result = cli.json("retention", "apply", "--repo", repo)
    assert [g["unfinished_uploads"] for g in result["garbage"]] == [1]
    assert any("20261125T020000Z-Flive" in n for n in result["notes"])
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [active["UploadId"]]
    assert stale["UploadId"] not in [u["UploadId"] for u in uploads]
