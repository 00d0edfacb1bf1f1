"""Shared pytest fixtures, one module per concern in tests/support/: throwaway PostgreSQL
clusters and seeded databases (clusters), a moto S3 endpoint and repository URLs (s3), and a
runner for the `backup-tool` CLI (cli).

Nothing here imports `backup_tool`; the CLI is only ever run as a subprocess.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["support.clusters", "support.s3", "support.cli"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test (real cluster, real repository)")
    config.addinivalue_line("markers", "versions: the PostgreSQL version matrix (tests/test_versions.py)")
