"""The catalog index (``catalog/index-*.json``): planning commands read one object instead
of every manifest, the ``manifests/`` listing stays the truth, and with a key an index (or
entry) written by someone without it is never believed."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest
from simhistory import History, ts
from support.manifests import make_manifest
from support.objects import write_object
from test_tamper import KEY, resealed, sealed_repo

from backup_tool.config.policy import Policy
from backup_tool.errors import IntegrityError
from backup_tool.repository.catalog import LOAD_THREADS, REFUSED, Catalog, DatabaseHint, choose_latest, manifest_key
from backup_tool.repository.catalog_index import INDEX_PREFIX, IndexEntry, _digest, index_keys, write_index
from backup_tool.repository.records import BackupRecord
from backup_tool.repository.storage.encrypted import EncryptedStorage, EncryptionKey
from backup_tool.repository.storage.local import LocalStorage


class CountingStorage(LocalStorage):
    """A local repository that remembers which objects were read."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key: str) -> Iterator[bytes]:
        self.reads.append(key)
        return super().get(key)


def opened(root: Path, key: EncryptionKey | None = None) -> tuple[EncryptedStorage, CountingStorage]:
    inner = CountingStorage(root)
    return EncryptedStorage(inner, key), inner


S = TypeVar("S", bound=LocalStorage)


def planned(root: Path, make: Callable[[Path], S]) -> tuple[S, EncryptedStorage, Catalog, list[str]]:
    """The backups of :func:`history` under a current index, and a catalog that has read the
    index as a backup does when it plans: (the inner store, the store, the catalog, the ids
    the index lists)."""
    history(root)
    inner = make(root)
    storage = EncryptedStorage(inner, None)
    Catalog(storage).records(refresh=True)
    catalog = Catalog(storage)
    return inner, storage, catalog, [e.id for e in catalog.entries()[0]]


def manifest_reads(inner: CountingStorage) -> list[str]:
    return [k for k in inner.reads if k.startswith("manifests/")]


def history(root: Path) -> History:
    storage, _ = opened(root)
    h = History(storage, Policy())
    start = ts("2026-11-01T02:00Z")
    for day in range(4):
        h.full(start + timedelta(days=day))
        for hour in (6, 12, 18):
            h.incremental(start + timedelta(days=day, hours=hour))
    return h


def test_the_index_answers_exactly_as_the_manifests_and_reads_none_of_them(tmp_path: Path) -> None:
    h = history(tmp_path)
    storage, inner = opened(tmp_path)
    truth = [BackupRecord.from_manifest(m) for m in Catalog(storage).scan()[0]]
    assert len(truth) == 16 and index_keys(storage) == []

    assert Catalog(storage).records(refresh=True) == (truth, [])
    assert len(index_keys(storage)) == 1
    inner.reads.clear()
    records, problems = Catalog(storage).records()
    assert (records, problems) == (truth, []) and manifest_reads(inner) == []
    summaries = [dict(e.summary) for e in Catalog(storage).entries()[0]]
    assert summaries == [m.summary() for m in Catalog(storage).scan()[0]]

    # a committed backup joins the index: still no manifest read
    h.full(ts("2026-11-06T02:00Z"))
    assert len(index_keys(storage)) == 1
    inner.reads.clear()
    records, _ = Catalog(storage).records()
    assert [r.id for r in records] == [r.id for r in truth] + [h.manifests[-1].id]
    assert manifest_reads(inner) == []


def test_the_listing_is_the_truth_when_the_index_is_stale(tmp_path: Path) -> None:
    h = history(tmp_path)
    storage, inner = opened(tmp_path)
    Catalog(storage).records(refresh=True)
    gone, kept = h.manifests[0], h.manifests[1:]
    storage.purge(manifest_key(gone.id))
    late = make_manifest("20261120T020000Z-Flate")
    storage.put_bytes(manifest_key(late.id), late.to_json())  # not through commit: the index lacks it
    inner.reads.clear()
    records, problems = Catalog(storage).records(refresh=True)
    assert problems == [] and [r.id for r in records] == [m.id for m in kept] + [late.id]
    assert manifest_reads(inner) == [manifest_key(late.id)]
    inner.reads.clear()
    assert [r.id for r in Catalog(storage).records()[0]] == [r.id for r in records]
    assert manifest_reads(inner) == [] and len(index_keys(storage)) == 1


