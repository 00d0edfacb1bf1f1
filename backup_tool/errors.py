"""Exception types and the exit code each maps to (the CLI contract).

Every error the library raises on purpose is a :class:`BackupToolError` whose message is
one line saying what is wrong and what to do. Anything else reaching the CLI is a bug and
is reported as a failed operation (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_VALIDATION = 3
EXIT_LOCKED = 4


class BackupToolError(Exception):
    """The operation failed; exit code 1."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(BackupToolError):
    """The command line or configuration is wrong; exit code 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A policy file, repository URL or other setting is invalid; exit code 2."""


class KeyUnavailableError(ConfigError):
    """A manifest is sealed (or a backup encrypted) under a key that is not configured; exit code 2."""


class NotFoundError(BackupToolError):
    """A backup, table or object the user named does not exist; exit code 1."""


class RepositoryMissingError(NotFoundError):
    """The repository a reader was pointed at does not exist (a typo, or nothing backed up yet
    there); exit code 1. An existing but empty repository is not this: it has no backups yet."""


class StorageError(BackupToolError):
    """The repository could not be read or written; exit code 1."""


class DatabaseError(BackupToolError):
    """PostgreSQL refused or failed; exit code 1."""


class PageChecksumError(DatabaseError):
    """Data pages of the cluster fail their checksums (a base backup verified them); exit
    code 1. ``pages`` holds each failing (file relative to the data directory, block)."""

    def __init__(self, message: str, hint: str | None = None, pages: tuple[tuple[str, int], ...] = ()) -> None:
        super().__init__(message, hint)
        self.pages = pages


class WalDamagedError(BackupToolError):
    """A finished WAL segment (archived, or complete in ``pg_wal``) fails its record checks:
    recovery through it would stop there. Raised where WAL is read for another purpose
    (an incremental's change detection), which then falls back and warns; exit code 1."""


class RefusedError(BackupToolError):
    """A destructive action was refused because it would overwrite data; exit code 1."""


class IntegrityError(BackupToolError):
    """Stored data does not match its checksum; exit code 3."""

    exit_code = EXIT_VALIDATION


class UnauthenticatedError(IntegrityError):
    """A manifest is not authenticated under the configured key (untagged, forged or replayed); exit code 3."""


class KeyRequiredError(BackupToolError):
    """A write into an encrypted repository (or under a policy requiring a key) lacks that key; exit code 1."""


class ValidationFailed(BackupToolError):
    """Validation or verification found a problem; exit code 3. Carries the report."""

    exit_code = EXIT_VALIDATION

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class LockHeldError(BackupToolError):
    """Another backup or restore holds the lock; exit code 4."""

    exit_code = EXIT_LOCKED
