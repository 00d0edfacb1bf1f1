"""``backup full`` and ``backup incremental``: take a logical backup now."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

from backup_tool.cli.common import (
    Invocation,
    backup_app,
    command,
    human_size,
    human_time,
)

if TYPE_CHECKING:
    from backup_tool.repository.storage import Storage

READ_AHEAD_EVENT = "repository reads made ahead"

LockTimeout = Annotated[float, typer.Option(
    "--lock-timeout", metavar="SECONDS", min=0,
    help="If another backup of this database into this repository is running, wait up to SECONDS for it "
         "(default 0: exit 4 at once)")]


@command(backup_app, "full")
def backup_full_cmd(
    inv: Invocation,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", min=1, max=64,
                                                help="Tables dumped in parallel (default: policy backup.jobs)")] = None,
    lock_timeout: LockTimeout = 0.0,
) -> int:
    """Take a full logical backup now: schema, roles and every table, from one snapshot."""
    from backup_tool.logical.backup import backup_full

    with _opened_while_loading(inv) as storage:
        manifest = backup_full(inv.settings, inv.reporter, jobs=jobs, lock_timeout=lock_timeout, storage=storage)
    entry = manifest.summary()
    inv.out(entry, lambda: f"backup {entry['id']} complete: {entry['tables']} tables, {entry['rows']} rows, "
                           f"{human_size(entry['raw_bytes'])} of data stored as {human_size(entry['size_bytes'])}, "
                           f"expires {human_time(entry['expires_at'])}")
    return 0




@command(backup_app, "incremental")
def backup_incremental_cmd(
    inv: Invocation,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", min=1, max=64,
                                                help="Tables compared/dumped in parallel (default: policy backup.jobs)")] = None,
    lock_timeout: LockTimeout = 0.0,
) -> int:
    """Back up only the tables that changed since the newest backup of this database (takes a full, and says so, if none)."""
    from backup_tool.logical.backup import backup_incremental
    from backup_tool.physical import walscan

    with _opened_while_loading(inv) as storage:
        manifest = backup_incremental(inv.settings, inv.reporter, jobs=jobs, lock_timeout=lock_timeout,
                                      changes=walscan.changed_relations, storage=storage)
    entry = manifest.summary()
    changed = len([t for t in manifest.tables if t.stored and t.stored[0].key.startswith(f"backups/{manifest.id}/")])
    how = {"wal": " (changes read from the WAL archive)",
           "checksum": " (changes found by comparing checksums)"}.get(entry.get("changed_tables_method", ""), "")
    inv.out(entry, lambda: f"backup {entry['id']} ({entry['kind']}{', parent ' + entry['parent_id'] if entry['parent_id'] else ''}) "
                           f"complete: {changed} of {entry['tables']} tables stored{how}, {human_size(entry['size_bytes'])}, "
                           f"expires {human_time(entry['expires_at'])}")
    return 0


@contextmanager
def _opened_while_loading(inv: Invocation) -> Iterator[Storage]:
    """The repository, opened before the garbage collector comes back on: the entry point
    turns it off while a backup command loads (:func:`backup_tool.cli.entry.resume_collection`),
    and building the S3 client (botocore's endpoint and service data) set off 20-35 ms of
    collections on its own. Over the reads the entry point made ahead, when it did
    (:func:`backup_tool.cli.ahead.start_backup`; reported once the backup ends)."""
    from backup_tool.cli import ahead
    from backup_tool.cli.entry import resume_collection
    from backup_tool.repository.storage import open_storage

    url = inv.settings.repo_url
    try:
        backend = ahead.backend_for(url, inv.database(None).dsn)
        storage = open_storage(url, backend=backend)
    finally:
        resume_collection()
    try:
        yield storage
    finally:
        ahead.stop()
        if backend is not None:
            inv.reporter.event(READ_AHEAD_EVENT, answered=len(backend.answered),
                               reads=[f"{op} {arg}" for op, arg in backend.answered])
