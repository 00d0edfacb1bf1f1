"""Where the repository is when nothing says otherwise: ``--repo``, else ``BACKUP_TOOL_REPO``,
else the embedded default local directory (``$XDG_DATA_HOME/backup-tool/repo``, usually
``~/.local/share/backup-tool/repo``).

Standard library only: the ``wal push``/``wal fetch`` fast path, run by PostgreSQL once per
segment, needs these without loading the policy machinery.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_repo() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "backup-tool" / "repo")


def repo_url(repo: str | None) -> str:
    """The repository: ``--repo``, else ``BACKUP_TOOL_REPO``, else the embedded default."""
    return repo or os.environ.get("BACKUP_TOOL_REPO") or default_repo()
