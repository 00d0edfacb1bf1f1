"""Repository verification: re-read every object and compare its sha256 with the manifest.

``verify`` reads objects back exactly as a restore would (through the storage backend,
checksummed, decompressed to prove the zstd frames are whole), so a pass means the backup
can be read. An encrypted backup is also decrypted (every frame authenticated) when its
key is configured; without it, the checksums of the stored bytes are still checked, and
the report says the contents were not decrypted. With ``restore_test`` it goes further:
the backup is restored into a scratch database, validated against its manifest, and the
scratch database dropped. Each run's
outcome is recorded in the repository (``verifications/``) as audit evidence. Physical base
backups are checked object by object; their restore drill is ``restore pitr``.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any, Iterable

from backup_tool.config.settings import Settings
from backup_tool.core.kinds import LOGICAL_KINDS, BackupKind
from backup_tool.core.report import NullReporter, Reporter
from backup_tool.errors import BackupToolError
from backup_tool.logical.restore import create_database, restore_full
from backup_tool.physical.wal import repository_health
from backup_tool.postgres import database_level
from backup_tool.postgres.connection import ConnInfo
from backup_tool.repository.catalog import Catalog, DatabaseHint
from backup_tool.repository.manifest import Manifest, utc_iso
from backup_tool.repository.storage import Storage, open_repository
from backup_tool.repository.storage.encrypted import keyring_of, manifest_encryption
from backup_tool.streams import pipeline
from backup_tool.validation.validate import Check, ValidationReport

VERIFICATIONS_PREFIX = "verifications/"


def check_objects(storage: Storage, manifest: Manifest, reporter: Reporter,
                  seen: set[str]) -> Check:
    objects = [o for o in manifest.objects() if o.key not in seen]
    progress = reporter.task(f"verifying {manifest.id}", total=sum(o.size for o in objects))
    recorded = manifest_encryption(manifest.options)
    decrypt = recorded is None or recorded["key_id"] in keyring_of(storage)
    bad: list[str] = []
    for obj in objects:
        try:
            stream = (pipeline.read_stored(storage, obj.key, obj.sha256, obj.size, progress.advance) if decrypt
                      else pipeline.verified(storage.get_stored(obj.key), obj.key, obj.sha256, obj.size,
                                             progress.advance))
            for _ in stream:
                pass
        except BackupToolError as exc:
            bad.append(f"{obj.key}: {exc.message}")
        seen.add(obj.key)
    progress.finish()
    if bad:
        return Check(f"objects {manifest.id}", False, "; ".join(bad[:5]))
    note = "" if decrypt or recorded is None else (
        f" (encrypted with key id {recorded['key_id']}: contents not decrypted without that key)")
    return Check(f"objects {manifest.id}", True,
                 f"{len(objects)} objects, {sum(o.size for o in objects)} bytes, checksums match{note}")


def restore_test(settings: Settings, manifest: Manifest, scratch_dsn: str, reporter: Reporter) -> tuple[Check, float]:
    """Restore into a fresh scratch database on the scratch server, created as the backup's was
    (encoding and locale: validation compares them), validate, drop it; with the
    seconds the restore and its validation took (to the failure, when it failed): the
    recovery-time evidence the audit shows."""
    base = ConnInfo(scratch_dsn or settings.dsn)
    name = f"backup_tool_verify_{secrets.token_hex(4)}"
    scratch = base.with_database(name)
    admin = base.with_database("postgres")
    started = time.monotonic()
    try:
        create_database(scratch, manifest.encoding, manifest.inventory.get("database"))
        result = restore_full(settings, scratch, manifest.id, with_roles=True,
                              run_validation=True, reporter=reporter)
        detail = f"restored {result.tables} tables, {result.rows} rows in {result.seconds:.1f}s; validation passed"
        return Check(f"restore_test {manifest.id}", True, detail), result.seconds
    except BackupToolError as exc:
        return Check(f"restore_test {manifest.id}", False, exc.message[:500]), time.monotonic() - started
    finally:
        with admin.connect() as conn:
            database_level.drop_database(conn, name)


def verify(settings: Settings, ref: str = "latest", with_restore_test: bool = False,
           scratch_dsn: str = "", reporter: Reporter | None = None,
           database: DatabaseHint | None = None) -> ValidationReport:
    """Re-read the objects of ``ref`` (an id, ``latest`` of ``database``, or ``all``)."""
    reporter = reporter or NullReporter()
    storage = open_repository(settings.repo_url)
    catalog = Catalog(storage)
    manifests, problems = catalog.scan() if ref == "all" else ([catalog.resolve(ref, database=database)], [])
    checks = [Check("manifest", False, p.message) for p in problems]
    seen: set[str] = set()
    timings: list[dict[str, Any]] = []
    for manifest in manifests:
        checks.append(check_objects(storage, manifest, reporter, seen))
        if with_restore_test and checks[-1].ok and manifest.kind in LOGICAL_KINDS:
            check, seconds = restore_test(settings, manifest, scratch_dsn, reporter)
            checks.append(check)
            timings.append({"backup": manifest.id, "ok": check.ok, "seconds": round(seconds, 3)})
    if any(m.kind == BackupKind.BASE for m in manifests):
        checks.extend(c for c in repository_health(settings).checks() if c.name == "wal_continuity")
    report = ValidationReport(storage.url, ref, tuple(checks))
    record(storage, report, [m.id for m in manifests], with_restore_test, timings)
    return report


def record(storage: Storage, report: ValidationReport, ids: Iterable[str], restore_tested: bool,
           restore_tests: Iterable[dict[str, Any]] = ()) -> None:
    """Store the run as audit evidence; ``restore_tests``: backup, ok, seconds of each drill."""
    now = datetime.now(timezone.utc)
    body = {"at": utc_iso(now), "backups": list(ids), "restore_test": restore_tested,
            "restore_tests": list(restore_tests), **report.to_dict()}
    key = f"{VERIFICATIONS_PREFIX}{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(2)}.json"
    storage.put_bytes(key, json.dumps(body, indent=1).encode())
