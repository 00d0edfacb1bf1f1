"""Which backup ``latest`` (or an id) designates: pure decisions over manifests, no I/O.

A repository may hold backups of several databases; ``latest`` never crosses from one
database to another (defect: ``restore full --backup latest`` restored ``bench`` when the
operator meant ``app``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from simhistory import make_manifest, ts

from backup_tool.errors import EXIT_FAILED, EXIT_USAGE
from backup_tool.repository.catalog import (
    DatabaseHint,
    RefProblem,
    UnresolvedBackup,
    check_database,
    choose_latest,
    match_id,
    of_cluster_holding,
)
from backup_tool.repository.manifest import PhysicalInfo

APP_FULL = make_manifest("full", ts("2026-11-20T02:00:00Z"), database="app")
APP_INCR = make_manifest("incremental", ts("2026-11-20T08:00:00Z"), database="app", parent=APP_FULL)
BENCH_FULL = make_manifest("full", ts("2026-11-20T09:30:00Z"), database="bench")
BASE = make_manifest("base", ts("2026-11-20T10:00:00Z"), database="postgres")
TWO_DATABASES = [APP_FULL, APP_INCR, BENCH_FULL, BASE]


def problem(exc: pytest.ExceptionInfo[UnresolvedBackup]) -> RefProblem:
    return exc.value.reason


def test_latest_of_the_database_named_by_option_or_dsn() -> None:
    assert choose_latest(TWO_DATABASES, DatabaseHint(option="app")).id == APP_INCR.id
    assert choose_latest(TWO_DATABASES, DatabaseHint(dsn="app")).id == APP_INCR.id
    assert choose_latest(TWO_DATABASES, DatabaseHint(option="bench", dsn="app")).id == BENCH_FULL.id
    assert choose_latest(TWO_DATABASES, DatabaseHint(dsn="bench")).id == BENCH_FULL.id


def test_several_databases_and_none_named_is_a_usage_error() -> None:
    for hint in (DatabaseHint(), DatabaseHint(dsn="app_dr"), DatabaseHint(dsn="postgres")):
        with pytest.raises(UnresolvedBackup) as exc:
            choose_latest(TWO_DATABASES, hint, where="/repo")
        assert problem(exc) is RefProblem.SEVERAL_DATABASES
        assert exc.value.exit_code == EXIT_USAGE
        assert "app, bench" in exc.value.message and "--database" in str(exc.value)


def test_one_database_needs_no_name_even_if_the_dsn_names_another() -> None:
    only_app = [APP_FULL, APP_INCR, BASE]
    assert choose_latest(only_app, DatabaseHint()).id == APP_INCR.id
    assert choose_latest(only_app, DatabaseHint(dsn="app_dr")).id == APP_INCR.id


def test_a_named_database_without_backups_is_not_found() -> None:
    for backups in (TWO_DATABASES, [APP_FULL]):
        with pytest.raises(UnresolvedBackup) as exc:
            choose_latest(backups, DatabaseHint(option="shop"))
        assert problem(exc) is RefProblem.NO_BACKUP_OF_DATABASE
        assert exc.value.exit_code == EXIT_FAILED
        assert "'shop'" in exc.value.message and "app" in exc.value.message


def test_no_backups_of_the_kinds_asked() -> None:
    with pytest.raises(UnresolvedBackup) as exc:
        choose_latest([BASE], DatabaseHint())
    assert problem(exc) is RefProblem.NO_BACKUPS
    assert choose_latest(TWO_DATABASES, DatabaseHint(), kinds=("base",)).id == BASE.id


def test_newest_is_by_snapshot_time_not_input_order() -> None:
    later = make_manifest("full", APP_INCR.started_at + timedelta(hours=1), database="app")
    assert choose_latest([later, APP_INCR, APP_FULL], DatabaseHint(option="app")).id == later.id


def test_an_id_contradicting_an_explicit_database_is_refused() -> None:
    check_database(BENCH_FULL, DatabaseHint())
    check_database(BENCH_FULL, DatabaseHint(dsn="app"))
    check_database(BENCH_FULL, DatabaseHint(option="bench"))
    with pytest.raises(UnresolvedBackup) as exc:
        check_database(BENCH_FULL, DatabaseHint(option="app"))
    assert problem(exc) is RefProblem.OTHER_DATABASE and exc.value.exit_code == EXIT_USAGE
    assert BENCH_FULL.id in exc.value.message and "'bench'" in exc.value.message


def test_ids_and_prefixes() -> None:
    ids = ["20261120T020000Z-Fa1b2", "20261120T080000Z-Ic3d4", "20261121T020000Z-Fe5f6"]
    assert match_id(ids, ids[1]) == ids[1]
    assert match_id(ids, "20261121") == ids[2]
    with pytest.raises(UnresolvedBackup) as exc:
        match_id(ids, "20261120")
    assert problem(exc) is RefProblem.AMBIGUOUS_ID and exc.value.exit_code == EXIT_FAILED
    with pytest.raises(UnresolvedBackup) as exc:
        match_id(ids, "nope", where="/repo")
    assert problem(exc) is RefProblem.UNKNOWN_ID and ids[2] in exc.value.message


def test_base_backups_of_the_cluster_holding_a_database() -> None:
    info = PhysicalInfo(start_lsn="0/2000028", stop_lsn="0/2000100", timeline=1, start_wal="000000010000000000000002",
                        stop_wal="000000010000000000000002", stop_time=BASE.finished_at, wal_segment_size=16 << 20,
                        checkpoint="fast", backup_label="", databases=("app", "bench", "postgres"))
    other = replace(BASE, id=BASE.id + "x", physical=replace(info, databases=("shop", "postgres")))
    recorded = replace(BASE, physical=info)
    old = replace(BASE, id=BASE.id + "o", physical=None, database="legacy")
    pool = [APP_FULL, recorded, other, old]
    assert [m.id for m in of_cluster_holding(pool, None)] == [recorded.id, other.id, old.id]
    assert [m.id for m in of_cluster_holding(pool, "bench")] == [recorded.id]
    assert [m.id for m in of_cluster_holding(pool, "postgres")] == [recorded.id, other.id]
    assert [m.id for m in of_cluster_holding(pool, "legacy")] == [old.id]
    with pytest.raises(UnresolvedBackup) as exc:
        of_cluster_holding(pool, "nowhere")
    assert problem(exc) is RefProblem.NO_BACKUP_OF_DATABASE
    assert of_cluster_holding([APP_FULL], "nowhere") == []
