"""Fixture modules loaded by tests/conftest.py (pytest_plugins): PostgreSQL clusters, the S3
server and repositories, the CLI runner."""
