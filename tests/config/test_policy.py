"""Policy files: defaults equal the seed's schedule, bad files name file, key and what is allowed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from support.paths import REPO_ROOT

from backup_tool.config.policy import Policy, load_policy, parse_policy
from backup_tool.errors import ConfigError

ROOT = REPO_ROOT


def test_shipped_default_is_the_seed_policy() -> None:
    p = load_policy(str(ROOT / "policies" / "default.toml"))
    assert p.schedule.full == "0 2 * * *"
    assert p.schedule.incremental == "0 */6 * * *"
    assert (p.retention.full_days, p.retention.incremental_days, p.retention.pitr_days) == (30, 7, 7)
    builtin = Policy()
    assert (p.schedule, p.retention, p.backup) == (builtin.schedule, builtin.retention, builtin.backup)


def test_expiry_per_kind() -> None:
    p = Policy()
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert p.expires_at("full", t) == t + timedelta(days=30)
    assert p.expires_at("incremental", t) == t + timedelta(days=7)
    assert p.expires_at("base", t) == t + timedelta(days=7)


@pytest.mark.parametrize("text, needle", [
    ("[retention]\nfull_dayz = 3\n", "retention.full_dayz"),
    ("[retention]\nfull_days = 'thirty'\n", "wrong type"),
    ("[retention]\nfull_days = 0\n", "at least 1"),
    ("[schedule]\nfull = '0 2 * *'\n", "cron"),
    ("[object_lock]\nmode = 'strict'\n", "allowed"),
    ("[backup]\njobs = 0\n", "between 1 and 64"),
    ("bogus = 1\n", "unknown key"),
    ("[retention\n", "not valid TOML"),
])
def test_bad_policy_names_file_and_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy(text, "/etc/p.toml")
    assert "/etc/p.toml" in str(err.value)
    assert needle in str(err.value)


def test_unknown_policy_name_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_policy("nosuchpolicy")


def test_policy_by_path(tmp_path: Path) -> None:
    f = tmp_path / "weekly.toml"
    f.write_text("[retention]\nfull_days = 90\n")
    p = load_policy(str(f))
    assert p.retention.full_days == 90 and p.name == "weekly"


def test_logical_backups_have_their_own_compression_level() -> None:
    """Logical backups compress at level 1 by default, base backups and WAL at 3; a policy that
    sets only ``compression_level`` keeps it for logical backups as well, as before."""
    assert (Policy().backup.compression_level, Policy().backup.logical_compression_level) == (3, 1)
    only = parse_policy("[backup]\ncompression_level = 6\n", "p.toml").backup
    assert (only.compression_level, only.logical_compression_level) == (6, 6)
    both = parse_policy("[backup]\ncompression_level = 6\nlogical_compression_level = 2\n", "p.toml").backup
    assert (both.compression_level, both.logical_compression_level) == (6, 2)
    logical = parse_policy("[backup]\nlogical_compression_level = 4\n", "p.toml").backup
    assert (logical.compression_level, logical.logical_compression_level) == (3, 4)
    with pytest.raises(ConfigError, match="logical_compression_level must be between 1 and 19"):
        parse_policy("[backup]\nlogical_compression_level = 0\n", "p.toml")
