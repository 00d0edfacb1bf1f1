"""One named pass/fail finding (a validation check, an archive health check).

Lives in core so that modules below validation (the WAL archive's health checks, which
``wal fetch`` imports) can build checks without importing the validation layer and,
through it, psycopg. :mod:`backup_tool.validation.validate` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """A check's name, whether it passed, and what it found (or what failed and why)."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}
