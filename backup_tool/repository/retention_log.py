"""The retention log (``retention-log/``): append-only records of what retention deleted, why,
under which policy and when; the audit's evidence that deletions followed the policy."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from backup_tool.core.timestamps import parse_utc
from backup_tool.errors import BackupToolError

if TYPE_CHECKING:
    from backup_tool.repository.storage import Storage

LOG_PREFIX = "retention-log/"
LOG_FORMAT = 1




@dataclass(frozen=True)
class LogEntry:
    """One deletion recorded in ``retention-log/``."""

    run: str
    at: datetime
    id: str
    kind: str
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    reasons: tuple[str, ...]
    policy: str
    completed: bool = True
    database: str = ""
    size_bytes: int = 0


def read_log(storage: Storage) -> tuple[list[dict[str, Any]], list[LogEntry], list[str]]:
    """(run records, deletions, problems) from the append-only retention log, oldest first."""
    runs: list[dict[str, Any]] = []
    outcomes: dict[str, set[str]] = defaultdict(set)
    problems: list[str] = []
    for info in storage.list(LOG_PREFIX):
        try:
            body = json.loads(storage.get_bytes(info.key))
        except (BackupToolError, ValueError) as exc:
            problems.append(f"{info.key}: unreadable ({exc})")
            continue
        if "outcome_of" in body:
            outcomes[body.get("run", "")] |= set(body.get("failed_ids", []))
        else:
            runs.append(body)
    entries: list[LogEntry] = []
    for run in runs:
        for d in run.get("deleted", []):
            entries.append(LogEntry(
                run=run.get("run", ""), at=parse_utc(run["at"]), id=d["id"], kind=d.get("kind", "?"),
                started_at=parse_utc(d["started_at"]) if d.get("started_at") else None,
                finished_at=parse_utc(d["finished_at"]) if d.get("finished_at") else None,
                expires_at=parse_utc(d["expires_at"]) if d.get("expires_at") else None,
                reasons=tuple(d.get("reasons", [])), policy=str(run.get("policy", {}).get("name", "")),
                completed=d["id"] not in outcomes.get(run.get("run", ""), set()),
                database=d.get("database", ""), size_bytes=int(d.get("size_bytes", 0))))
    runs.sort(key=lambda r: r.get("at", ""))
    entries.sort(key=lambda e: (e.at, e.id))
    return runs, entries, problems
