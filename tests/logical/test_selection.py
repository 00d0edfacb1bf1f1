"""Which objects a table restore reads ahead (logical/selection.py): the ones it needs
first, in that order, within the budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from support.manifests import make_manifest

from backup_tool.errors import NotFoundError
from backup_tool.logical.selection import ahead_objects, read_ahead, resolve_tables
from backup_tool.repository.catalog import DatabaseHint, manifest_key
from backup_tool.repository.manifest import StoredObject, TableEntry
from backup_tool.repository.storage.local import LocalStorage


def table(name: str, size: int | None) -> TableEntry:
    stored = StoredObject(f"backups/b/data/{name}.copy.zst", size, "a" * 64, size * 3) if size is not None else None
    return TableEntry("public", name, "r", None, ("id",), 1, "0" * 16, stored)


def test_schema_then_roles_when_asked_then_the_first_tables_data() -> None:
    manifest = make_manifest(tables=(table("a", 10), table("empty", None), table("b", 20), table("c", 30)))
    entries = resolve_tables(manifest, ["public.a", "public.empty", "public.b", "public.c"])
    keys = [o.key for o in ahead_objects(manifest, entries, 2, with_roles=False)]
    assert keys == [manifest.schema.key, "backups/b/data/a.copy.zst", "backups/b/data/b.copy.zst"]
    with_roles = [o.key for o in ahead_objects(manifest, entries, 1, with_roles=True)]
    assert with_roles == [manifest.schema.key, manifest.globals.key, "backups/b/data/a.copy.zst"]


def test_data_stops_at_the_budget() -> None:
    manifest = make_manifest(tables=(table("a", 10), table("b", 20), table("c", 5)))
    entries = resolve_tables(manifest, ["public.a", "public.b", "public.c"])
    keys = [o.key for o in ahead_objects(manifest, entries, 3, with_roles=False, budget=25)]
    assert keys == [manifest.schema.key, "backups/b/data/a.copy.zst"]
    assert [o.key for o in ahead_objects(manifest, entries, 3, False, budget=5)] == [manifest.schema.key]


class TimedStore(LocalStorage):
    """A local repository noting when each object's download starts and ends; ``slow`` keys
    take 0.2 s to arrive, as a download beside another can."""

    def __init__(self, root: Path, slow: set[str]) -> None:
        super().__init__(str(root))
        self.slow = slow
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _note(self, event: str, key: str) -> None:
        with self._lock:
            self.events.append((event, key))

    def get_stored(self, key: str) -> Iterator[bytes]:
        self._note("start", key)
        if key in self.slow:
            time.sleep(0.2)
        yield from super().get_stored(key)
        self._note("end", key)


def test_the_definitions_are_read_whole_before_the_data(tmp_path: Path) -> None:
    """The restore needs the schema archive (and the roles) before any data: the data's
    download starts only once they are in, so it does not slow them down."""
    manifest = make_manifest(tables=(table("a", 10), table("b", 20)))
    store = TimedStore(tmp_path, slow={manifest.schema.key, manifest.globals.key})
    store.put_bytes(manifest_key(manifest.id), manifest.to_json())
    for obj in (manifest.schema, manifest.globals, *(o for t in manifest.tables for o in t.stored)):
        store.put_bytes(obj.key, b"x" * obj.size)
    planned: list[list[str]] = []
    read_ahead(store, ["public.a", "public.b"], None, DatabaseHint(None, None), 2, True, planned.append)
    gets = [e for e in store.events if e[1].startswith("backups/")]
    definitions = {manifest.schema.key, manifest.globals.key}
    assert planned == [[manifest.schema.key, manifest.globals.key, "backups/b/data/a.copy.zst",
                        "backups/b/data/b.copy.zst"]]
    last_definition_end = max(i for i, (event, key) in enumerate(gets) if event == "end" and key in definitions)
    first_data_start = min(i for i, (event, key) in enumerate(gets) if event == "start" and key not in definitions)
    assert last_definition_end < first_data_start
    assert sorted(key for event, key in gets if event == "end") == sorted(planned[0])


def test_an_extension_configuration_table_is_named_as_such_not_as_missing_from_the_backup() -> None:
    """pgagent's jobs are in ``pgagent.pga_job``, a configuration table: its rows are in the
    backup (restored by ``restore full``), so saying the table is not in the backup misled."""
    manifest = make_manifest()
    manifest.inventory["extension_config"] = [
        {"extension": "pgagent", "schema": "pgagent", "name": "pga_job", "kind": "table", "condition": "",
         "rows": 20, "checksum": "0" * 16}]
    for name in ("pgagent.pga_job", "pga_job"):
        with pytest.raises(NotFoundError, match="configuration table of extension pgagent.*holds its rows "
                                                "[(]20[)], which only 'restore full' restores"):
            resolve_tables(manifest, [name])
    with pytest.raises(NotFoundError, match="is not in backup"):
        resolve_tables(manifest, ["other.pga_job"])
