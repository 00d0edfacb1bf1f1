"""Reading and writing repository objects behind the tool's back (no backup_tool, no key): what
bit rot, an operator's mistake or an attacker with bucket credentials does."""

from __future__ import annotations

from pathlib import Path

import boto3


def _split(repo: str) -> tuple[str, str]:
    bucket, _, prefix = repo[5:].partition("/")
    return bucket, prefix.strip("/") + "/"


def object_keys(repo: str) -> list[str]:
    """Every key in a repository (relative to its root)."""
    if repo.startswith("s3://"):
        bucket, prefix = _split(repo)
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"][len(prefix):] for p in pages for o in p.get("Contents", [])]
    root = Path(repo)
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]


def read_object(repo: str, key: str) -> bytes:
    if repo.startswith("s3://"):
        bucket, prefix = _split(repo)
        return boto3.client("s3").get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
    return (Path(repo) / key).read_bytes()


def write_object(repo: str, key: str, data: bytes) -> None:
    """Write (or overwrite) an object; a read-only local file is made writable first."""
    if repo.startswith("s3://"):
        bucket, prefix = _split(repo)
        boto3.client("s3").put_object(Bucket=bucket, Key=prefix + key, Body=data)
        return
    path = Path(repo) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.chmod(0o644)
    path.write_bytes(data)


def drop_object(repo: str, key: str) -> None:
    if repo.startswith("s3://"):
        bucket, prefix = _split(repo)
        boto3.client("s3").delete_object(Bucket=bucket, Key=prefix + key)
    else:
        (Path(repo) / key).unlink()
