"""Where things are: repository URL, source DSN and policy, from options and environment.

Options win over environment variables. With nothing set, the repository is the embedded
default local directory (``$XDG_DATA_HOME/backup-tool/repo``, usually
``~/.local/share/backup-tool/repo``) and the database comes from libpq's own ``PG*``
variables, exactly as psql would connect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from backup_tool.config.locations import repo_url
from backup_tool.config.policy import Policy, load_policy
from backup_tool.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    repo_url: str
    dsn: str
    policy: Policy


def resolve_settings(repo: str | None, dsn: str | None, policy: str | None,
                     on_bad_policy: Callable[[ConfigError], None] | None = None) -> Settings:
    """The settings of one invocation. A policy that cannot be loaded is an error, unless
    ``on_bad_policy`` is given: commands that only take defaults from the policy (``list``,
    ``restore full``...) then hear about it there and run with the built-in defaults."""
    try:
        loaded = load_policy(policy or os.environ.get("BACKUP_TOOL_POLICY"))
    except ConfigError as exc:
        if on_bad_policy is None:
            raise
        on_bad_policy(exc)
        loaded = Policy()
    return Settings(
        repo_url=repo_url(repo),
        dsn=dsn if dsn is not None else os.environ.get("DATABASE_URL", ""),
        policy=loaded,
    )
