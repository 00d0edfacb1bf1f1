"""Standard-library-only building blocks every layer may use: time parsing and formatting,
sizes, cron arithmetic, WAL segment names and LSNs, the Reporter callback, test hooks.

Nothing here does I/O against PostgreSQL or a repository, and nothing here imports another
backup_tool package except :mod:`backup_tool.errors`.
"""
