"""Manifest model: round trip, self-checksum, format guard, hostile input."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.manifests import make_manifest

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import BackupToolError, IntegrityError
from backup_tool.repository.manifest import (
    CHECKSUM_METHOD_FORMAT,
    CHECKSUM_METHOD_FORMATS,
    FORMAT_VERSION,
    SPLIT_TABLE_FORMAT,
    TYPED_COLUMN_FORMAT,
    Manifest,
    StoredObject,
    TableEntry,
    parse_manifest,
)
from backup_tool.repository.records import BackupRecord


def test_round_trip_preserves_every_field() -> None:
    m = make_manifest()
    assert parse_manifest(m.to_json(), "x") == m


def test_size_counts_only_own_objects() -> None:
    parent_obj = StoredObject("backups/OLD/data/1.copy.zst", 1000, "e" * 64, 5000)
    m = make_manifest(tables=(TableEntry("public", "t", "r", None, ("a",), 1, "1" * 16, parent_obj),),
                      parent_id="OLD", kind="incremental")
    assert m.size_bytes == 5 + 4
    assert parent_obj in m.objects()


def test_summary_has_contract_fields() -> None:
    s = make_manifest().summary()
    for key in ("id", "kind", "parent_id", "started_at", "finished_at", "database", "size_bytes", "expires_at"):
        assert key in s
    assert s["started_at"] == "2026-11-25T02:00:00Z"


def test_edited_manifest_fails_its_checksum() -> None:
    body = json.loads(make_manifest().to_json())
    body["tables"][0]["rows"] = 4
    with pytest.raises(IntegrityError, match="checksum"):
        parse_manifest(json.dumps(body).encode(), "x")


def test_newer_format_is_refused_clearly() -> None:
    body = json.loads(make_manifest().to_json())
    body["format"] = FORMAT_VERSION + 1
    with pytest.raises(BackupToolError, match="newer backup-tool"):
        parse_manifest(json.dumps(body).encode(), "x")


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"\xff\xfe", b"null", b'{"format": "1"}'])
def test_garbage_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse_manifest(raw, "x")


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(schema=names, table=names, columns=st.lists(names, min_size=1, max_size=5), rows=st.integers(0, 2**62))
def test_any_identifier_round_trips(schema: str, table: str, columns: list[str], rows: int) -> None:
    entry = TableEntry(schema, table, "r", None, tuple(columns), rows, "f" * 16,
                       StoredObject("backups/X/data/1.copy.zst", 1, "a" * 64, 1))
    m = make_manifest(tables=(entry,))
    assert parse_manifest(m.to_json(), "x") == m


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(raw: bytes) -> None:
    try:
        parse_manifest(raw, "x")
    except BackupToolError:
        pass


def test_replace_keeps_frozen_semantics() -> None:
    m = make_manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.id = "y"  # type: ignore[misc]
    assert replace(m, id="y").id == "y"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def resealed(body: dict) -> bytes:
    """The body with a correct self-checksum, so parsing goes past the checksum to the fields."""
    from backup_tool.repository.manifest import _digest

    body = dict(body)
    body["manifest_sha256"] = _digest(body)
    return json.dumps(body).encode()


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(sorted(json.loads(make_manifest().to_json()))), value=json_values,
       drop=st.booleans())
def test_any_field_of_any_type_is_parsed_or_refused_cleanly(field: str, value: object, drop: bool) -> None:
    """A manifest with one field missing or of any JSON type either parses into one that the
    rest of the tool can use, or raises the tool's own error (exit 1 or 3): never a crash."""
    body = json.loads(make_manifest().to_json())
    if drop:
        body.pop(field)
    else:
        body[field] = value
    try:
        m = parse_manifest(resealed(body), "x")
    except BackupToolError:
        return
    m.summary(), m.objects(), m.own_objects(), m.to_json()


@settings(max_examples=100, deadline=None)
@given(table_field=st.sampled_from(["schema", "name", "relkind", "parent", "columns", "rows", "checksum", "object", "parts"]),
       value=json_values)
def test_any_table_field_of_any_type_is_parsed_or_refused_cleanly(table_field: str, value: object) -> None:
    body = json.loads(make_manifest().to_json())
    body["tables"][0][table_field] = value
    try:
        m = parse_manifest(resealed(body), "x")
    except BackupToolError:
        return
    m.summary(), m.objects(), m.own_objects(), m.to_json()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_arbitrary_json_objects_are_refused_cleanly(body: dict) -> None:
    for raw in (json.dumps(body).encode(), resealed({**body, "format": 1})):
        try:
            parse_manifest(raw, "x")
        except BackupToolError:
            pass


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["database", "kind", "parent_id", "expires_at", "schema_fingerprint", "options"]),
       value=json_values)
def test_sealed_manifests_detect_any_edit_by_someone_without_the_key(field: str, value: object) -> None:
    from backup_tool.repository.manifest import manifest_seal
    from backup_tool.repository.storage.encrypted import EncryptionKey

    key = EncryptionKey(bytes(range(32)))
    raw = make_manifest().to_json(key.seal)
    digest, mac = manifest_seal(raw)
    assert mac is not None and key.check_seal(digest, mac)
    body = json.loads(raw)
    if body.get(field) == value:
        return
    body[field] = value
    edited = resealed(body)
    digest, mac = manifest_seal(edited)
    assert mac is not None and not key.check_seal(digest, mac)


def test_sealing_keeps_the_round_trip_and_older_readers_see_a_newer_format() -> None:
    from backup_tool.repository.storage.encrypted import EncryptionKey

    key = EncryptionKey(bytes(range(32)))
    m = replace(make_manifest(), options={"encryption": key.describe()}, format=2)
    assert parse_manifest(m.to_json(key.seal), "x") == m
    assert json.loads(make_manifest().to_json())["format"] == 1, "unencrypted backups stay readable by format-1 tools"


