"""``status``: read the repository (catalog, verification records, WAL archive, health log), let
:func:`backup_tool.governance.status.evaluate` judge it, and write the Prometheus textfile.

The textfile for node_exporter's textfile collector is written to a temporary file in the
same directory and renamed over the target, so the collector never reads half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from backup_tool.core.timestamps import parse_utc
from backup_tool.errors import BackupToolError
from backup_tool.governance.status import WARNING, Check, RestoreTest, StatusReport, Verification, WalState, evaluate
from backup_tool.jobs.health import read_records, records_for
from backup_tool.jobs.verify import VERIFICATIONS_PREFIX
from backup_tool.physical.wal import histories
from backup_tool.repository.catalog import Catalog
from backup_tool.repository.storage import open_repository
from backup_tool.repository.walarchive import list_archive, segments_of

UTC = timezone.utc

if TYPE_CHECKING:
    from backup_tool.config.settings import Settings
    from backup_tool.repository.storage import Storage




def read_verifications(storage: Storage) -> list[Verification]:
    found: list[Verification] = []
    for info in storage.list(VERIFICATIONS_PREFIX):
        try:
            body = json.loads(storage.get_bytes(info.key))
            at = parse_utc(body["at"])
            drills = None if "restore_tests" not in body else tuple(
                RestoreTest(str(t["backup"]), bool(t["ok"]), float(t["seconds"])) for t in body["restore_tests"])
            found.append(Verification(at, bool(body.get("ok")), tuple(body.get("backups", [])),
                                      bool(body.get("restore_test")), tuple(body.get("checks", [])), info.key,
                                      drills))
        except (BackupToolError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(found, key=lambda v: v.at)


def read_wal_state(storage: Storage) -> WalState:
    """The WAL archive's segments and timeline histories."""
    files = list_archive(storage)
    segments = segments_of(files)
    newest = max((s.modified for s in segments), default=None)
    return WalState(tuple(s.name for s in segments), newest, sum(s.size for s in segments),
                    histories(storage, files))


def collect_status(settings_factory: Callable[[], Settings], now: datetime | None = None) -> StatusReport:
    """Read the repository and evaluate; any failure to read is an UNKNOWN report, not an error."""
    now = now or datetime.now(UTC)
    repository = ""
    try:
        settings = settings_factory()
        repository = settings.repo_url
        storage = open_repository(settings.repo_url)
        records, problems = Catalog(storage).records(refresh=True)
        health, _ = read_records(storage)
        report = evaluate(records, read_verifications(storage), read_wal_state(storage), settings.policy, now,
                          storage.url, records_for(settings, health))
    except BackupToolError as exc:
        return StatusReport(now, repository, (), {}, error=str(exc))
    if problems:
        extra = Check("manifests", WARNING, f"{len(problems)} unreadable manifest(s): {problems[0].message}")
        report = StatusReport(report.now, report.repository, report.checks + (extra,), report.metrics)
    return report
def write_textfile(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (same-directory temp file, fsync, rename)."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BackupToolError(f"cannot write the Prometheus textfile {target}: {exc.strerror}",
                              "check the directory exists and is writable") from None
