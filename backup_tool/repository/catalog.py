"""The repository as a catalog of backups, read from the repository alone.

Layout (all keys relative to the repository root)::

    manifests/<id>.json          one per complete backup; written last, the commit point
    backups/<id>/...             the backup's objects (schema, globals, per-table data)

    running/<id>.json            a backup in progress (written before its first object,
                                 removed after its manifest or its cleanup)

Listing backups lists ``manifests/`` only, so it is cheap on S3 and needs no local state.
Objects under ``backups/<id>/`` with no manifest are garbage from an interrupted run:
never listed, never restored, removed by retention's sweep. A ``running/`` marker tells the
sweep (and an operator) that a backup is still writing under its prefix; one left by a
killed process only delays the sweep until it is older than ``RUNNING_STALE_AFTER``.
Backup ids sort by the time the backup started (``20261125T020000Z-F3a9c``).

A repository may hold backups of several databases. ``latest`` always means the newest
backup of one database, decided by the pure :func:`choose_latest` (``--database``, else the
only database, else the one the DSN names; several and none named is a usage error); an id
contradicting an explicit ``--database`` is refused (:func:`check_database`).

Manifests stay readable without the encryption key (``list``, ``show``, ``verify``,
retention and audits need only bucket credentials). When the repository is encrypted,
:meth:`Catalog.commit` records the key id and seals the manifest with an HMAC under the key.
With a key configured, :meth:`Catalog.load` accepts only manifests sealed under that key
or a previous one (``BACKUP_TOOL_PREVIOUS_KEYS_FILE``): one with no tag (written without a
key, or stripped of its tag) or a failing tag is refused (:class:`UnauthenticatedError`,
exit 3), one sealed under a key not configured too (:class:`KeyUnavailableError`, exit 2,
naming both key ids); :data:`REFUSED` is both. So nothing
planted by someone with bucket access but without the key is listed, restored, verified or
counted by retention. ``BACKUP_TOOL_ALLOW_UNAUTHENTICATED=1`` trusts the untagged and
other-key ones (pre-encryption backups, an old key's); a failing tag is refused even then.
Whatever the key, a manifest must hold the backup its name says (no replay under another id).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from backup_tool.core.kinds import LOGICAL_KINDS, BackupKind
from backup_tool.core.threads import spawn
from backup_tool.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    BackupToolError,
    ConfigError,
    KeyUnavailableError,
    NotFoundError,
    UnauthenticatedError,
    UsageError,
)
from backup_tool.repository.catalog_index import IndexEntry, index_keys, read_newest_index, write_index
from backup_tool.repository.manifest import (
    ENCRYPTED_FORMAT,
    Manifest,
    manifest_seal,
    parse_manifest,
)
from backup_tool.repository.storage import ObjectMissingError, Storage
from backup_tool.repository.storage.encrypted import (
    ALLOW_UNAUTHENTICATED_ENV,
    KEY_HINT,
    PREVIOUS_KEYS_ENV,
    encryption_of,
    keyring_of,
    manifest_encryption,
    unauthenticated_allowed,
)

if TYPE_CHECKING:
    from backup_tool.repository.catalog_index import IndexEntry
    from backup_tool.repository.records import BackupRecord

REFUSED = (UnauthenticatedError, KeyUnavailableError)

MANIFEST_PREFIX = "manifests/"
DATA_PREFIX = "backups/"
RUNNING_PREFIX = "running/"
RUNNING_STALE_AFTER = timedelta(hours=48)
KIND_LETTER: dict[str, str] = {BackupKind.FULL: "F", BackupKind.INCREMENTAL: "I", BackupKind.BASE: "B"}


def manifest_key(backup_id: str) -> str:
    return f"{MANIFEST_PREFIX}{backup_id}.json"


def data_prefix(backup_id: str) -> str:
    return f"{DATA_PREFIX}{backup_id}/"


def running_key(backup_id: str) -> str:
    return f"{RUNNING_PREFIX}{backup_id}.json"


@dataclass(frozen=True)
class RunningBackup:
    """A backup that announced itself as in progress (its marker's key and write time)."""

    id: str
    written_at: datetime


def new_backup_id(kind: str, started_at: datetime) -> str:
    stamp = started_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{KIND_LETTER[kind]}{secrets.token_hex(2)}"


LATEST = "latest"


class RefProblem(Enum):
    """Why a backup reference (id, id prefix or ``latest``) designates no single backup."""

    NO_BACKUPS = "no_backups"
    NO_BACKUP_OF_DATABASE = "no_backup_of_database"
    SEVERAL_DATABASES = "several_databases"
    OTHER_DATABASE = "other_database"
    UNKNOWN_ID = "unknown_id"
    AMBIGUOUS_ID = "ambiguous_id"
    EMPTY = "empty"


_USAGE_PROBLEMS = (RefProblem.SEVERAL_DATABASES, RefProblem.OTHER_DATABASE, RefProblem.EMPTY)


class UnresolvedBackup(BackupToolError):
    """A backup reference designates no single backup. Exit 2 when the command line must say
    more (which database, or a database that contradicts the id), else 1 (not found)."""

    def __init__(self, reason: RefProblem, message: str, hint: str) -> None:
        super().__init__(message, hint)
        self.reason = reason
        self.exit_code = EXIT_USAGE if reason in _USAGE_PROBLEMS else EXIT_FAILED


@dataclass(frozen=True)
class DatabaseHint:
    """Which database ``latest`` means: ``option`` (``--database``) when given, else ``dsn``
    (the database named by ``--dsn`` / ``DATABASE_URL`` / ``PGDATABASE``) when the repository
    holds backups of it, else the repository's only database."""

    option: str | None = None
    dsn: str | None = None


LOAD_THREADS = 8
"""Manifests read at once; ``latest`` among no more than this many reads them all (one round
of GETs, as fast as reading the catalog index)."""


class Candidate(Protocol):
    """What :func:`choose_latest` reads of a backup: a manifest, or its index record."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def database(self) -> str: ...

    @property
    def started_at(self) -> datetime: ...


C = TypeVar("C", bound=Candidate)


def choose_latest(backups: Iterable[C], database: DatabaseHint,
                  kinds: tuple[str, ...] = LOGICAL_KINDS, where: str = "the repository") -> C:
    """The newest backup (by start, the moment its snapshot was taken) of ``kinds`` of one database.

    The database is ``database.option`` if given; else the only database the repository holds
    backups of; else ``database.dsn`` if the repository holds backups of it. Never crosses
    databases: several databases and none designated raises ``SEVERAL_DATABASES`` (exit 2).
    """
    pool = [m for m in backups if m.kind in kinds]
    what = " or ".join(kinds)
    if not pool:
        raise UnresolvedBackup(RefProblem.NO_BACKUPS, f"no {what} backup in {where}",
                               "take one with 'backup-tool backup full'")
    names = sorted({m.database for m in pool})
    if database.option is not None:
        if database.option not in names:
            raise UnresolvedBackup(RefProblem.NO_BACKUP_OF_DATABASE,
                                   f"no {what} backup of database {database.option!r} in {where} "
                                   f"(it holds backups of: {', '.join(names)})",
                                   "check --database, or run 'backup-tool list'")
        chosen = database.option
    elif len(names) == 1:
        chosen = names[0]
    elif database.dsn in names:
        chosen = database.dsn
    else:
        raise UnresolvedBackup(RefProblem.SEVERAL_DATABASES,
                               f"'latest' is ambiguous: {where} holds backups of {len(names)} databases "
                               f"({', '.join(names)}) and none is named",
                               "add --database NAME (or name the database in --dsn / DATABASE_URL), or give a backup ID instead of 'latest'")
    return max((m for m in pool if m.database == chosen), key=lambda m: (m.started_at, m.id))


def of_cluster_holding(backups: Iterable[Manifest], database: str | None,
                       where: str = "the repository") -> list[Manifest]:
    """The base backups of a cluster that held ``database`` (all of them when None): a physical
    backup copies the whole cluster, so it serves every database the cluster held."""
    pool = [m for m in backups if m.kind == BackupKind.BASE]
    if database is None:
        return pool
    held = [m for m in pool if database in ((m.physical.databases if m.physical else ()) or (m.database,))]
    if pool and not held:
        raise UnresolvedBackup(RefProblem.NO_BACKUP_OF_DATABASE,
                               f"no base backup in {where} is of a cluster holding database {database!r}",
                               "check --database, or run 'backup-tool list'")
    return held


def match_id(ids: Iterable[str], ref: str, where: str = "the repository") -> str:
    """The backup id ``ref`` names: itself, or the only id it is a prefix of."""
    known = sorted(ids)
    if ref in known:
        return ref
    matches = [i for i in known if i.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UnresolvedBackup(RefProblem.AMBIGUOUS_ID,
                               f"backup id {ref!r} is ambiguous ({len(matches)} backups match)",
                               "give more characters of the id")
    recent = ", ".join(known[-3:]) or "none"
    raise UnresolvedBackup(RefProblem.UNKNOWN_ID, f"backup {ref!r} not found in {where} (newest: {recent})",
                           "run 'backup-tool list' to see the backups")


def check_database(manifest: Manifest, database: DatabaseHint) -> None:
    """Refuse a backup named by id that contradicts an explicit ``--database`` (the database
    named only by the DSN is a default for ``latest``, never a contradiction)."""
    if database.option is not None and manifest.database != database.option:
        raise UnresolvedBackup(RefProblem.OTHER_DATABASE,
                               f"backup {manifest.id} is a backup of database {manifest.database!r}, "
                               f"not {database.option!r}",
                               "drop --database, or pick a backup of that database ('backup-tool list')")


class Catalog:
    def __init__(self, storage: Storage, allow_unauthenticated: bool | None = None) -> None:
        """``allow_unauthenticated`` (default: ``BACKUP_TOOL_ALLOW_UNAUTHENTICATED=1``) trusts
        manifests with no tag, or a tag under another key, while a key is configured."""
        self.storage = storage
        self.allow_unauthenticated = (unauthenticated_allowed() if allow_unauthenticated is None
                                      else allow_unauthenticated)
        self._cache: dict[str, Manifest] = {}
        self._digests: dict[str, str] = {}
        self._seen: tuple[list[str], list[IndexEntry]] | None = None
        self._index_read: tuple[str | None, tuple[list[str], dict[str, IndexEntry]] | None] = (None, None)
        """The newest index key :meth:`entries` found, and what it held: still the newest at
        commit, it is not read again."""
        self._entries: tuple[list[str], list[IndexEntry], list[BackupToolError]] | None = None

    def ids(self) -> list[str]:
        return sorted(
            info.key[len(MANIFEST_PREFIX):-len(".json")]
            for info in self.storage.list(MANIFEST_PREFIX)
            if info.key.endswith(".json")
        )

    def load(self, backup_id: str) -> Manifest:
        if backup_id not in self._cache:
            key = manifest_key(backup_id)
            try:
                raw = self.storage.get_bytes(key)
            except ObjectMissingError:
                raise NotFoundError(f"backup {backup_id} not found in {self.storage.url}",
                                    "run 'backup-tool list' to see the backups") from None
            manifest = parse_manifest(raw, key)
            if manifest.id != backup_id:
                raise UnauthenticatedError(f"manifest {key} holds backup {manifest.id}, not {backup_id}: it was "
                                           "copied or replayed under another name",
                                           "do not restore it; run 'backup-tool verify all'")
            self._authenticate(manifest, raw, key)
            self._digests[backup_id] = manifest_seal(raw)[0]
            self._cache[backup_id] = manifest
        return self._cache[backup_id]

    def _authenticate(self, manifest: Manifest, raw: bytes, where: str) -> None:
        """With a key configured, refuse a manifest not sealed under it or a previous key
        (see the module docstring)."""
        keyring = keyring_of(self.storage)
        if not keyring:
            return
        current = encryption_of(self.storage)
        recorded = manifest_encryption(manifest.options)
        key = keyring.get(recorded["key_id"]) if recorded else None
        if key is not None:
            digest, mac = manifest_seal(raw)
            if mac is None or not key.check_seal(digest, mac):
                raise UnauthenticatedError(f"manifest {where} fails authentication with key id {key.key_id}: it "
                                           "was edited by someone without the key", "use another backup and run "
                                           "'backup-tool verify all'")
            return
        if self.allow_unauthenticated:
            return
        have = f"key id {current.key_id}" if current else "the previous keys configured"
        if recorded is not None:
            raise KeyUnavailableError(
                f"backup {manifest.id} is sealed with key id {recorded['key_id']}, but the configured key has id "
                f"{current.key_id if current else 'none'}: manifest {where} cannot be authenticated",
                f"{KEY_HINT} (a retired key goes in {PREVIOUS_KEYS_ENV})")
        raise UnauthenticatedError(f"manifest {where} is not authenticated under {have}: it carries no "
                                   "authentication tag (written without a key, or stripped of its tag)",
                                   f"do not trust it unless you wrote it; {ALLOW_UNAUTHENTICATED_ENV}=1 trusts "
                                   "it (README: Guarantees)")

    def require_key(self, manifest: Manifest) -> None:
        """Refuse, naming the key id, to restore an encrypted backup without its key."""
        recorded = manifest_encryption(manifest.options)
        if recorded is None or recorded["key_id"] in keyring_of(self.storage):
            return
        key = encryption_of(self.storage)
        if key is None:
            raise ConfigError(f"backup {manifest.id} is encrypted with key id {recorded['key_id']} and no "
                              "encryption key is configured", KEY_HINT)
        raise ConfigError(f"backup {manifest.id} is encrypted with key id {recorded['key_id']}, but the "
                          f"configured key has id {key.key_id}", KEY_HINT)

    def scan(self, ids: list[str] | None = None) -> tuple[list[Manifest], list[BackupToolError]]:
        """Every readable manifest (oldest first; of ``ids`` if given, else of the listing)
        and the errors of those that are not."""
        manifests, problems = self._load_many(self.ids() if ids is None else ids)
        manifests.sort(key=lambda m: (m.started_at, m.id))
        return manifests, problems

    def _load_many(self, ids: list[str]) -> tuple[list[Manifest], list[BackupToolError]]:
        manifests: list[Manifest] = []
        problems: list[BackupToolError] = []
        with cf.ThreadPoolExecutor(LOAD_THREADS) as pool:
            for fut in [pool.submit(self.load, i) for i in ids]:
                try:
                    manifests.append(fut.result())
                except BackupToolError as exc:
                    problems.append(exc)
        return manifests, problems

    def entries(self, refresh: bool = False,
                ids: list[str] | None = None) -> tuple[list[IndexEntry], list[BackupToolError]]:
        """What :meth:`scan` would give, as index entries (oldest first), reading only the
        manifests the catalog index does not vouch for (:mod:`backup_tool.repository.catalog_index`).
        With ``refresh``, a stale or missing index is rewritten (best effort: a read-only
        repository just stays without one). ``ids``: the manifest listing, if just taken.
        Asked again (a backup reads the catalog before and after taking its lock), a listing
        equal to the last one is answered from what that one was found to hold, without
        reading the index again: manifests are written once, so the same listing holds the
        same backups."""
        ids = self.ids() if ids is None else ids
        if not refresh and self._entries is not None and self._entries[0] == ids:
            return list(self._entries[1]), list(self._entries[2])
        self._index_read = read_newest_index(self.storage, index_keys(self.storage))
        index = self._index_read[1]
        known, vouched = index if index is not None else ([], {})
        listed = set(ids)
        use = {i: e for i, e in vouched.items() if i in listed}
        missing = [i for i in ids if i not in use]
        loaded, problems = self._load_many(missing)
        keyring = keyring_of(self.storage)
        for m in loaded:
            use[m.id] = IndexEntry.of(m, self._digests[m.id], keyring)
        if refresh and (loaded or sorted(known) != ids):
            try:
                write_index(self.storage, ids, use.values())
            except BackupToolError:
                pass  # a cache: without write access (or on a lost race) the manifests still answer
        elif loaded or sorted(known) != ids:
            self._seen = (ids, list(use.values()))
        ordered = sorted(use.values(), key=lambda e: (e.parsed.started_at, e.id))
        self._entries = (ids, ordered, problems)
        return list(ordered), list(problems)

    def records(self, refresh: bool = False) -> tuple[list[BackupRecord], list[BackupToolError]]:
        """Every backup as retention, scheduling, monitoring and the audit see it (oldest
        first), and the manifests that could not be read; see :meth:`entries`."""
        entries, problems = self.entries(refresh)
        return [e.backup_record() for e in entries], problems

    def of_kinds(self, kinds: Iterable[str]) -> tuple[list[Manifest], list[BackupToolError]]:
        """The readable manifests of backups of ``kinds`` (oldest first), chosen from the catalog
        index so that only those manifests are read (base backups among thousands of logical
        ones cost a handful of reads)."""
        wanted = set(kinds)
        entries, problems = self.entries()
        manifests, more = self._load_many([e.id for e in entries if e.record.get("kind") in wanted])
        manifests.sort(key=lambda m: (m.started_at, m.id))
        return manifests, problems + more

    def current(self) -> list[IndexEntry]:
        """Every complete, authenticated backup (oldest first) as :meth:`backups` judges them,
        from the catalog index: only the manifests it does not vouch for are read (and
        :meth:`commit` then writes the index afresh, so the next run reads none), so a backup's
        own planning costs the same with thousands of backups as with five. Raises on the first
        unreadable manifest."""
        entries, problems = self.entries()
        damaged = [p for p in problems if not isinstance(p, REFUSED)]
        if damaged:
            raise damaged[0]
        return entries

    def key_ids(self) -> list[str]:
        """The encryption key ids of the readable backups, oldest backup first, from the index."""
        ids: list[str] = []
        for e in self.entries()[0]:
            if e.key_id and e.key_id not in ids:
                ids.append(e.key_id)
        return ids

    def backups(self) -> list[Manifest]:
        """Every complete, authenticated backup, oldest first; raises on the first unreadable
        manifest (a refused, unauthenticated one is not a backup of ours and is left out)."""
        manifests, problems = self.scan()
        damaged = [p for p in problems if not isinstance(p, REFUSED)]
        if damaged:
            raise damaged[0]
        return manifests

    def resolve(self, ref: str | None, kinds: tuple[str, ...] = LOGICAL_KINDS,
                database: DatabaseHint | None = None) -> Manifest:
        """A backup by id, unique id prefix, or ``latest``: the newest of ``kinds`` of the
        database ``database`` designates (see :func:`choose_latest`). None means ``latest``; an
        empty or blank reference (``--backup "$BACKUP"`` with the variable unset) is refused, never
        read as ``latest``, which may be a backup taken after the damage."""
        if ref is None:
            ref = LATEST
        elif not ref.strip():
            raise UnresolvedBackup(RefProblem.EMPTY, "the backup reference is empty",
                                   "give a backup id ('backup-tool list' shows them) or 'latest'")
        hint = database or DatabaseHint()
        if ref == LATEST:
            ids = self.ids()
            indexed = self._latest_by_index(ids, hint, kinds) if len(ids) > LOAD_THREADS else None
            if indexed is not None:
                return indexed
            manifests, refused = self.scan(ids)
            try:
                return choose_latest(manifests, hint, kinds, self.storage.url)
            except UnresolvedBackup as exc:
                if exc.reason in (RefProblem.NO_BACKUPS, RefProblem.NO_BACKUP_OF_DATABASE) and refused:
                    raise refused[-1] from None
                raise
        manifest = self.load(match_id(self.ids(), ref, self.storage.url))
        check_database(manifest, hint)
        return manifest

    def _latest_by_index(self, ids: list[str], hint: DatabaseHint, kinds: tuple[str, ...]) -> Manifest | None:
        """``latest`` among the listed ``ids``, chosen from the catalog index (:meth:`entries`:
        one GET for the index, the manifests it does not vouch for, then the chosen one), so a
        restore does not read every manifest of a large repository. None, and the caller reads
        them all as before, when the choice is not certain to be the same: no backup qualifies
        (the errors name the refused manifests), or the chosen manifest does not load or is not
        the one the index recorded (its sha256 differs)."""
        entries = {e.id: e for e in self.entries(ids=ids)[0]}
        try:
            newest = choose_latest([e.parsed for e in entries.values()], hint, kinds, self.storage.url)
        except UnresolvedBackup:
            return None
        try:
            manifest = self.load(newest.id)
        except BackupToolError:
            return None
        return manifest if self._digests.get(newest.id) == entries[newest.id].manifest_sha256 else None

    def resolve_logical(self, ref: str | None, database: DatabaseHint | None = None) -> Manifest:
        """Like :meth:`resolve`, refusing a physical base backup (those restore with ``restore pitr``)."""
        manifest = self.resolve(ref, database=database)
        if manifest.kind not in LOGICAL_KINDS:
            raise UsageError(f"backup {manifest.id} is a physical {manifest.kind} backup",
                             "restore it with 'backup-tool restore pitr', or pick a full/incremental backup")
        for link in self.chain(manifest):
            self.require_key(link)
        return manifest

    def chain(self, manifest: Manifest) -> list[Manifest]:
        """The backup and its ancestors, full first."""
        chain = [manifest]
        while chain[0].parent_id:
            chain.insert(0, self.load(chain[0].parent_id))
        return chain

    def mark_running(self, backup_id: str, kind: str, database: str) -> None:
        """Announce a backup in progress, before it writes its first object."""
        self.storage.put_bytes(running_key(backup_id), json.dumps({
            "id": backup_id, "kind": kind, "database": database, "host": socket.gethostname(),
            "pid": os.getpid(), "started_at": datetime.now(timezone.utc).isoformat()}).encode())

    def unmark_running(self, backup_id: str) -> None:
        """Best effort: a marker left behind only delays the garbage sweep."""
        try:
            self.storage.delete(running_key(backup_id))
        except BackupToolError:
            pass

    def running(self) -> list[RunningBackup]:
        """Backups announced as in progress (stale ones included: older than ``RUNNING_STALE_AFTER``)."""
        return [RunningBackup(info.key[len(RUNNING_PREFIX):-len(".json")], info.modified)
                for info in self.storage.list(RUNNING_PREFIX) if info.key.endswith(".json")]

    def missing_objects(self, manifest: Manifest) -> list[str]:
        """Keys the manifest references that the repository does not hold (one LIST per backup prefix)."""
        return self.missing_keys(o.key for o in manifest.objects())

    def missing_keys(self, keys: Iterable[str]) -> list[str]:
        """Which of ``keys`` the repository does not hold, with one LIST per backup prefix
        (the prefixes listed at once: an incremental's objects span its chain)."""
        wanted = set(keys)
        prefixes = sorted({"/".join(k.split("/")[:2]) + "/" for k in wanted})
        if len(prefixes) < 2:
            present = {info.key for p in prefixes for info in self.storage.list(p)}
        else:
            with cf.ThreadPoolExecutor(min(LOAD_THREADS, len(prefixes))) as pool:
                present = {info.key for listing in pool.map(lambda p: list(self.storage.list(p)), prefixes)
                           for info in listing}
        return sorted(wanted - present)

    def commit(self, manifest: Manifest, published: Callable[[], None] | None = None) -> Manifest:
        """Publish the backup: from here on it is listed and restorable. Its objects' names
        deferred by ``defer_name_sync`` are made durable first. Returns it as stored (with the
        key id recorded when the repository is encrypted).

        The manifest's write is the commit point, and everything after it is a cache or a
        clean-up that may be lost in a crash: the catalog index is listed while the manifest
        is written (the listing does not depend on it), and once the manifest is stored the
        index is updated on a thread while ``published`` runs here (a backup removes its
        running marker: only after the manifest, so the sweep never takes an unpublished
        backup's objects for garbage). Both have ended when this returns."""
        key = encryption_of(self.storage)
        if key is not None:
            manifest = replace(manifest, options={**manifest.options, "encryption": key.describe()},
                               format=max(manifest.format, ENCRYPTED_FORMAT))
        raw = manifest.to_json(key.seal if key else None)
        self.storage.sync_names(data_prefix(manifest.id))
        listing = spawn(index_keys, self.storage, name="catalog-list")
        self.storage.put_bytes(manifest_key(manifest.id), raw)
        self._cache[manifest.id] = manifest
        self._digests[manifest.id] = manifest_seal(raw)[0]
        indexing = spawn(self._index_committed, manifest, listing, name="catalog-index")
        try:
            if published is not None:
                published()
        finally:
            indexing.result()
        return manifest

    def _index_committed(self, manifest: Manifest, listing: cf.Future[list[str]]) -> None:
        """Add a just-committed backup to a current index (one that lists every other
        manifest), or, when this catalog has just read what a stale or missing index lacked,
        write it afresh: the next reader then reads no manifest at all. Only a committed backup
        writes it, so a failed one leaves the repository as it found it. ``listing``: the index
        keys, listed while the manifest was written. Best effort."""
        try:
            keys = listing.result()
            entry = IndexEntry.of(manifest, self._digests[manifest.id], keyring_of(self.storage))
            if self._seen is not None:
                (ids, seen), self._seen = self._seen, None
                write_index(self.storage, [*ids, manifest.id], [*seen, entry], older=keys)
                return
            read_key, index = self._index_read
            if not keys or keys[-1] != read_key:
                index = read_newest_index(self.storage, keys)[1]
            if index is None:
                return
            known, vouched = index
            if set(known) != set(vouched) or manifest.id in known:
                return
            write_index(self.storage, [*known, manifest.id], [*vouched.values(), entry], older=keys)
        except BackupToolError:
            pass  # the index is a cache: the committed manifest is what counts, readers catch up
