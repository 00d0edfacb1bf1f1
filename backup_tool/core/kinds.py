"""The kinds of backup, one vocabulary for every layer.

A ``StrEnum``: members compare equal to, and serialise as, the strings manifests and JSON
output have always used (``"full"``, ``"incremental"``, ``"base"``), so the repository format
and the CLI contract are unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class BackupKind(StrEnum):
    FULL = "full"
    """A logical backup of one database: schema archive plus every table."""
    INCREMENTAL = "incremental"
    """A logical backup storing only the tables that changed since its parent."""
    BASE = "base"
    """A physical base backup of the whole cluster, the start of point-in-time recovery."""


LOGICAL_KINDS: tuple[BackupKind, ...] = (BackupKind.FULL, BackupKind.INCREMENTAL)
ALL_KINDS: tuple[BackupKind, ...] = (BackupKind.FULL, BackupKind.INCREMENTAL, BackupKind.BASE)
