"""What a logical backup restored into a newer PostgreSQL major may differ in, by name.

A restore into a newer major is an upgrade: the new server expresses some of the same
objects differently. Validation stays strict by translating what the backup recorded into
what the target major makes of it, and only for differences the major change provably
causes, each one named here:

- ``schema_rendered_by_target``: the schema text (view and rule bodies, defaults, the lines
  pg_dump writes) is deparsed by the server and printed by pg_dump, both of the target's
  major. The backup's schema archive is therefore replayed into a scratch database on the
  target and dumped there; the live schema must equal that rendering exactly.
- ``maintain_in_all`` (target 17 or newer, backup older): PostgreSQL 17 added the MAINTAIN
  privilege to ``ALL`` on tables, views, materialized views and foreign tables. A grantee
  that held every table privilege of the older major (SELECT, INSERT, UPDATE, DELETE,
  TRUNCATE, REFERENCES, TRIGGER: what pg_dump writes as ``GRANT ALL``) from a grantor is
  expected to hold MAINTAIN from that grantor too, with the same grant option, on the
  object and in ``ALTER DEFAULT PRIVILEGES ... ON TABLES``. Nothing else is added: a MAINTAIN
  beside fewer privileges, or a lost privilege, still fails.

Guaranteed: :func:`expected_inventory` is pure, never removes anything the backup recorded,
and returns the backup's inventory unchanged when the target is not newer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backup_tool.repository.manifest import ManifestInventory

MAINTAIN_SINCE = 17
PRE_17_TABLE_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"})
RELATION_KINDS = ("table ", "view ", "materialized view ", "foreign table ")


@dataclass(frozen=True)
class Tolerance:
    """One named difference a major change causes, and how many items it covered."""

    name: str
    count: int

    def describe(self) -> str:
        return f"{self.name} ({self.count})"


def is_upgrade(backup_major: int, target_major: int) -> bool:
    return target_major > backup_major


def _with_maintain(acl: list[list[Any]]) -> tuple[list[list[Any]], int]:
    """The ACL with MAINTAIN added for every (grantee, grantor, grant option) holding all
    the pre-17 table privileges; and how many were added."""
    held: dict[tuple[Any, Any, Any], set[str]] = {}
    for grantee, grantor, privilege, grantable in acl:
        held.setdefault((grantee, grantor, grantable), set()).add(str(privilege))
    have = {tuple(e) for e in acl}
    added = [[g, by, "MAINTAIN", opt] for (g, by, opt), privs in sorted(held.items(), key=repr)
             if PRE_17_TABLE_PRIVILEGES <= privs and (g, by, "MAINTAIN", opt) not in have]
    return sorted(acl + added, key=repr) if added else acl, len(added)


def _relation_acl(key: str, item: dict[str, Any]) -> bool:
    name = str(item.get("object", ""))
    if key == "object_privileges":
        return name.startswith(RELATION_KINDS)
    return key == "default_privileges" and name.endswith(" on tables")


def expected_inventory(inventory: ManifestInventory, backup_major: int,
                       target_major: int) -> tuple[ManifestInventory, tuple[Tolerance, ...]]:
    """The backup's inventory as the target major expresses it, and the tolerances applied."""
    if not (is_upgrade(backup_major, target_major) and backup_major < MAINTAIN_SINCE <= target_major):
        return inventory, ()
    result = inventory.copy()
    added = 0
    for key in ("object_privileges", "default_privileges"):
        if key not in inventory:
            continue
        items = []
        for item in inventory[key]:
            if _relation_acl(key, item):
                acl, n = _with_maintain([list(e) for e in item["acl"]])
                added += n
                item = {**item, "acl": acl}
            items.append(item)
        result[key] = items
    return result, ((Tolerance("maintain_in_all", added),) if added else ())
