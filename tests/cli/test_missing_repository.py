"""A repository that does not exist is an error for every command that reads it (exit 1,
naming it; ``status`` UNKNOWN, exit 3), never "no backups"; an existing but empty one is a
valid repository with no backups yet; ``backup`` creates the repository. ``wal status``
exits non-zero when one of its checks fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

DSN = "postgresql://app@127.0.0.1:1/app?connect_timeout=2"

READERS: list[tuple[str, list[str]]] = [
    ("list", ["list"]),
    ("show", ["show", "latest"]),
    ("restore full", ["restore", "full", "--target-dsn", DSN]),
    ("restore tables", ["restore", "tables", "--tables", "public.t", "--target-dsn", DSN]),
    ("verify", ["verify", "latest"]),
    ("audit", ["audit"]),
    ("retention apply", ["retention", "apply", "--dry-run"]),
    ("run-due --dry-run", ["run-due", "--dry-run"]),
    ("wal status", ["wal", "status"]),
    ("validate --against", ["validate", "--dsn", DSN, "--against", "latest"]),
]


@pytest.mark.parametrize("name, args", READERS, ids=[r[0] for r in READERS])
def test_every_reader_refuses_a_missing_local_repository(cli: Any, tmp_path: Path, name: str,
                                                         args: list[str]) -> None:
    missing = tmp_path / "no" / "such-repo"
    proc = cli(*args, "--repo", missing, "--dsn", DSN)
    assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"repository {missing} does not exist" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "no backups" not in proc.stdout
    assert not missing.exists() and not missing.parent.exists(), f"{name} created the repository"


def test_status_is_unknown_for_a_missing_repository(cli: Any, tmp_path: Path) -> None:
    missing = tmp_path / "typo-repo"
    proc = cli("status", "--repo", missing)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"BACKUP UNKNOWN - repository {missing} does not exist")
    data = cli.json("status", "--repo", missing, expect_rc=3)
    assert (data["status"], data["code"]) == ("UNKNOWN", 3)


def test_an_existing_empty_repository_has_no_backups_yet(cli: Any, local_repo: str) -> None:
    assert cli.json("list", "--repo", local_repo) == []
    text = cli("list", "--repo", local_repo)
    assert text.returncode == 0 and text.stdout.strip() == f"no backups in {local_repo}"
    status = cli("status", "--repo", local_repo)
    assert status.returncode == 2 and "no full backup in the repository" in status.stdout


def test_s3_missing_bucket_is_an_error_and_an_empty_prefix_is_an_empty_repository(
        cli: Any, s3_bucket: str) -> None:
    empty = f"s3://{s3_bucket}/backups/prod"
    assert cli.json("list", "--repo", empty) == []
    gone = "s3://bt-no-such-bucket-7f3a/backups/prod"
    for args in (["list"], ["show", "latest"], ["audit"]):
        proc = cli(*args, "--repo", gone)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "bucket 'bt-no-such-bucket-7f3a' does not exist" in proc.stderr
    status = cli("status", "--repo", gone)
    assert status.returncode == 3 and status.stdout.startswith("BACKUP UNKNOWN - bucket 'bt-no-such-bucket-7f3a'")


def test_wal_status_fails_when_a_check_fails(cli: Any, local_repo: str) -> None:
    """An empty archive prints FAIL for wal_newest_age: the exit code says so too."""
    proc = cli("wal", "status", "--repo", local_repo)
    assert "FAIL  wal_newest_age  no WAL segment archived yet" in proc.stdout
    assert proc.returncode == 3, proc.stdout + proc.stderr
    data = cli.json("wal", "status", "--repo", local_repo, expect_rc=3)
    assert {c["name"]: c["ok"] for c in data["checks"]} == {"wal_continuity": True, "wal_newest_age": False}


@pytest.mark.slow
def test_backup_creates_the_repository(cli: Any, seed_db: Any, tmp_path: Path) -> None:
    repo = tmp_path / "new" / "repo"
    taken = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn)
    assert repo.is_dir()
    assert [e["id"] for e in cli.json("list", "--repo", repo)] == [taken["id"]]
