"""``check`` tests the repository as the user PostgreSQL runs archive_command as (the owner
of the data directory), not only as itself: run as root it used to create the repository
root-owned and call it writable while every wal push failed."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from support.cli import Cli
from support.clusters import PgServer

from backup_tool.jobs.check import DirStat, first_blocked


def test_mode_bits_decide_by_owner_then_group_then_other() -> None:
    postgres, backup_group = 999, frozenset({999, 120})
    root_only = DirStat("/srv/repo/wal", 0, 0, 0o40755)
    shared = DirStat("/srv/repo/wal", 0, 120, 0o42770)
    owner_denied = DirStat("/srv/repo/wal", 999, 120, 0o40577)  # the owner class decides, not group
    hidden_parent = DirStat("/srv", 0, 0, 0o40700)
    open_parent = DirStat("/srv", 0, 0, 0o40711)
    assert first_blocked([open_parent], [root_only], postgres, backup_group) == root_only
    assert first_blocked([open_parent], [shared], postgres, backup_group) is None
    assert first_blocked([open_parent], [owner_denied], postgres, backup_group) == owner_denied
    assert first_blocked([hidden_parent], [shared], postgres, backup_group) == hidden_parent
    assert first_blocked([hidden_parent], [root_only], 0, frozenset({0})) is None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp dirs are root-only 0700)."""
    path = Path(tempfile.mkdtemp(prefix="bt-archiver-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run check as root against a server run as postgres")
def test_check_as_root_tests_the_repository_as_the_servers_user(
        cli: Cli, shared_dir: Path, pg_cluster_factory: Callable[..., PgServer]) -> None:
    server = pg_cluster_factory(archive_mode="on", archive_command="/bin/true")
    user = pwd.getpwuid(server.data_dir.stat().st_uid).pw_name
    repo = shared_dir / "repo"

    def check() -> dict[str, Any]:
        proc = cli("check", "--repo", str(repo), "--dsn", server.dsn("postgres"), "--json")
        return {c["name"]: c for c in proc.json()["checks"]}

    missing = check()
    assert missing["repository"]["ok"] is True
    assert not repo.exists(), "check must not leave a (root-owned) repository behind"
    assert missing["repository_archiver"]["ok"] is False
    assert missing["repository_archiver"]["detail"].startswith(f"{shared_dir} is not writable by {user} ")
    assert missing["repository_archiver"]["detail"].endswith(f"fix: install -d -o {user} -g {user} -m 750 {repo}")

    repo.mkdir(mode=0o755)  # as root: what 'check' itself used to leave
    root_owned = check()["repository_archiver"]
    assert root_owned["ok"] is False
    assert f"{repo} is not writable by {user}" in root_owned["detail"]
    assert "PostgreSQL retries about a minute later" in root_owned["detail"]
    assert f"fix: chown -R {user}: {repo} " in root_owned["detail"]

    shutil.chown(repo, user, user)
    fixed = check()["repository_archiver"]
    assert fixed == {**fixed, "ok": True, "detail": f"{repo} writable by {user}, the user archive_command runs as"}

    (repo / "wal").mkdir(mode=0o755)  # a backup run as root created wal/ for itself
    again = check()["repository_archiver"]
    assert again["ok"] is False and f"{repo / 'wal'} is not writable by {user}" in again["detail"]