def test_a_damaged_index_is_ignored(tmp_path: Path) -> None:
    history(tmp_path)
    storage, inner = opened(tmp_path)
    truth = Catalog(storage).records(refresh=True)[0]
    key = index_keys(storage)[0]
    body = json.loads(storage.get_bytes(key))
    body["entries"][0]["record"]["size_bytes"] = 1
    write_object(str(tmp_path), key, json.dumps(body).encode())
    inner.reads.clear()
    assert Catalog(storage).records()[0] == truth
    assert len(manifest_reads(inner)) == len(truth)


def test_with_a_key_only_a_sealed_index_vouches_and_only_for_sealed_manifests(tmp_path: Path) -> None:
    repo = str(tmp_path)
    real = [make_manifest(f"2026112{d}T020000Z-Fabc{d}") for d in range(3)]
    sealed_repo(repo, *real)
    storage, inner = opened(tmp_path, KEY)
    truth = Catalog(storage).records(refresh=True)[0]
    assert [r.id for r in truth] == [m.id for m in real]
    genuine = index_keys(storage)[0]
    inner.reads.clear()
    assert Catalog(storage).records()[0] == truth and manifest_reads(inner) == []

    # the attacker plants a manifest and lists it in an index claiming it was verified
    planted = make_manifest("20261125T020000Z-Fevil")
    write_object(repo, manifest_key(planted.id), planted.to_json())
    keyless, _ = opened(tmp_path)
    forged_entry = IndexEntry.of(planted, "0" * 64, [KEY.key_id])
    forged_entry = IndexEntry(**{**forged_entry.__dict__, "key_id": KEY.key_id, "verified": True})
    body = json.loads(keyless.get_bytes(genuine))
    body["ids"].append(planted.id)
    body["entries"].append(forged_entry.to_dict())
    for seal in ("kept", "dropped"):
        if seal == "dropped":
            body.pop("seal")
        body["index_sha256"] = _digest(body)
        write_object(repo, f"{INDEX_PREFIX}index-29991231T235959999999Z-abcdef.json", json.dumps(body).encode())
        records, problems = Catalog(storage).records()
        assert records == truth, seal
        assert len(problems) == 1 and isinstance(problems[0], REFUSED) and planted.id in problems[0].message

    # a sealed index vouches only for entries whose seal its writer checked
    (tmp_path / f"{INDEX_PREFIX}index-29991231T235959999999Z-abcdef.json").unlink()
    write_index(storage, [m.id for m in real], [IndexEntry.of(m, "0" * 64, []) for m in real])
    inner.reads.clear()
    records, problems = Catalog(storage).records()
    assert records == truth and len(problems) == 1
    assert sorted(manifest_reads(inner)) == sorted([manifest_key(m.id) for m in real] + [manifest_key(planted.id)])


def test_an_edited_manifest_behind_a_sealed_index_is_still_refused_when_read(tmp_path: Path) -> None:
    repo = str(tmp_path)
    real = make_manifest()
    sealed_repo(repo, real)
    storage, _ = opened(tmp_path, KEY)
    Catalog(storage).records(refresh=True)
    body = json.loads((tmp_path / manifest_key(real.id)).read_bytes())
    body["tables"][0]["rows"] = 4
    write_object(repo, manifest_key(real.id), resealed(body))
    catalog = Catalog(storage)
    assert [r.id for r in catalog.records()[0]] == [real.id]  # planning sees what the key holder sealed
    with pytest.raises(IntegrityError, match="fails authentication"):
        catalog.load(real.id)


