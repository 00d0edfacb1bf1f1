"""How an incremental's sessions read and write text: as its parent was written, so that every
backup of a chain reads alike (an incremental on a backup from before a pin must not write its
checksums and money under settings its parent's tables were not read under)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from backup_tool.logical.backup import _written_as
from backup_tool.postgres.connection import NAME_SEARCH_PATH, RECORDED_PINS, ConnInfo
from backup_tool.repository.manifest import Manifest

DSN = "host=h dbname=d options='-c work_mem=8MB'"


def _parent(options: dict[str, Any]) -> Manifest:
    return cast(Manifest, SimpleNamespace(options=options))


def test_a_full_backup_pins_everything_and_writes_names_under_public() -> None:
    opened = ConnInfo(DSN).with_search_path(NAME_SEARCH_PATH)
    assert _written_as(opened, DSN, None) is opened
    assert opened.unpinned == frozenset()
    assert f"-c search_path={NAME_SEARCH_PATH}" in opened.tool_env()["PGOPTIONS"]


def test_an_incremental_on_a_backup_that_recorded_nothing_leaves_the_settings_to_the_database() -> None:
    opened = ConnInfo(DSN).with_search_path(NAME_SEARCH_PATH)
    old = _written_as(opened, DSN, _parent({}))
    assert old.unpinned == frozenset(RECORDED_PINS)
    env = old.tool_env()["PGOPTIONS"]
    assert "search_path" not in env and "lc_monetary" not in env and "-c work_mem=8MB" in env


def test_an_incremental_on_a_pinned_backup_writes_as_it() -> None:
    opened = ConnInfo(DSN).with_search_path(NAME_SEARCH_PATH)
    new = _written_as(opened, DSN, _parent({"pinned": list(RECORDED_PINS), "search_path": NAME_SEARCH_PATH}))
    assert (new.unpinned, new.params.get("options")) == (opened.unpinned, opened.params.get("options"))
