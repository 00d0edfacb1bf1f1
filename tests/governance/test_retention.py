"""Retention: the pure decision (each safety rule, and hypothesis properties over arbitrary
histories and --now), WAL expiry, the garbage sweep, and apply/dry-run against a local
repository holding simulated history."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from simhistory import History, record, seed_schedule, ts

from backup_tool.config.policy import Policy, Retention
from backup_tool.config.settings import Settings
from backup_tool.core.walnames import segment_name
from backup_tool.governance.retention import BackupRecord, plan_garbage, plan_retention, plan_wal
from backup_tool.jobs.expire import apply_retention, check_object_lock
from backup_tool.repository import walarchive
from backup_tool.repository.retention_log import read_log
from backup_tool.repository.storage import ObjectInfo, open_storage
from backup_tool.repository.storage.base import ObjectLock, PartialUpload

UTC = timezone.utc
P = Policy()


def decision(plan: Any, b: BackupRecord) -> Any:
    return plan.decision(b.id)


# ----------------------------------------------------------------------------- rules


def test_expiry_per_kind() -> None:
    old_full = record("full", "2026-10-01T02:00Z")
    new_full = record("full", "2026-11-20T02:00Z")
    old_incr = record("incremental", "2026-11-10T06:00Z", parent=new_full.id)  # parent id is irrelevant here
    fresh_incr = record("incremental", "2026-11-20T06:00Z", parent=new_full.id)
    plan = plan_retention([old_full, new_full, old_incr, fresh_incr], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == [old_full.id, old_incr.id]
    assert "full retention 30 days" in decision(plan, old_full).reasons[0]
    assert "incremental retention 7 days" in decision(plan, old_incr).reasons[0]
    assert decision(plan, new_full).reasons[0].startswith("retained until 2026-12-20")


def test_never_deletes_the_newest_full() -> None:
    only = record("full", "2026-01-01T02:00Z")
    plan = plan_retention([only], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == [] and decision(plan, only).reasons == ("newest full",)


def test_min_fulls() -> None:
    policy = replace(P, retention=replace(P.retention, min_fulls=3))
    fulls = [record("full", f"2026-0{m}-01T02:00Z") for m in range(1, 6)]
    plan = plan_retention(fulls, policy, ts("2026-11-25T00:00Z"))
    assert plan.deleted == [f.id for f in fulls[:2]]
    assert "one of the 3 newest fulls" in decision(plan, fulls[2]).reasons[0]


def test_newest_full_per_database() -> None:
    a = record("full", "2026-01-01T02:00Z", database="a")
    b_old = record("full", "2026-01-01T02:00Z", database="b")
    b_new = record("full", "2026-01-02T02:00Z", database="b")
    plan = plan_retention([a, b_old, b_new], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == [b_old.id]


def test_parent_chain_of_a_retained_incremental_is_kept() -> None:
    full = record("full", "2026-10-01T02:00Z")
    newer_full = record("full", "2026-11-24T02:00Z")
    i1 = record("incremental", "2026-10-01T06:00Z", parent=full.id, expires_days=60)
    i2 = record("incremental", "2026-10-01T12:00Z", parent=i1.id, expires_days=1)
    i3 = record("incremental", "2026-10-01T18:00Z", parent=i2.id, expires_days=90)
    plan = plan_retention([full, i1, i2, i3, newer_full], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == []
    assert any(f"needed by retained {i3.id}" in r for r in decision(plan, i2).reasons)
    assert any(f"needed by retained {i1.id}" in r for r in decision(plan, full).reasons)


def test_objects_referenced_from_another_backup_keep_it() -> None:
    full = record("full", "2026-10-01T02:00Z")
    newer = record("full", "2026-11-24T02:00Z", needs=frozenset({full.id}))
    plan = plan_retention([full, newer], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == [] and f"needed by retained {newer.id}" in decision(plan, full).reasons[-1]


def test_head_of_the_newest_chain_is_kept() -> None:
    full = record("full", "2026-11-01T02:00Z")
    incr = record("incremental", "2026-11-01T06:00Z", parent=full.id)
    plan = plan_retention([full, incr], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == []
    assert decision(plan, incr).reasons[0].startswith("newest backup")


def test_locked_backup_is_kept_with_its_parent() -> None:
    full = record("full", "2026-09-01T02:00Z")
    incr = record("incremental", "2026-09-01T06:00Z", parent=full.id,
                  lock_mode="compliance", lock_until=ts("2026-12-31T00:00Z"))
    newest = record("full", "2026-11-24T02:00Z")
    plan = plan_retention([full, incr, newest], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == []
    assert decision(plan, incr).reasons[0] == "Object Lock (compliance) until 2026-12-31T00:00:00Z"
    assert plan_retention([full, incr, newest], P, ts("2027-01-01T00:00Z")).deleted == [full.id, incr.id]


def test_hard_lock_from_storage_keeps_regardless_of_now() -> None:
    full = record("full", "2026-09-01T02:00Z")
    newest = record("full", "2026-11-24T02:00Z")
    lock = ObjectLock("governance", ts("2026-12-01T00:00Z"))
    plan = plan_retention([full, newest], P, ts("2027-06-01T00:00Z"), hard_locks={full.id: lock})
    assert full.id in plan.kept
    assert "storage refuses" in decision(plan, full).reasons[0]


def test_policy_edit_lengthens_but_never_shortens() -> None:
    full = record("full", "2026-10-01T02:00Z", expires_days=30)
    newest = record("full", "2026-11-24T02:00Z")
    now = ts("2026-11-25T00:00Z")
    longer = replace(P, retention=replace(P.retention, full_days=90))
    shorter = replace(P, retention=replace(P.retention, full_days=1))
    assert plan_retention([full, newest], longer, now).deleted == []
    recent = record("full", "2026-11-20T02:00Z", expires_days=30)
    assert recent.id in plan_retention([recent, newest], shorter, now).kept


def test_future_backups_relative_to_now_are_kept() -> None:
    full = record("full", "2026-11-24T02:00Z")
    later = record("incremental", "2026-12-24T02:00Z", parent=full.id)
    plan = plan_retention([full, later], P, ts("2026-11-25T00:00Z"))
    assert plan.deleted == []


def test_base_backups_and_the_pitr_window() -> None:
    now = ts("2026-11-25T00:00Z")
    b = [record("base", f"2026-11-{d:02d}T03:00Z", start_wal=segment_name(1, d * 10)) for d in (1, 10, 15, 20)]
    plan = plan_retention(b, P, now, wal_segments=[segment_name(1, p) for p in range(5, 230)])
    assert plan.deleted == [b[0].id, b[1].id]  # the window starts 2026-11-18
    assert "newest base backup before the PITR window" in decision(plan, b[2]).reasons[0]
    assert "inside the PITR window" in decision(plan, b[3]).reasons[0]
    assert plan.wal is not None and plan.wal.keep_from == segment_name(1, 150)
    assert list(plan.wal.delete) == [segment_name(1, p) for p in range(5, 150)]


def test_wal_is_kept_without_a_usable_base() -> None:
    names = [segment_name(1, p) for p in range(1, 10)]
    assert plan_wal(names, []).delete == ()
    assert plan_wal(names, [record("base", "2026-11-01T00:00Z")]).delete == ()
    plan = plan_wal(names + ["00000002.history"], [record("base", "2026-11-01T00:00Z", start_wal=segment_name(2, 5))])
    assert plan.delete == tuple(segment_name(1, p) for p in range(1, 5))


def test_wal_deletion_list_is_linear_on_100k_segments() -> None:
    """A week of one-per-minute WAL is ~10k segments; 100k must plan in well under a second
    (the old list rebuilt a set of the deletions for every segment: quadratic)."""
    from backup_tool.governance.retention import doomed_segments
    from backup_tool.physical.wal import WalSegment

    n, cut = 100_000, 60_000
    when = ts("2026-11-01T00:00Z")
    segments = [WalSegment(segment_name(1, p), 1, f"wal/{p}", 1, when) for p in range(n)]
    plan = plan_wal([s.name for s in segments],
                    [record("base", "2026-11-01T00:00Z", start_wal=segment_name(1, cut))])
    doomed = doomed_segments(segments, plan)
    assert len(doomed) == cut and doomed[0].name == segment_name(1, 0) and doomed[-1].name == segment_name(1, cut - 1)
    assert plan.keep_from == segment_name(1, cut) and plan.kept == n - cut


# ----------------------------------------------------------------------------- properties


@st.composite
def repositories(draw: Any) -> tuple[list[BackupRecord], datetime, Policy]:
    policy = Policy(retention=Retention(full_days=draw(st.integers(1, 40)), incremental_days=draw(st.integers(1, 10)),
                                        pitr_days=draw(st.integers(1, 10)), min_fulls=draw(st.integers(1, 4))))
    start = ts("2026-01-01T00:00Z")
    backups: list[BackupRecord] = []
    t = start
    for i in range(draw(st.integers(0, 25))):
        t += timedelta(hours=draw(st.integers(0, 24 * 6)))
        db = draw(st.sampled_from(["a", "b"]))
        kind = draw(st.sampled_from(["full", "incremental", "incremental", "base"]))
        same_db = [b for b in backups if b.database == db and b.kind in ("full", "incremental")]
        if kind == "incremental" and not same_db:
            kind = "full"
        parent = draw(st.sampled_from(same_db)).id if kind == "incremental" else None
        needs = frozenset()
        if kind != "base" and same_db and draw(st.booleans()):
            needs = frozenset({draw(st.sampled_from(same_db)).id})
        lock = draw(st.sampled_from([None, None, 1, 50]))
        backups.append(record(kind, t, expires_days=draw(st.sampled_from([1, 7, 30, None])), parent=parent,
                              database=db, rid=f"{t:%Y%m%dT%H%M%SZ}-{i:03d}", needs=needs,
                              lock_mode="compliance" if lock else None,
                              lock_until=t + timedelta(days=lock) if lock else None))
    now = t + timedelta(days=draw(st.integers(-30, 400)), hours=draw(st.integers(0, 23)))
    return backups, now, policy


@settings(max_examples=400, deadline=None)
@given(repositories())
def test_no_history_and_now_break_the_safety_rules(repo: tuple[list[BackupRecord], datetime, Policy]) -> None:
    backups, now, policy = repo
    plan = plan_retention(backups, policy, now)
    deleted = set(plan.deleted)
    kept = set(plan.kept)
    assert deleted | kept == {b.id for b in backups} and not deleted & kept
    for db in {b.database for b in backups}:
        fulls = sorted((b for b in backups if b.database == db and b.kind == "full"), key=lambda b: (b.started_at, b.id))
        if fulls:
            assert fulls[-1].id in kept, "the newest full was deleted"
            assert len([f for f in fulls if f.id in kept]) >= min(policy.retention.min_fulls, len(fulls))
    by_id = {b.id: b for b in backups}
    for b in backups:
        if b.id in kept:
            for dep in b.deps:
                assert dep in kept, f"{dep}, needed by retained {b.id}, was deleted"
        if b.id in deleted:
            assert b.expires_at <= now and b.started_at + policy.retention_for(b.kind) <= now
            assert not (b.lock_until and b.lock_until > now)
        if b.kind == "base" and b.started_at >= now - timedelta(days=policy.retention.pitr_days):
            assert b.id in kept
    bases = sorted((b for b in backups if b.kind == "base"), key=lambda b: (b.started_at, b.id))
    if bases:
        assert bases[-1].id in kept
    assert all(by_id[i].kind for i in deleted)


@settings(max_examples=200, deadline=None)
@given(repositories(), st.integers(0, 60))
def test_retention_is_monotonic_in_time(repo: tuple[list[BackupRecord], datetime, Policy], later: int) -> None:
    """Applying retention now, then later, deletes nothing that a later run alone would keep."""
    backups, now, policy = repo
    first = plan_retention(backups, policy, now)
    remaining = [b for b in backups if b.id in set(first.kept)]
    second = plan_retention(remaining, policy, now + timedelta(days=later))
    assert set(first.deleted) & set(second.kept) == set()
    assert plan_retention(remaining, policy, now).deleted == []


# ----------------------------------------------------------------------------- garbage (pure)


def _obj(key: str, modified: str, size: int = 10) -> ObjectInfo:
    return ObjectInfo(key, size, ts(modified))


def test_garbage_plan() -> None:
    clock = ts("2026-11-25T12:00Z")
    objects = [
        _obj("backups/A/data/1.copy.zst", "2026-11-20T00:00Z"),          # orphan, old
        _obj("backups/B/data/1.copy.zst", "2026-11-25T11:00Z"),          # orphan, young: in progress
        _obj("backups/C/data/1.copy.zst", "2026-11-01T00:00Z"),          # has a manifest
        _obj("backups/D/data/1.copy.zst", "2026-11-01T00:00Z"),          # orphan, but a live upload under it
        _obj("tmp/probe-1", "2026-11-01T00:00Z"),
    ]
    partials = [PartialUpload("backups/D/data/2.copy.zst", 0, ts("2026-11-25T11:59Z"), "u1"),
                PartialUpload("backups/C/.x.partial-1", 5, ts("2026-11-10T00:00Z"))]
    items, notes = plan_garbage(objects, partials, {"C"}, timedelta(hours=24), clock)
    assert [g.what for g in items] == ["backups/A/", "tmp/probe-1", "backups/C/.x.partial-1"]
    assert any("backups/B/" in n and "in progress" in n for n in notes)
    assert any("backups/D/" in n for n in notes)


# ----------------------------------------------------------------------------- apply (local repository)


def _settings(repo: str, policy: Policy | None = None) -> Settings:
    return Settings(repo, "", policy or P)


def test_apply_dry_run_equals_real_run_and_logs(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    h = History(storage)
    seed_schedule(h, ts("2026-11-01T00:00Z"), 14)
    now = ts("2026-11-15T00:30Z")
    orphan = "backups/20261103T020000Z-Fdead/data/1.copy.zst"
    storage.put_bytes(orphan, b"crashed")
    os.utime(Path(repo) / orphan, (1_000_000_000, 1_000_000_000))
    young = "backups/20261125T020000Z-Fbeef/data/1.copy.zst"
    storage.put_bytes(young, b"in progress")
    stale_tmp = Path(repo) / "backups" / ".x.zst.partial-abc"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (1_000_000_000, 1_000_000_000))

    dry = apply_retention(_settings(repo), now=now, dry_run=True)
    assert dry.log_key is None and not list(storage.list("retention-log/"))
    assert storage.exists(orphan) and stale_tmp.exists()
    real = apply_retention(_settings(repo), now=now)
    assert real.deleted == dry.deleted and real.plan.kept == dry.plan.kept
    assert [g.what for g in real.garbage] == [g.what for g in dry.garbage]
    expired_incrementals = [m.id for m in h.manifests if m.kind == "incremental"
                            and m.started_at + timedelta(days=7) <= now]
    assert sorted(real.deleted) == sorted(i for i in expired_incrementals
                                          if i not in _needed(h, now))
    assert real.deleted, "two weeks of history must expire some incrementals"
    for backup_id in real.deleted:
        assert not storage.exists(f"manifests/{backup_id}.json")
        assert not list(storage.list(f"backups/{backup_id}/"))
    assert not storage.exists(orphan) and not stale_tmp.exists()
    assert storage.exists(young), "a young unlisted prefix may be a backup in progress"
    runs, entries, problems = read_log(storage)
    assert len(runs) == 1 and not problems
    assert sorted(e.id for e in entries) == sorted(real.deleted)
    assert all(e.expires_at and e.expires_at <= now and e.reasons for e in entries)
    assert runs[0]["policy"]["name"] == "default" and runs[0]["evaluated_at"] == "2026-11-15T00:30:00Z"
    assert any(g["what"] == "backups/20261103T020000Z-Fdead/" for g in runs[0]["garbage"])
    again = apply_retention(_settings(repo), now=now)
    assert again.deleted == [] and again.garbage == ()


def _needed(h: History, now: datetime) -> set[str]:
    """Incrementals whose chain leads to an unexpired incremental (kept as parents)."""
    by_id = {m.id: m for m in h.manifests}
    needed: set[str] = set()
    for m in h.manifests:
        if m.kind == "incremental" and m.started_at + timedelta(days=7) > now:
            p = m.parent_id
            while p:
                needed.add(p)
                p = by_id[p].parent_id
    latest = h.manifests[-1]
    needed.add(latest.id)
    return needed


def test_now_never_ages_garbage(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    History(storage).full("2026-11-01T02:00Z")
    storage.put_bytes("backups/20261125T020000Z-Fbeef/data/1.copy.zst", b"in progress")
    result = apply_retention(_settings(repo), now=datetime.now(UTC) + timedelta(days=400))
    assert result.garbage == ()
    assert storage.exists("backups/20261125T020000Z-Fbeef/data/1.copy.zst")


def test_log_is_append_only(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    h = History(storage)
    h.full("2026-09-01T02:00Z")
    h.full("2026-11-01T02:00Z")
    apply_retention(_settings(repo), now=ts("2026-11-02T00:00Z"))
    first = {o.key: storage.get_bytes(o.key) for o in storage.list("retention-log/")}
    apply_retention(_settings(repo), now=ts("2026-11-03T00:00Z"))
    after = {o.key: storage.get_bytes(o.key) for o in storage.list("retention-log/")}
    assert len(after) == 2 and all(after[k] == v for k, v in first.items())
    deleted = [json.loads(v)["deleted"] for v in first.values()][0]
    assert [d["id"] for d in deleted] == [h.manifests[0].id]


def test_unreadable_manifest_is_left_alone(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    h = History(storage)
    old = h.full("2026-01-01T02:00Z")
    h.full("2026-11-01T02:00Z")
    path = Path(repo) / f"manifests/{old.id}.json"
    path.write_bytes(path.read_bytes().replace(b'"kind"', b'"kinx"'))
    os.utime(Path(repo) / f"backups/{old.id}/data/16384.copy.zst", (1_000_000_000, 1_000_000_000))
    result = apply_retention(_settings(repo), now=ts("2026-11-25T00:00Z"))
    assert result.deleted == [] and result.garbage == ()
    assert any("unreadable manifest" in n for n in result.notes)
    assert storage.exists(f"backups/{old.id}/data/16384.copy.zst")


def test_local_repository_cannot_lock(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    assert check_object_lock(storage, P)[0] is True
    ok, detail = check_object_lock(storage, replace(P, object_lock=replace(P.object_lock, mode="compliance")))
    assert not ok and "local directory" in detail


def test_cli_dry_run_and_apply(cli: Any, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    h = History(open_storage(repo))
    seed_schedule(h, ts("2026-11-01T00:00Z"), 10)
    dry = cli.json("retention", "apply", "--repo", repo, "--dry-run", "--now", "2026-11-12T00:00:00")
    assert dry["dry_run"] is True and dry["deleted"] and dry["log"] is None
    assert set(dry["deleted"]) | set(dry["kept"]) == {m.id for m in h.manifests}
    real = cli.json("retention", "apply", "--repo", repo, "--now", "2026-11-12T00:00:00Z")
    assert real["deleted"] == dry["deleted"] and real["kept"] == dry["kept"]
    assert real["log"].startswith("retention-log/")
    listed = {e["id"] for e in cli.json("list", "--repo", repo)}
    assert listed == set(real["kept"])
    text = cli("retention", "apply", "--repo", repo, "--dry-run", "--now", "2026-11-12T00:00:00Z")
    assert text.returncode == 0 and "would delete 0 backup(s)" in text.stdout
    bad = cli("retention", "apply", "--repo", repo, "--now", "soon")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


# ----------------------------------------------------------------------------- WAL (real archive layout)


def _base_manifest(started: datetime, start_segment: str, policy: Policy) -> Any:
    from simhistory import make_manifest

    from backup_tool.repository.manifest import PhysicalInfo

    m = make_manifest("base", started, policy)
    physical = PhysicalInfo(start_lsn="0/0", stop_lsn="0/0", timeline=int(start_segment[:8], 16),
                            start_wal=start_segment, stop_wal=start_segment, stop_time=started,
                            wal_segment_size=16 << 20, checkpoint="fast", backup_label="")
    return replace(m, physical=physical)


def test_wal_expiry_against_the_real_archive(tmp_path: Path) -> None:
    from simhistory import store

    from backup_tool.physical import wal
    from backup_tool.repository.catalog import Catalog

    repo = str(tmp_path / "repo")
    storage = open_storage(repo)
    spool = tmp_path / "pg_wal"
    spool.mkdir()
    names = [segment_name(1, p) for p in range(1, 41)]
    for name in names + ["00000002.history"]:
        (spool / name).write_bytes(name.encode() * 4)
        wal.push_file(storage, spool / name)
    now = ts("2026-11-25T12:00Z")
    bases = [store(storage, _base_manifest(ts(f"2026-11-{d:02d}T03:00Z"), segment_name(1, p), P))
             for d, p in ((2, 5), (12, 15), (16, 25), (22, 35))]
    History(storage).full("2026-11-25T02:00Z")
    result = apply_retention(_settings(repo), now=now)
    assert result.deleted == [bases[0].id, bases[1].id]
    assert result.plan.wal is not None and result.plan.wal.keep_from == segment_name(1, 25)
    left = [s.name for s in walarchive.list_segments(storage)]
    assert left == [segment_name(1, p) for p in range(25, 41)]
    assert result.wal_deleted == 24
    assert any(f.key.startswith("wal/history/") for f in wal.list_archive(storage)), "history files are kept"
    assert {m.id for m in Catalog(storage).backups()} >= {bases[2].id, bases[3].id}
    runs, _, _ = read_log(storage)
    assert runs[-1]["wal"]["segments"] == [segment_name(1, p) for p in range(1, 25)]