def test_an_index_of_the_previous_format_is_read_past(tmp_path: Path) -> None:
    """Format 1 summaries lack the audit's scope (host, system identifier, tool version): such
    an index is not believed, so the manifests answer (and a refresh writes a format 2 one)."""
    h = history(tmp_path)
    storage, inner = opened(tmp_path)
    Catalog(storage).records(refresh=True)
    [key] = index_keys(storage)
    body = json.loads((tmp_path / key).read_text())
    old = {**body, "format": 1, "entries": [
        {**e, "summary": {k: v for k, v in e["summary"].items() if k not in ("host", "system_identifier", "tool_version")}}
        for e in body["entries"]]}
    old["index_sha256"] = _digest(old)
    (tmp_path / key).write_text(json.dumps(old))
    inner.reads.clear()
    entries, _ = Catalog(storage).entries(refresh=True)
    assert [e.summary["system_identifier"] for e in entries] == ["7"] * len(h.manifests)
    assert len(manifest_reads(inner)) == len(h.manifests)
    [rewritten] = index_keys(storage)
    assert json.loads((tmp_path / rewritten).read_text())["format"] == 2


def test_latest_reads_only_the_manifest_the_index_chooses_and_falls_back_to_all_of_them(tmp_path: Path) -> None:
    """A restore of ``latest`` reads the index and the chosen manifest, not every manifest;
    when that manifest is not the one the index recorded (here damaged, so refused), every
    manifest is read and the choice is the one reading them all makes."""
    history(tmp_path)
    storage, inner = opened(tmp_path)
    ids = Catalog(storage).ids()
    assert len(ids) > LOAD_THREADS
    want = choose_latest(Catalog(storage).scan()[0], DatabaseHint())
    Catalog(storage).records(refresh=True)
    inner.reads.clear()
    assert Catalog(storage).resolve("latest") == want
    assert manifest_reads(inner) == [manifest_key(want.id)]

    body = json.loads((tmp_path / manifest_key(want.id)).read_bytes())
    body["tables"][0]["rows"] += 1
    write_object(str(tmp_path), manifest_key(want.id), json.dumps(body).encode())
    inner.reads.clear()
    chosen = Catalog(storage).resolve("latest")
    assert chosen == choose_latest(Catalog(storage).scan()[0], DatabaseHint()) and chosen.id != want.id
    assert sorted(set(manifest_reads(inner))) == sorted(manifest_key(i) for i in ids)


def test_a_backup_plans_from_the_index_and_its_commit_leaves_one_for_the_next(tmp_path: Path) -> None:
    """A backup reads the manifests only while no current index vouches for them; writing the
    index waits for its commit (a failed backup writes nothing), and the next backup then
    chooses its parent and checks key ids without reading a single manifest."""
    history(tmp_path)
    storage, inner = opened(tmp_path)
    catalog = Catalog(storage)
    truth = [m.id for m in Catalog(storage).scan()[0]]
    assert [e.id for e in catalog.current()] == truth and catalog.key_ids() == []
    assert index_keys(storage) == []
    nxt = make_manifest("20261120T020000Z-Fnext")
    catalog.commit(nxt)
    assert len(index_keys(storage)) == 1
    inner.reads.clear()
    later = Catalog(storage)
    assert [e.id for e in later.current()] == truth + [nxt.id] and later.key_ids() == []
    assert manifest_reads(inner) == []


def test_key_ids_of_the_backups_answer_with_and_without_the_key(tmp_path: Path) -> None:
    """What the write guard asks when no key marker answers: the key ids the backups were
    written with, from the manifests or, once there is one, from the index."""
    sealed_repo(str(tmp_path), make_manifest("20261120T020000Z-Fone"))
    keyed, _ = opened(tmp_path, KEY)
    assert Catalog(keyed).key_ids() == [KEY.key_id]
    Catalog(keyed).records(refresh=True)
    plain, inner = opened(tmp_path)
    assert Catalog(plain).key_ids() == [KEY.key_id] and manifest_reads(inner) == []


def test_the_same_listing_asked_again_is_answered_without_reading_the_index_again(tmp_path: Path) -> None:
    """A backup reads the catalog before and after taking its lock: when the manifests'
    listing has not changed, the second answer is the first, without the index's GET; a
    backup committed in between changes the listing, and the catalog is read afresh."""
    h = history(tmp_path)
    storage, inner = opened(tmp_path)
    Catalog(storage).records(refresh=True)
    catalog = Catalog(storage)
    first = catalog.entries()
    inner.reads.clear()
    assert catalog.entries() == first and inner.reads == []

    h.full(ts("2026-11-06T02:00Z"))
    entries, _ = catalog.entries()
    assert [e.id for e in entries] == [e.id for e in first[0]] + [h.manifests[-1].id]
    assert any(k.startswith(INDEX_PREFIX) for k in inner.reads)


