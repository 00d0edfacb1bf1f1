"""Which objects a table restore reads ahead (logical/selection.py): the ones it needs
first, in that order, within the budget."""

from __future__ import annotations

from support.manifests import make_manifest

from backup_tool.logical.selection import ahead_objects, resolve_tables
from backup_tool.repository.manifest import StoredObject, TableEntry


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