def split_manifest() -> Manifest:
    prefix = "backups/20261125T020000Z-Fabcd/data/"
    parts = tuple(StoredObject(f"{prefix}7.{i}.copy.zst", 10 + i, f"{i}" * 64, 100 + i) for i in range(3))
    big = TableEntry("public", "big", "r", None, ("id", "note"), 30, "0123456789abcdef", None, parts)
    return replace(make_manifest(tables=(*make_manifest().tables, big)), format=SPLIT_TABLE_FORMAT)


def test_a_split_table_round_trips_and_its_parts_are_objects_of_the_backup() -> None:
    m = split_manifest()
    parsed = parse_manifest(m.to_json(), "x")
    assert parsed == m
    big = parsed.table("public", "big")
    assert big is not None and big.object is None and big.stored == big.parts and len(big.parts) == 3
    assert big.raw_size == 100 + 101 + 102
    assert set(big.parts) <= set(parsed.objects()) and set(big.parts) <= set(parsed.own_objects())
    assert parsed.size_bytes == make_manifest().size_bytes + 10 + 11 + 12


def test_a_manifest_without_split_tables_keeps_its_old_format_and_shape() -> None:
    """Older tools read it: no ``parts`` key on any table, format 1."""
    body = json.loads(make_manifest().to_json())
    assert body["format"] == 1 and all("parts" not in t for t in body["tables"])


def test_an_older_tool_refuses_a_manifest_with_a_split_table() -> None:
    """A reader of format 3 (the version before parts) refuses it instead of restoring the
    table empty; and parts in a manifest claiming an older format are refused as damage."""
    body = json.loads(split_manifest().to_json())
    assert body["format"] == SPLIT_TABLE_FORMAT > 3
    body["format"] = 3
    with pytest.raises(IntegrityError, match="split into parts"):
        parse_manifest(resealed(body), "x")


@pytest.mark.parametrize("edit", ["object and parts", "one part"])
def test_a_split_table_must_have_parts_only(edit: str) -> None:
    body = json.loads(split_manifest().to_json())
    big = body["tables"][-1]
    if edit == "one part":
        big["parts"] = big["parts"][:1]
    else:
        big["object"] = big["parts"][0]
    with pytest.raises(IntegrityError, match="malformed"):
        parse_manifest(resealed(body), "x")


def test_an_incremental_referencing_a_split_table_needs_its_parent_for_retention() -> None:
    """Parts are objects of the backup that wrote them: an incremental reusing them keeps
    that backup alive (retention and the garbage sweep go by these dependencies)."""
    parent = split_manifest()
    big = parent.table("public", "big")
    assert big is not None
    child_id = "20261125T080000Z-Iabcd"
    child = replace(make_manifest(child_id, tables=(big,), parent_id=None, kind="incremental"),
                    format=SPLIT_TABLE_FORMAT)
    record = BackupRecord.from_manifest(child)
    assert parent.id in record.needs
    assert record.objects == 2 and child.size_bytes == 9, "the parent's parts are not the child's own"


def typed_manifest() -> Manifest:
    return replace(make_manifest(), checksum_method=ChecksumMethod.TYPED_ROW, format=CHECKSUM_METHOD_FORMAT)


def test_a_manifest_without_a_checksum_method_used_row_text_and_keeps_its_shape() -> None:
    body = json.loads(make_manifest().to_json())
    assert "checksum_method" not in body and body["format"] == 1
    assert parse_manifest(make_manifest().to_json(), "x").checksum_method is ChecksumMethod.ROW_TEXT


def test_the_checksum_method_round_trips_and_older_tools_refuse_it() -> None:
    """A reader before format 5 would validate typed-row checksums by row text and fail every
    table: it refuses the manifest instead; the method in a manifest claiming an older format
    is refused as damage, and an unknown method as malformed."""
    m = typed_manifest()
    body = json.loads(m.to_json())
    assert body["checksum_method"] == "typed-row" and body["format"] == CHECKSUM_METHOD_FORMAT
    assert parse_manifest(m.to_json(), "x") == m
    body["format"] = SPLIT_TABLE_FORMAT
    with pytest.raises(IntegrityError, match="checksum method typed-row in a format 4"):
        parse_manifest(resealed(body), "x")
    body["format"], body["checksum_method"] = CHECKSUM_METHOD_FORMAT, "sha3-rows"
    with pytest.raises(IntegrityError, match="malformed"):
        parse_manifest(resealed(body), "x")


def test_typed_column_needs_format_6_which_format_5_readers_refuse() -> None:
    """A format 5 reader knows row-text and typed-row only: typed-column is written as format 6
    (which it refuses as newer), and a typed-column manifest claiming format 5 is damage."""
    m = replace(make_manifest(), checksum_method=ChecksumMethod.TYPED_COLUMN, format=TYPED_COLUMN_FORMAT)
    body = json.loads(m.to_json())
    assert body["checksum_method"] == "typed-column" and body["format"] == TYPED_COLUMN_FORMAT == FORMAT_VERSION
    assert parse_manifest(m.to_json(), "x") == m
    assert {CHECKSUM_METHOD_FORMATS[method] for method in ChecksumMethod} == {1, CHECKSUM_METHOD_FORMAT,
                                                                               TYPED_COLUMN_FORMAT}
    body["format"] = CHECKSUM_METHOD_FORMAT
    with pytest.raises(IntegrityError, match="checksum method typed-column in a format 5"):
        parse_manifest(resealed(body), "x")
