"""The installed wheel: built from this checkout, installed into a fresh virtual environment
outside it, it carries the bundled policies, so ``--policy staging`` / ``--policy compliance``
resolve without the source tree.

The venv sees the system site-packages only for the dependencies (boto3, psycopg, ...); the
wheel goes in with ``--no-deps`` and the test checks that ``backup_tool`` is imported from the
venv, not from the checkout or an editable install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support.paths import REPO_ROOT

pytestmark = pytest.mark.slow
ROOT = REPO_ROOT


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BACKUP_TOOL_", "PG", "PYTHON", "VIRTUAL_ENV")) and k != "DATABASE_URL"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(venv.parent)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, cwd=base)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next(dist.glob("backup_tool-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = _clean_env(venv)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                          "--force-reinstall", "--no-index", str(wheel)],
                         capture_output=True, text=True, cwd=base, env=env)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    work = base / "elsewhere"
    work.mkdir()
    return venv, env, work


def _run(installed: tuple[Path, dict[str, str], Path], *args: str) -> subprocess.CompletedProcess[str]:
    venv, env, work = installed
    return subprocess.run([str(venv / "bin" / "backup-tool"), *args], capture_output=True, text=True,
                          cwd=work, env=env, timeout=120)


def test_wheel_is_imported_from_the_venv(installed: tuple[Path, dict[str, str], Path]) -> None:
    venv, env, work = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import backup_tool.config.policy as p; print(p.__file__); print(p.bundled_policies())"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    module, bundled = where.stdout.split("\n")[:2]
    assert Path(module).is_relative_to(venv) and Path(bundled).is_relative_to(venv), where.stdout
    shipped = sorted(p.name for p in (ROOT / "policies").glob("*.toml"))
    assert sorted(p.name for p in Path(bundled).glob("*.toml")) == shipped


def test_bundled_policies_resolve_by_name_after_install(installed: tuple[Path, dict[str, str], Path]) -> None:
    staging = _run(installed, "schedule", "--policy", "staging", "--repo", "/srv/backups/app")
    assert staging.returncode == 0, staging.stderr
    expected = tomllib.loads((ROOT / "policies" / "staging.toml").read_text())["schedule"]
    assert "# backup-tool: policy 'staging'" in staging.stdout
    assert f"CRON_TZ={expected['timezone']}" in staging.stdout
    assert f"full {expected['full']!r}, incremental {expected['incremental']!r}" in staging.stdout

    compliance = _run(installed, "schedule", "--policy", "compliance", "--json", "--repo", "/srv/backups/app")
    assert compliance.returncode == 0, compliance.stderr
    assert "policy 'compliance'" in compliance.stdout and "base '30 3 * * *'" in compliance.stdout

    check = _run(installed, "check", "--policy", "compliance", "--repo", str(installed[2] / "repo"),
                 "--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert "not found" not in check.stderr + check.stdout, check.stderr
    assert "compliance" in check.stdout + check.stderr
