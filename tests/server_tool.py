"""backup-tool as the PostgreSQL server's OS user sees it, for archive_command and
restore_command in tests.

As root the test clusters run as `postgres`, which can neither execute root's Python
(`/root` is 0700) nor read a checkout under `/root`. So, as an operator would, the tests
install the tool where that user can run it: a venv built from the system Python (cached
under /var/tmp by its dependency list) holding the dependencies, a copy of the current
source in a world-readable directory, and a small wrapper script per test that fixes the
environment (repository, S3 endpoint and credentials) the archiver runs it with.

Without root the server runs as ourselves and the wrapper simply uses this interpreter.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
CACHE_DIR = Path("/var/tmp")


def _dependencies() -> list[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def server_python() -> str:
    """An interpreter with the tool's dependencies that the server's OS user can execute."""
    if override := os.environ.get("BACKUP_TOOL_TEST_SERVER_PYTHON"):
        return override
    if os.geteuid() != 0:
        return sys.executable
    deps = _dependencies()
    key = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:12]
    venv = CACHE_DIR / f"backup-tool-server-venv-{key}"
    python = venv / "bin" / "python"
    if python.exists():
        return str(python)
    with open(CACHE_DIR / "backup-tool-server-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists():
            return str(python)
        building = Path(tempfile.mkdtemp(prefix="backup-tool-venv-build-", dir=CACHE_DIR))
        shutil.rmtree(building)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(building)], check=True, capture_output=True)
        done = subprocess.run([str(building / "bin" / "pip"), "install", "-q", *deps],
                              capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"building the server venv failed:\n{done.stdout}\n{done.stderr}")
        building.rename(venv)
        os.chmod(venv, 0o755)
    return str(python)


def install_source(dest: Path) -> Path:
    """Copy the package and its policies into ``dest`` (world-readable); return ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "backup_tool", dest / "backup_tool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if (REPO_ROOT / "policies").is_dir():
        shutil.copytree(REPO_ROOT / "policies", dest / "policies")
    subprocess.run([server_python(), "-m", "compileall", "-q", str(dest / "backup_tool")],
                   check=True, capture_output=True)
    for root, _dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)
    return dest


def write_wrapper(path: Path, source: Path, env: Mapping[str, str] | None = None) -> Path:
    """An executable `backup-tool` the server's OS user can run, with ``env`` fixed in it."""
    python = server_python()
    source_dir = source if os.geteuid() == 0 else REPO_ROOT
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in
                           {"PYTHONPATH": str(source_dir),
                            **dict(env or {})}.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec env {assignments} {shlex.quote(python)} -m backup_tool \"$@\"\n")
    path.chmod(0o755)
    return path


def archiving_workspace(prefix: str) -> tuple[Path, Path, Path]:
    """A world-readable scratch directory under /tmp holding the tool installed for the server's
    OS user and an empty local repository: (base, wrapper, repo). ``archive_command`` for it is
    :func:`archive_settings`."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    wrapper = write_wrapper(base / "bin" / "backup-tool", install_source(base / "src"))
    repo = base / "repo"
    repo.mkdir()
    return base, wrapper, repo


def archive_settings(wrapper: Path, repo: Path) -> dict[str, str]:
    """Server settings that archive every WAL segment into ``repo`` with ``wal push``."""
    return {"archive_mode": "on", "archive_command": f"{wrapper} wal push %p --repo {repo}"}
