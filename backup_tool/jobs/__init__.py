"""Orchestration: commands that combine storage, PostgreSQL and the planners (run-due, expire,
status and audit collection, health, check, verify). Decisions are delegated to
:mod:`backup_tool.governance`."""
