"""How a parallel post-data replay is split into pg_restore passes (pure planning).

Attachments of partition indexes run alone, one after another, between what they need and
what needs them; the replay itself is exercised in tests/postgres/test_post_data_progress.py
and end to end in tests/logical/test_partitioned_indexes.py."""

from __future__ import annotations

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
