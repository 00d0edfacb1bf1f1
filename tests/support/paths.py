"""Where the tests' files are."""

from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent
FIXTURES_DIR = TESTS_DIR / "fixtures"
SEED_FILES = (FIXTURES_DIR / "seed_schema.sql", FIXTURES_DIR / "seed_data.sql")
