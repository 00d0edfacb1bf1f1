"""The target session of a table restore, opened by a thread while the command still loads
and reads the repository: kept apart from :mod:`backup_tool.logical.restore_tables` so that the
command line can start it before importing the restore itself."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from backup_tool.errors import BackupToolError
from backup_tool.postgres import tools as pg_tools
from backup_tool.postgres.connection import NAME_SEARCH_PATH, ConnInfo

SESSION_ENCODING = "UTF8"
"""The client encoding the session is opened with (see :class:`SessionAhead`)."""


def open_session_ahead(target_dsn: str | ConnInfo) -> SessionAhead | None:
    """Start opening the target session; None for a DSN that does not parse (it is reported
    where the restore connects, as it always was)."""
    try:
        return SessionAhead(target_dsn if isinstance(target_dsn, ConnInfo) else ConnInfo(target_dsn),
                            SESSION_ENCODING, NAME_SEARCH_PATH)
    except BackupToolError:
        return None


class SessionAhead:
    """The target session, opened by a thread while the repository is read (the S3 client's
    start, the manifests): the server starts the backend, authenticates and, in a database
    just created, builds its relation cache on the other core instead of after the manifest.
    Once it is open, the thread also probes the target major's ``pg_restore`` (its
    ``--version``, cached), which the definitions need, while the main thread works.

    It is opened with client_encoding ``encoding``: a session's startup settings are what
    ``RESET ALL`` (see :func:`backup_tool.logical.restore_tables._run_script`) returns to, so the backup's encoding cannot be set
    afterwards; nor the ``search_path`` names are read under (pinned at startup too,
    :meth:`ConnInfo.with_search_path`). :meth:`take` hands it over only if the backup's encoding
    and recorded path are those; otherwise (or when the command stops first: :meth:`abandon`)
    it is closed and nothing else changes."""

    def __init__(self, target: ConnInfo, encoding: str, search_path: str | None = None) -> None:
        self.target = target.with_search_path(search_path)
        self.encoding = encoding
        self.search_path = search_path
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        threading.Thread(target=self._open, name="connect-ahead", daemon=True).start()

    def _open(self) -> None:
        major = 0
        try:
            conn = self.target.connect(settings={"client_encoding": self.encoding})
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that takes the session
            self._error = exc
        else:
            major = conn.info.server_version // 10000
            with self._lock:
                if self._abandoned:
                    conn.close()
                else:
                    self._conn = conn
        self._done.set()
        if major:
            try:
                pg_tools.find("pg_restore", major)  # its --version probe, cached, off the main thread
            except BackupToolError:
                pass  # reported by the restore itself when it needs the program

    def take(self, encoding: str, search_path: str | None = None) -> psycopg.Connection[Any] | None:
        """The session (the caller owns it now), None if it was opened with another encoding
        than ``encoding`` or another search path than ``search_path``; its connection error,
        raised here, where the caller would connect."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        if (encoding, search_path) != (self.encoding, self.search_path):
            self.abandon()
            return None
        with self._lock:
            conn, self._conn = self._conn, None
        return conn

    def abandon(self) -> None:
        """Close the session now, or as soon as it is open."""
        with self._lock:
            self._abandoned = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


