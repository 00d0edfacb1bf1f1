"""Shared pytest fixtures, one module per concern in tests/support/: throwaway PostgreSQL
clusters and seeded databases (clusters), a moto S3 endpoint and repository URLs (s3), and a
runner for the `backup-tool` CLI (cli).

Nothing here imports `backup_tool`; the CLI is only ever run as a subprocess.

Parallel runs (pytest-xdist, `-n N --dist loadfile`, as scripts/test does) are safe: every
session fixture is per worker (its own cluster on a free port, its own moto server), a test
file runs whole on one worker (its module fixtures are built once), and each worker has its
own temporary directory (TMPDIR), so a test that looks for what the tool left in the
temporary directory never sees another worker's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Any

import pytest

pytest_plugins = ["support.clusters", "support.s3", "support.cli"]

_WORKER_TMPDIR_KEY = pytest.StashKey[str]()

# The longest test files, slowest first (per-file totals of `--durations=0` in a parallel run).
# In a parallel run they start before every other file, so that none of them is left running
# alone at the end while the other workers idle. Only the order changes: a file missing here
# runs in xdist's order (most tests first).
SLOWEST_FILES = (
    "tests/validation/test_regression_oracle.py",
    "tests/test_versions.py",
    "tests/logical/test_crashes.py",
    "tests/repository/test_tamper.py",
    "tests/physical/test_pitr.py",
    "tests/validation/test_realdb_oracle.py",
    "tests/logical/test_backup_restore.py",
    "tests/logical/test_restore_tables.py",
    "tests/logical/test_incremental.py",
    "tests/cli/test_secrets.py",
    "tests/cli/test_bad_input.py",
    "tests/repository/test_encryption.py",
    "tests/logical/test_fault_e2e.py",
    "tests/physical/test_table_pitr_partial.py",
    "tests/postgres/test_identifiers.py",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test (real cluster, real repository)")
    config.addinivalue_line("markers", "versions: the PostgreSQL version matrix (tests/test_versions.py)")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # Sticky and world-writable like /tmp: the clusters' OS user (and the archive_command
        # it runs) inherits TMPDIR too.
        private = tempfile.mkdtemp(prefix=f"backup-tool-tests-{worker}-", dir="/tmp")
        os.chmod(private, 0o1777)
        os.environ["TMPDIR"] = private
        tempfile.tempdir = None
        config.stash[_WORKER_TMPDIR_KEY] = private


def pytest_unconfigure(config: pytest.Config) -> None:
    private = config.stash.get(_WORKER_TMPDIR_KEY, None)
    if private:
        shutil.rmtree(private, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadfile with SLOWEST_FILES handed out first (None: xdist's own scheduler)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}

    class SlowestFilesFirst(LoadFileScheduling):  # type: ignore[misc]
        def _assign_work_unit(self, node: Any) -> None:
            if not getattr(self, "_slowest_first", False):
                self.workqueue = OrderedDict(sorted(self.workqueue.items(),
                                                    key=lambda item: rank.get(item[0], len(rank))))
                self._slowest_first = True
            super()._assign_work_unit(node)

    return SlowestFilesFirst(config, log)
