"""How a parallel post-data replay is split into pg_restore passes (pure planning).

Attachments of partition indexes run alone, one after another, between what they need and
what needs them; the replay itself is exercised in tests/postgres/test_post_data_progress.py
and end to end in tests/logical/test_partitioned_indexes.py."""

from __future__ import annotations

import pytest

from backup_tool.postgres import schema
from backup_tool.postgres.schema import ReplayPass, Section, TocEntry

POST = Section.POST_DATA


def _e(dump_id: int, desc: str, tag: str, deps: tuple[int, ...] = (), section: Section = POST) -> TocEntry:
    return TocEntry(dump_id, section, desc, "public", tag, deps)


# tp (a, b) partitioned by a into tp_1, itself partitioned by b into tp_1_1; ref -> tp.
TOC = [
    _e(1, "TABLE", "tp", section=Section.PRE_DATA),
    _e(2, "TABLE", "tp_1", (1,), Section.PRE_DATA),
    _e(3, "TABLE", "tp_1_1", (2,), Section.PRE_DATA),
    _e(4, "TABLE", "ref", section=Section.PRE_DATA),
    _e(10, "CONSTRAINT", "tp tp_pkey", (1,)),
    _e(11, "CONSTRAINT", "tp_1 tp_1_pkey", (2,)),
    _e(12, "CONSTRAINT", "tp_1_1 tp_1_1_pkey", (3,)),
    _e(13, "INDEX", "ref_a", (4,)),
    _e(14, "INDEX ATTACH", "tp_1_pkey", (11, 10, 2, 1)),
    _e(15, "INDEX ATTACH", "tp_1_1_pkey", (12, 11, 3, 2)),
    _e(16, "FK CONSTRAINT", "ref ref_a_b_fkey", (4, 10, 14, 15)),
    _e(17, "COMMENT", "CONSTRAINT ref_a_b_fkey ON ref", (16,), Section.NONE),
    _e(18, "COMMENT", "INDEX ref_a", (13,), Section.NONE),
    _e(19, "TRIGGER", "ref ref_audit", (4,)),
    _e(20, "EVENT TRIGGER", "ddl_log"),
    _e(21, "COMMENT", "EVENT TRIGGER ddl_log", (20,), Section.NONE),
]
SECTION = {e.dump_id for e in TOC if e.section != Section.PRE_DATA}


def test_attachments_run_alone_between_what_they_need_and_what_needs_them() -> None:
    assert schema.post_data_passes(TOC, SECTION) == [
        ReplayPass((10, 11, 12, 13, 18, 19), True),
        ReplayPass((14, 15), False),
        ReplayPass((16, 17, 20, 21), True),
    ]


def test_without_attachments_one_parallel_pass_as_archived() -> None:
    toc = [e for e in TOC if e.dump_id not in (14, 15)]
    section = {e.dump_id for e in toc if e.section != Section.PRE_DATA}
    assert schema.post_data_passes(toc, section) == [ReplayPass((10, 11, 12, 13, 16, 17, 18, 19, 20, 21), True)]


def test_an_attachment_that_would_have_to_wait_for_the_last_pass_keeps_one_pass() -> None:
    toc = [*TOC, _e(22, "ACL", "INDEX tp_1_1_pkey", (12,), Section.NONE), _e(23, "INDEX ATTACH", "x", (22,))]
    section = SECTION | {22, 23}
    assert schema.post_data_passes(toc, section) == [ReplayPass(tuple(sorted(section)), True)]


def _archive(minor: int, entries: list[tuple[int, str, str, int, tuple[int, ...]]]) -> bytes:
    """A custom-format archive header and table of contents as pg_dump 17 writes them (format
    1.``minor``, 4-byte ints, 8-byte offsets), entries without data."""
    def num(v: int) -> bytes:
        return bytes([v < 0]) + abs(v).to_bytes(4, "little")

    def text(s: str | None) -> bytes:
        return num(-1) if s is None else num(len(s.encode())) + s.encode()

    out = b"PGDMP" + bytes([1, minor, 0, 4, 8, 1]) + b"\x00"
    out += b"".join(num(0) for _ in range(7)) + text("db") + text("17.6") + text("17.6") + num(len(entries))
    for dump_id, desc, tag, section, deps in entries:
        out += num(dump_id) + num(0) + text("0") + text("0") + text(tag) + text(desc) + num(section)
        out += text("-- sql") + text("") + text("") + text("public") + text("") + text("") + num(ord("i"))
        out += text("postgres") + text("false") + b"".join(text(str(d)) for d in deps) + text(None)
        out += b"\x03" + bytes(8)
    return out


def test_pg_dump_17_archives_are_read() -> None:
    archive = _archive(16, [(7, "INDEX", "tp_1_1_b_idx", 4, ()), (9, "INDEX ATTACH", "tp_1_1_b_idx", 4, (7, 3))])
    assert schema.read_toc(archive) == [
        TocEntry(7, POST, "INDEX", "public", "tp_1_1_b_idx", (), owner="postgres"),
        TocEntry(9, POST, "INDEX ATTACH", "public", "tp_1_1_b_idx", (7, 3), owner="postgres")]
    with pytest.raises(schema.UnreadableToc):
        schema.read_toc(archive[:-20])
    with pytest.raises(schema.UnreadableToc):
        schema.read_toc(_archive(17, []))
