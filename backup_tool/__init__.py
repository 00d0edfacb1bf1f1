"""backup-tool: PostgreSQL backup and disaster recovery over S3 or a local directory.

The package is a library with a thin Typer CLI on top (``cli.py``). Operations live in
one module per concern (``backup``, ``restore``, ``validate``...); they report progress
through a :class:`backup_tool.core.report.Reporter` and never print.
"""

__version__ = "0.1.0"
