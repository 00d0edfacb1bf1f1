"""Where the repository is when nothing says otherwise: ``--repo``, else ``BACKUP_TOOL_REPO``,
else the embedded default local directory (``$XDG_DATA_HOME/backup-tool/repo``, usually
``~/.local/share/backup-tool/repo``).

Only ``os`` (not even ``pathlib``): the ``wal push``/``wal fetch`` fast path, run by
PostgreSQL once per segment, needs these without loading the policy machinery.
"""

from __future__ import annotations

import os


def default_repo() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(os.path.normpath(base), "backup-tool", "repo")


def repo_url(repo: str | None) -> str:
    """The repository: ``--repo``, else ``BACKUP_TOOL_REPO``, else the embedded default."""
    return repo or os.environ.get("BACKUP_TOOL_REPO") or default_repo()
