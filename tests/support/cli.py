"""The `backup-tool` CLI, run as a subprocess exactly as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.paths import REPO_ROOT

# Variables that would let an outer environment leak into a CLI run under test.
SCRUBBED_ENV_PREFIXES = ("BACKUP_TOOL_", "PG")
SCRUBBED_ENV_NAMES = ("DATABASE_URL",)


# --------------------------------------------------------------------------- CLI


class CliResult(subprocess.CompletedProcess[str]):
    """CompletedProcess with text stdout/stderr and a `json()` parser."""

    def json(self) -> Any:
        return parse_json_stdout(self)


def parse_json_stdout(proc: subprocess.CompletedProcess[str]) -> Any:
    """stdout parsed as exactly one JSON document; fails the test with both streams if not."""
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        pytest.fail(
            f"stdout of {proc.args!r} is not one JSON document ({exc}); exit {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[:4000]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )


@dataclass
class Cli:
    """Runs `python -m backup_tool ARGS` as a subprocess: no stdin, cwd and HOME in a
    per-test directory, BACKUP_TOOL_*/PG*/DATABASE_URL scrubbed from the inherited
    environment (pass them in `env` to set them; a value of None removes a variable)."""

    workdir: Path
    command: tuple[str, ...] = (sys.executable, "-m", "backup_tool")
    default_timeout: float = 600.0
    tmpdir: Path | None = None
    """TMPDIR of every run, when set: a test that looks for what a run left in its temporary
    directory then sees only its own runs, not those of tests running beside it."""

    def base_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV_NAMES
        }
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
        pythonpath = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        if self.tmpdir is not None:
            env["TMPDIR"] = str(self.tmpdir)
        return env

    def __call__(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        timeout: float | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> CliResult:
        full_env = self.base_env()
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        argv = [*self.command, *(os.fspath(a) for a in args)]
        proc = subprocess.run(
            argv,
            env=full_env,
            cwd=cwd or self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout or self.default_timeout,
        )
        return CliResult(proc.args, proc.returncode, proc.stdout, proc.stderr)

    def json(self, *args: str | os.PathLike[str], expect_rc: int | None = 0, **kwargs: Any) -> Any:
        """Run with `--json` appended, check the exit code (unless expect_rc is None) and
        return the parsed stdout."""
        proc = self(*args, "--json", **kwargs)
        if expect_rc is not None and proc.returncode != expect_rc:
            pytest.fail(
                f"{' '.join(map(str, proc.args))}: exit {proc.returncode}, expected {expect_rc}\n"
                f"--- stdout ---\n{proc.stdout[:4000]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        return proc.json()

    def with_command(self, *command: str) -> Cli:
        """The same runner around another base command (used to test the runner itself)."""
        return Cli(workdir=self.workdir, command=tuple(command), default_timeout=self.default_timeout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """`cli("backup", "full", "--repo", url, "--dsn", dsn)` -> CliResult;
    `cli.json(...)` -> parsed `--json` output."""
    workdir = tmp_path / "cli"
    workdir.mkdir()
    return Cli(workdir=workdir)
