"""A refused delete is an Object Lock only when the store's lock state says so.

S3 answers AccessDenied both for a locked object version and for credentials lacking the
delete permission. Against moto (lock state real) behind the fault proxy (tests/faultproxy.py,
which plays the missing IAM permission with 403 AccessDenied), the storage layer must tell
them apart from the bucket's lock configuration and the version's retention and legal hold,
and retention must fail (exit 1, key and IAM action named) on a permission error while it
keeps a locked backup (exit 0)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
import pytest
from faultproxy import FaultProxy, Rule

from backup_tool.repository.storage.base import ObjectLock, ObjectLockedError, PermissionDeniedError
from backup_tool.repository.storage.s3 import S3Storage, lock_explaining

UTC = timezone.utc
DENY_VERSION_DELETE = Rule("access_denied", method="DELETE", query="versionId=", times=1000)


@pytest.fixture
def proxied(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., S3Storage]]:
    """``proxied(url, *rules)``: an S3Storage reaching moto through a proxy applying ``rules``."""
    proxies: list[FaultProxy] = []

    def make(url: str, *rules: Rule) -> S3Storage:
        proxy = FaultProxy(s3_server.endpoint_url, list(rules)).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("BACKUP_TOOL_S3_ATTEMPTS", "2")
        return S3Storage(url)

    yield make
    for proxy in proxies:
        proxy.stop()


def test_lock_explaining_is_decided_by_the_lock_state() -> None:
    now = datetime(2026, 11, 26, tzinfo=UTC)
    future = ObjectLock("governance", now + timedelta(days=1))
    past = ObjectLock("compliance", now - timedelta(seconds=1))
    assert lock_explaining(False, future, True, now) is None, "no lock configuration: never a lock"
    assert lock_explaining(True, future, False, now) == future
    assert lock_explaining(True, past, False, now) is None
    assert lock_explaining(True, None, False, now) is None
    held = lock_explaining(True, None, True, now)
    assert held is not None and held.legal_hold and held.retain_until > now + timedelta(days=3650)
    assert lock_explaining(True, past, True, now) == ObjectLock("compliance", past.retain_until, legal_hold=True)


def test_denied_delete_without_object_lock_names_the_permission(
        s3_bucket_factory: Callable[..., str], proxied: Callable[..., S3Storage]) -> None:
    versioned = proxied(f"s3://{s3_bucket_factory(versioning=True)}/repo", DENY_VERSION_DELETE)
    versioned.put_bytes("wal/000000010000000000000001-x.zst", b"segment")
    with pytest.raises(PermissionDeniedError) as err:
        versioned.purge("wal/000000010000000000000001-x.zst")
    assert err.value.action == "s3:DeleteObjectVersion"
    assert "wal/000000010000000000000001-x.zst" in err.value.message
    assert "the bucket has no Object Lock" in err.value.message
    assert versioned.exists("wal/000000010000000000000001-x.zst")

    plain = proxied(f"s3://{s3_bucket_factory()}/repo", Rule("access_denied", method="DELETE", times=1000))
    plain.put_bytes("tmp/probe", b"x")
    with pytest.raises(PermissionDeniedError) as err:
        plain.purge("tmp/probe")
    assert err.value.action == "s3:DeleteObject" and "tmp/probe" in err.value.message


def test_locked_versions_are_locks_and_unlocked_ones_are_permissions(
        s3_bucket_factory: Callable[..., str], proxied: Callable[..., S3Storage], s3_server: Any) -> None:
    bucket = s3_bucket_factory(object_lock=True)
    storage = proxied(f"s3://{bucket}/repo")
    until = datetime.now(UTC) + timedelta(days=2)
    storage.lock_new_objects(ObjectLock("governance", until))
    storage.put_bytes("backups/a/locked", b"locked")
    storage.lock_new_objects(None)
    storage.put_bytes("backups/a/held", b"held")
    storage.put_bytes("backups/a/free", b"free")
    s3_server.client().put_object_legal_hold(Bucket=bucket, Key="repo/backups/a/held", LegalHold={"Status": "ON"})

    with pytest.raises(ObjectLockedError) as err:
        storage.purge("backups/a/locked")
    assert "Object Lock (governance) until" in err.value.message and "backups/a/locked" in err.value.message
    with pytest.raises(ObjectLockedError) as err:
        storage.purge("backups/a/held")
    assert "legal hold" in err.value.message
    held = storage.lock_of("backups/a/held")
    assert held is not None and held.legal_hold

    denied = proxied(f"s3://{bucket}/repo", DENY_VERSION_DELETE)
    with pytest.raises(PermissionDeniedError) as perm:
        denied.purge("backups/a/free")
    assert perm.value.action == "s3:DeleteObjectVersion"
    assert "neither a retention nor a legal hold" in perm.value.message

    blind = proxied(f"s3://{bucket}/repo", DENY_VERSION_DELETE,
                    Rule("access_denied", method="GET", query="legal-hold", times=1000))
    with pytest.raises(PermissionDeniedError) as unknown:
        blind.purge("backups/a/free")
    assert unknown.value.action == "s3:GetObjectLegalHold"
    assert "cannot tell an Object Lock from a missing s3:DeleteObjectVersion" in unknown.value.message

    no_config = proxied(f"s3://{bucket}/repo", DENY_VERSION_DELETE,
                        Rule("access_denied", method="GET", query="object-lock", times=1000))
    with pytest.raises(PermissionDeniedError) as unknown:
        no_config.purge("backups/a/free")
    assert unknown.value.action == "s3:GetBucketObjectLockConfiguration"
    assert storage.exists("backups/a/free")
    storage.purge("backups/a/free")
    assert not storage.exists("backups/a/free")


def _policy(tmp_path: Path) -> str:
    path = tmp_path / "short.toml"
    path.write_text('name = "short"\n[retention]\nfull_days = 2\n')
    return str(path)


@pytest.mark.slow
def test_retention_fails_on_permissions_and_keeps_locked_backups(
        cli: Any, s3_server: Any, s3_bucket_factory: Callable[..., str], seed_db: Any, tmp_path: Path) -> None:
    future = (datetime.now(UTC) + timedelta(days=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = _policy(tmp_path)

    bucket = s3_bucket_factory(versioning=True)
    repo = f"s3://{bucket}/prod"
    common = ["--repo", repo, "--dsn", seed_db.dsn, "--policy", policy]
    old = cli.json("backup", "full", *common)
    new = cli.json("backup", "full", *common)
    with FaultProxy(s3_server.endpoint_url, [DENY_VERSION_DELETE]) as proxy:
        denied = cli("retention", "apply", *common, "--now", future, "--json",
                     env={"AWS_ENDPOINT_URL_S3": proxy.url, "BACKUP_TOOL_S3_ATTEMPTS": "2"})
    assert denied.returncode == 1, denied.stdout + denied.stderr
    out = denied.json()
    assert out["deleted"] == [] and len(out["failed"]) == 1, out
    assert out["failed"][0].startswith(f"{old['id']}: deleting manifests/{old['id']}.json")
    assert "s3:DeleteObjectVersion" in out["failed"][0] and "Object Lock" not in out["failed"][0].split("(")[0]
    assert [e["id"] for e in cli.json("list", "--repo", repo)] == [old["id"], new["id"]]

    locked_bucket = s3_bucket_factory(object_lock=True)
    repo = f"s3://{locked_bucket}/prod"
    common = ["--repo", repo, "--dsn", seed_db.dsn, "--policy", policy]
    old = cli.json("backup", "full", *common)
    new = cli.json("backup", "full", *common)
    client = boto3.client("s3")
    data = client.list_objects_v2(Bucket=locked_bucket, Prefix=f"prod/backups/{old['id']}/")["Contents"]
    client.put_object_legal_hold(Bucket=locked_bucket, Key=data[0]["Key"], LegalHold={"Status": "ON"})
    kept = cli.json("retention", "apply", *common, "--now", future)
    assert kept["deleted"] == [] and kept["failed"] == []
    reasons = {d["id"]: d["reasons"] for d in kept["decisions"]}
    assert any("legal hold" in r for r in reasons[old["id"]]), reasons
    assert [e["id"] for e in cli.json("list", "--repo", repo)] == [old["id"], new["id"]]
    client.put_object_legal_hold(Bucket=locked_bucket, Key=data[0]["Key"], LegalHold={"Status": "OFF"})
    gone = cli.json("retention", "apply", *common, "--now", future)
    assert gone["deleted"] == [old["id"]]
