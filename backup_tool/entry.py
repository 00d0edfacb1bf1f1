"""Process entry point, kept light: ``wal push``/``wal fetch`` called by PostgreSQL's
archiver and recovery are answered from the spool before the CLI (Typer, psycopg, boto3)
is even imported, when the segment is already known to be durable in the repository."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:3] in (["wal", "push"], ["wal", "fetch"]):
        from backup_tool.walspool import try_fast_fetch, try_fast_push

        if try_fast_push(sys.argv[1:]) or try_fast_fetch(sys.argv[1:]):
            sys.exit(0)
    from backup_tool.cli import main as cli_main

    cli_main()
