"""Never write plaintext into an encrypted repository.

A repository is encrypted from the first backup or WAL segment written into it with a key:
that writer records the key id under ``encryption/<key id>.json`` (plaintext, write-once,
holding the id and the algorithm, never the key). Before ``backup full|incremental|base``
or ``wal push`` writes anything, :func:`guard_writes` refuses (:class:`KeyRequiredError`,
exit 1, naming the key id) when no key is configured but

- the policy requires one (``backup.encryption_key_id``; also refused when the configured
  key has another id), or
- the repository records one (a key marker, or, for repositories encrypted before markers
  existed, a manifest recording a key id; backups read manifests, ``wal push`` only markers).

The policy is the signal to rely on against someone with bucket write access (they can
delete markers and manifests, not edit a policy file on the database host); the repository
signals catch the honest mistake of a host or cron job without the key. Configuring a key
with another id than the repository's is key rotation, and allowed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backup_tool.errors import KeyRequiredError
from backup_tool.repository.storage import ObjectExistsError, Storage
from backup_tool.repository.storage.encrypted import KEY_HINT, encryption_of

KEYS_PREFIX = "encryption/"


def key_marker(key_id: str) -> str:
    return f"{KEYS_PREFIX}{key_id}.json"


@dataclass(frozen=True)
class KeyNeeded:
    """Why a write must not go ahead with the configured key (None configured, or another one)."""

    key_id: str
    source: str
    configured: str | None

    def message(self, what: str) -> str:
        have = ("no encryption key is configured" if self.configured is None
                else f"the configured key has id {self.configured}")
        how = "in plaintext" if self.configured is None else "with another key"
        return f"{self.source} requires encryption with key id {self.key_id} and {have}: refusing to {what} {how}"


def key_needed(configured: str | None, policy_key_id: str, policy_name: str,
               repository_key_ids: Sequence[str], repository_url: str) -> KeyNeeded | None:
    """The key a write needs and lacks, or None. ``repository_key_ids`` oldest first."""
    if policy_key_id and configured != policy_key_id:
        return KeyNeeded(policy_key_id, f"policy {policy_name}", configured)
    if configured is None and repository_key_ids:
        return KeyNeeded(repository_key_ids[-1], f"repository {repository_url}", None)
    return None


def recorded_key_ids(storage: Storage) -> list[str]:
    """Key ids recorded by key markers, oldest marker first."""
    found = [info for info in storage.list(KEYS_PREFIX) if info.key.endswith(".json")]
    return [info.key[len(KEYS_PREFIX):-len(".json")] for info in sorted(found, key=lambda i: (i.modified, i.key))]


def guard_writes(storage: Storage, policy_key_id: str, policy_name: str, what: str,
                 backup_key_ids: Callable[[], list[str]] | None = None) -> None:
    """Refuse before anything is written when the write needs a key it lacks; with a key,
    record it as the repository's (once). ``backup_key_ids``: the key ids the repository's
    backups were written with, asked only when no key marker answers (a repository written
    before markers existed)."""
    key = encryption_of(storage)
    configured = key.key_id if key else None
    repository = [] if configured else recorded_key_ids(storage)
    if configured is None and not repository and backup_key_ids is not None and not policy_key_id:
        repository = backup_key_ids()
    needed = key_needed(configured, policy_key_id, policy_name, repository, storage.url)
    if needed is not None:
        raise KeyRequiredError(needed.message(what), KEY_HINT)
    if key is not None and not storage.exists(key_marker(key.key_id)):
        try:
            storage.put_bytes(key_marker(key.key_id), json.dumps(key.describe()).encode())
        except ObjectExistsError:
            pass
