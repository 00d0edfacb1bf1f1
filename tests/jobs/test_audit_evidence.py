"""The audit an auditor files, end to end on a real cluster and S3 (moto) with Object Lock,
server-side encryption and a client-side key: what it covers (database, host, cluster system
identifier), encryption at rest and the lock as the store reports them, the tool version, the
restore test's duration and the backups each verification covered, the repository-state
digest (recomputed here from the bucket alone, as README says an auditor can), and the report's
own SHA-256 in a sidecar that ``sha256sum -c`` checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest

from backup_tool import __version__
from backup_tool.repository.storage.encrypted import EncryptionKey

pytestmark = pytest.mark.slow


def test_audit_evidence_on_s3(cli: Any, s3_bucket_factory: Callable[..., str], fresh_db: Any,
                              tmp_path: Path) -> None:
    bucket = s3_bucket_factory(object_lock=True)
    repo = f"s3://{bucket}/prod"
    policy = tmp_path / "locked.toml"
    policy.write_text('name = "locked"\n[object_lock]\nmode = "governance"\n[retention]\nfull_days = 2\n')
    secret = os.urandom(32)
    key_id = EncryptionKey(secret).key_id
    env = {"BACKUP_TOOL_S3_SSE": "AES256", "BACKUP_TOOL_ENCRYPTION_KEY": base64.b64encode(secret).decode(),
           "BACKUP_TOOL_REPO": repo, "BACKUP_TOOL_POLICY": str(policy)}
    db = fresh_db("audited")
    db.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text); "
               "INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 500) g")
    backup = cli.json("backup", "full", "--dsn", db.dsn, env=env)
    verified = cli.json("verify", "latest", "--restore-test", "--dsn", db.dsn, env=env)
    assert verified["ok"] is True

    audit = cli.json("audit", env=env)
    sysid = db.scalar("SELECT system_identifier::text FROM pg_control_system()")
    server = db.server
    assert audit["tool_version"] == __version__
    assert [(s["database"], s["host"], s["system_identifier"], s["backups"]) for s in audit["scope"]] == [
        (db.name, f"{server.host}:{server.port}", sysid, 1)]
    [row] = audit["backups"]
    assert row["id"] == backup["id"] and row["host"] == f"{server.host}:{server.port}"
    assert row["encryption"]["client_side_key_id"] == key_id and row["encryption"]["sse"] == "AES256"
    assert row["store_lock"]["mode"] == "governance" and row["store_lock"]["retain_until"] == row["lock_until"]
    [run] = audit["verifications"]
    assert run["backups"] == [backup["id"]]
    [drill] = run["restore_tests"]
    assert drill["backup"] == backup["id"] and drill["ok"] is True and 0 < drill["seconds"] < 120
    assert row["last_restore_test_seconds"] == drill["seconds"]

    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix="prod/manifests/")["Contents"]
    lines = sorted(f"{o['Key'].removeprefix('prod/')} "
                   f"{json.loads(client.get_object(Bucket=bucket, Key=o['Key'])['Body'].read())['manifest_sha256']}\n"
                   for o in listed)
    assert audit["repository_state"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert audit["repository_state"]["manifests"] == 1

    out = tmp_path / "filed" / "audit.md"
    written = cli.json("audit", "--format", "markdown", "--output", out, env=env)
    text = out.read_bytes()
    assert written["sha256"] == hashlib.sha256(text).hexdigest()
    assert written["sha256_file"] == f"{out}.sha256"
    assert Path(f"{out}.sha256").read_text() == f"{written['sha256']}  audit.md\n"
    check = subprocess.run(["sha256sum", "-c", "audit.md.sha256"], cwd=out.parent, capture_output=True, text=True)
    assert check.returncode == 0 and "audit.md: OK" in check.stdout
    page = text.decode()
    assert f"| {db.name} | {server.host}:{server.port} | {sysid} | 1 |" in page
    assert f"client-side key {key_id}; SSE AES256" in page
    assert "- Report SHA-256: in audit.md.sha256 beside this file ('sha256sum -c audit.md.sha256' checks it)" in page
    assert f"- Repository state read: sha256 {audit['repository_state']['sha256']} of 1 manifest(s)" in page
    out.write_bytes(text.replace(b"COMPLIANT", b"COMPLIANT!"))
    tampered = subprocess.run(["sha256sum", "-c", "audit.md.sha256"], cwd=out.parent, capture_output=True, text=True)
    assert tampered.returncode != 0
