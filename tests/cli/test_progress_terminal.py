"""What an operator's terminal shows at the end of `backup full` and `restore full` (issue 13):
each phase left one line saying it reached 100 %, in the order the phases ran, amounts in
binary units as in the summaries (MiB), no bar left on the screen and nothing drawn below the
result. Run on a real pseudo-terminal, read back as the screen a terminal would show."""

from __future__ import annotations

import re
from typing import Callable

import pytest
from support.cli import Cli
from support.clusters import DbHandle
from terminal import run_on_terminal

pytestmark = pytest.mark.slow

PHASE = re.compile(r"^✓ (?P<name>.+?)  100 %  (?P<done>\S+(?: \S+)?)(?: / |/)(?P<total>\S+(?: [KMGT]iB| B)?)"
                   r"(?: (?P<unit>items|rows))?  \d+\.\ds$")


def phases(screen: list[str]) -> list[tuple[str, str, str]]:
    """(phase, amount done, total) of each completion line, in screen order."""
    return [(m["name"], m["done"], m["total"]) for line in screen if (m := PHASE.match(line))]


def assert_clean(screen: list[str]) -> None:
    """No progress bar, empty counter or decimal size unit anywhere on the final screen."""
    text = "\n".join(screen)
    assert "━" not in text and "╸" not in text and "0/0" not in text, text
    assert not re.search(r"\d (?:kB|MB|GB)\b", text), text


def test_backup_and_restore_show_each_phase_complete_and_nothing_after_the_result(
        cli: Cli, seed_db: DbHandle, fresh_db: Callable[[str], DbHandle], local_repo: str) -> None:
    env = cli.base_env()
    backup = run_on_terminal([*cli.command, "backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn],
                             env, cli.workdir, columns=200)
    assert backup.returncode == 0, backup.raw[-3000:]
    screen = backup.screen
    assert_clean(screen)
    assert [p[0] for p in phases(screen)] == ["data", "table checksums"], screen
    for _, done, total in phases(screen):
        assert done == total, screen
    assert re.match(r"backup \S+ complete: 28 tables, \d+ rows, [\d.]+ MiB of data stored as [\d.]+ MiB", screen[-1])
    assert screen.index(next(ln for ln in screen if ln.startswith("✓ table checksums"))) < len(screen) - 1

    target = fresh_db("progress")
    restore = run_on_terminal([*cli.command, "restore", "full", "--repo", local_repo, "--target-dsn", target.dsn],
                              env, cli.workdir, columns=200)
    assert restore.returncode == 0, restore.raw[-3000:]
    screen = restore.screen
    assert_clean(screen)
    done = phases(screen)
    assert [p[0] for p in done] == ["schema", "data", "indexes and constraints", "validation"], screen
    assert all(d == t for _, d, t in done), done
    assert done[1][2].endswith("MiB") or done[1][2].endswith("KiB"), done
    result = next(i for i, ln in enumerate(screen) if ln.startswith("restored database "))
    assert max(i for i, ln in enumerate(screen) if PHASE.match(ln)) < result
    assert screen[-1] == "verdict: OK — complete and consistent"
    assert not any(ln.startswith(("✓ ", "· ", "warning")) for ln in screen[result:]), screen[result:]
    assert sum(ln.startswith("ok    ") for ln in screen[result:]) >= 20
