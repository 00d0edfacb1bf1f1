"""A moto S3 server (real HTTP, AWS_ENDPOINT_URL_S3), buckets and repository URLs."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    """A moto S3 endpoint; `env` holds the variables exported to os.environ for the session."""

    endpoint_url: str
    env: dict[str, str]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.env["AWS_DEFAULT_REGION"])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1:<free port>, reachable by any boto3 client (in-process or in
    a subprocess) through AWS_ENDPOINT_URL_S3 and fake credentials set in os.environ; the
    previous environment is restored at session end."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    removed = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in (*env, *removed)}
    os.environ.update(env)
    for k in removed:
        os.environ.pop(k, None)
    try:
        yield S3Server(endpoint_url=endpoint, env=env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _empty_and_delete_bucket(client: Any, bucket: str) -> None:
    try:
        paginator = client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(
                    Bucket=bucket, Key=item["Key"], VersionId=item["VersionId"], BypassGovernanceRetention=True
                )
        client.delete_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - compliance-locked objects may legitimately stay
        pass


@pytest.fixture
def s3_bucket_factory(s3_server: S3Server) -> Iterator[Callable[..., str]]:
    """Factory: `s3_bucket_factory(object_lock=False, versioning=False)` creates a uniquely
    named bucket and returns its name; buckets are emptied and deleted (best effort) after
    the test. Object Lock implies versioning."""
    client = s3_server.client()
    created: list[str] = []

    def make(object_lock: bool = False, versioning: bool = False) -> str:
        name = f"bt-test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        if versioning and not object_lock:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        created.append(name)
        return name

    yield make
    for name in created:
        _empty_and_delete_bucket(client, name)


@pytest.fixture
def s3_bucket(s3_bucket_factory: Callable[..., str]) -> str:
    """Name of a new, empty, unversioned bucket."""
    return s3_bucket_factory()


@pytest.fixture
def s3_repo(s3_bucket: str) -> str:
    """`s3://BUCKET/backups/prod` in a new bucket."""
    return f"s3://{s3_bucket}/backups/prod"


@pytest.fixture
def local_repo(tmp_path: Path) -> str:
    """Path (str) of an existing empty directory to use as a local repository."""
    path = tmp_path / "repo"
    path.mkdir()
    return str(path)


@pytest.fixture(params=["local", "s3"])
def repo(request: pytest.FixtureRequest) -> str:
    """A repository URL, once as a local directory and once as s3://bucket/prefix (moto is
    started only for the s3 case)."""
    return str(request.getfixturevalue(f"{request.param}_repo"))