class ListCountingStorage(CountingStorage):
    """A counting repository that also remembers which prefixes were listed."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.listed: list[str] = []

    def list(self, prefix: str = "") -> Iterator[Any]:
        self.listed.append(prefix)
        return super().list(prefix)


def test_a_commit_reads_the_index_again_only_when_another_has_replaced_it(tmp_path: Path) -> None:
    """A backup reads the index when it plans (``entries``) and, at commit, added itself to
    it after reading it again: a second LIST and GET of the same object, written once under
    its name. Now the commit lists the index keys once and reads the index only when its
    newest key is not the one read before; an index another writer put in between is read
    and extended, never overwritten with the stale one."""
    inner, storage, catalog, before = planned(tmp_path, ListCountingStorage)
    inner.reads.clear()
    inner.listed.clear()
    first = make_manifest("20261120T020000Z-Fone")
    catalog.commit(first)
    assert [k for k in inner.reads if k.startswith(INDEX_PREFIX)] == []
    assert inner.listed.count(INDEX_PREFIX) == 1
    assert [e.id for e in Catalog(storage).entries()[0]] == [*before, first.id]

    stale = Catalog(storage)
    stale.entries()
    other = make_manifest("20261121T020000Z-Fother")
    Catalog(storage).commit(other)  # another writer replaces the index after `stale` read it
    inner.reads.clear()
    late = make_manifest("20261122T020000Z-Flate")
    stale.commit(late)
    assert [k for k in inner.reads if k.startswith(INDEX_PREFIX)] != []
    [key] = index_keys(storage)
    body = json.loads(storage.get_bytes(key))
    assert {first.id, other.id, late.id} <= set(body["ids"])
    inner.reads.clear()
    assert [e.id for e in Catalog(storage).entries()[0]] == [*before, first.id, other.id, late.id]
    assert manifest_reads(inner) == []


class OverlapStorage(LocalStorage):
    """A local repository whose commit requests each wait (briefly) for the one a concurrent
    commit would have under way: the manifest's write for the index listing, the new index's
    write for the backup's ``published`` step. What each found is recorded."""

    WAIT = 10.0

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.index_listed = threading.Event()
        self.published = threading.Event()
        self.found: dict[str, bool] = {}
        self.order: list[str] = []
        self.armed = False

    def list(self, prefix: str = "") -> Iterator[Any]:
        if prefix == INDEX_PREFIX:
            self.index_listed.set()
        return super().list(prefix)

    def put(self, key: str, chunks: Any) -> Any:
        if not self.armed:
            pass
        elif key.startswith("manifests/"):
            self.found["index listed while the manifest is written"] = self.index_listed.wait(self.WAIT)
        elif key.startswith(INDEX_PREFIX):
            self.found["published while the index is written"] = self.published.wait(self.WAIT)
        self.order.append(key)
        return super().put(key, chunks)


def test_a_commit_lists_the_index_while_writing_the_manifest_and_updates_it_while_publishing(
        tmp_path: Path) -> None:
    """The commit's requests after the manifest are a cache's and a clean-up's: the index
    keys are listed while the manifest is written, and the new index is written while the
    caller's ``published`` step (a backup's running marker removal) runs, which starts only
    once the manifest is stored. Before, all went one after the other: five round trips
    where three now follow each other. The index still ends up holding every backup."""
    inner, storage, catalog, before = planned(tmp_path, OverlapStorage)
    inner.index_listed.clear()
    inner.armed = True
    manifest = make_manifest("20261120T020000Z-Fone")
    seen_stored: list[bool] = []

    def published() -> None:
        seen_stored.append(manifest_key(manifest.id) in inner.order)
        inner.published.set()

    catalog.commit(manifest, published=published)
    assert inner.found == {"index listed while the manifest is written": True,
                           "published while the index is written": True}
    assert seen_stored == [True], "published only once the manifest is stored"
    assert [e.id for e in Catalog(storage).entries()[0]] == [*before, manifest.id]
    assert len(index_keys(storage)) == 1
