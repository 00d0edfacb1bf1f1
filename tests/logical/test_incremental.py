"""Incremental backups: every kind of change is caught, unchanged tables are referenced not
re-uploaded, and restoring an incremental gives exactly the database at its time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import dbcompare
import pytest
from support.manifests import make_manifest

from backup_tool.config.policy import Policy, Retention
from backup_tool.logical.backup import choose_parent

T0 = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)


def at(backup_id: str, kind: str, when: datetime, parent: str | None, policy: Policy = Policy()) -> Any:
    from dataclasses import replace
    m = make_manifest(backup_id, parent_id=parent, kind=kind)
    return replace(m, started_at=when, expires_at=policy.expires_at(kind, when))


class TestChooseParent:
    def test_no_backup_means_full(self) -> None:
        parent, why = choose_parent([], "app", Policy(), T0)
        assert parent is None and "no full backup" in why

    def test_newest_of_same_database(self) -> None:
        f = at("F1", "full", T0, None)
        i = at("I1", "incremental", T0 + timedelta(hours=6), "F1")
        other = at("X1", "full", T0 + timedelta(hours=7), None)
        other = type(other)(**{**other.__dict__, "database": "other"})
        parent, _ = choose_parent([f, i, other], "app", Policy(), T0 + timedelta(hours=12))
        assert parent is i

    def test_chain_length_bound(self) -> None:
        policy = Policy(retention=Retention(max_chain_length=2))
        chain = [at("F1", "full", T0, None), at("I1", "incremental", T0 + timedelta(hours=6), "F1"),
                 at("I2", "incremental", T0 + timedelta(hours=12), "I1")]
        parent, why = choose_parent(chain, "app", policy, T0 + timedelta(hours=18))
        assert parent is None and "max_chain_length" in why
        assert choose_parent(chain[:2], "app", policy, T0 + timedelta(hours=18))[0] is chain[1]

    def test_full_expiring_before_the_incremental_forces_a_full(self) -> None:
        policy = Policy(retention=Retention(full_days=3, incremental_days=7))
        parent, why = choose_parent([at("F1", "full", T0, None, policy)], "app", policy, T0 + timedelta(hours=6))
        assert parent is None and "expires" in why

    def test_broken_chain(self) -> None:
        parent, why = choose_parent([at("I1", "incremental", T0, "GONE")], "app", Policy(), T0)
        assert parent is None and "broken" in why


def own(show: dict[str, Any]) -> set[str]:
    return {t["table"] for t in show["tables"] if t["object"] and t["object"].startswith(f"backups/{show['id']}/")}


CHANGES: list[tuple[str, str, set[str]]] = [
    ("insert", "INSERT INTO public.achievements (code, title) VALUES ('new-ach', 'New')", {"public.achievements"}),
    ("update", "UPDATE public.crm_clients SET name = name || ' (edited)' WHERE ctid = (SELECT min(ctid) FROM public.crm_clients)",
     {"public.crm_clients"}),
    ("delete", "DELETE FROM public.email_logs WHERE id IN (SELECT id FROM public.email_logs ORDER BY id LIMIT 3)",
     {"public.email_logs"}),
    ("truncate", "TRUNCATE public.n8n_chat_histories", {"public.n8n_chat_histories"}),
    ("copy", "COPY", {"public.achievements"}),
    ("add column with default", "ALTER TABLE public.coupons ADD COLUMN note text NOT NULL DEFAULT 'n/a'",
     {"public.coupons"}),
    ("column type", "ALTER TABLE public.achievements ALTER COLUMN weight TYPE double precision",
     {"public.achievements"}),
    ("new table", "CREATE TABLE public.brand_new AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50) g",
     {"public.brand_new"}),
    ("dropped table", 'DROP TABLE analytics."daily.stats"', set()),
    ("partition detached", "ALTER TABLE public.observability_logs DETACH PARTITION public.observability_logs_2025_03",
     {"public.observability_logs_2025_03"}),
    ("partition attached", "ALTER TABLE public.observability_logs ATTACH PARTITION public.observability_logs_2025_03 "
     "FOR VALUES FROM ('2025-03-01 00:00:00+00') TO ('2025-04-01 00:00:00+00')", {"public.observability_logs_2025_03"}),
    ("sequence advance", "SELECT nextval('public.invoice_number_seq') FROM generate_series(1, 5)", set()),
    ("no change", "SELECT 1", set()),
]


def test_each_change_kind_is_caught_and_restores_exactly(cli: Any, local_repo: str, seed_copy: Callable[..., Any],
                                                         fresh_db: Callable[..., Any], tmp_path: Path) -> None:
    policy = tmp_path / "long-chains.toml"
    policy.write_text("[retention]\nmax_chain_length = 50\n")
    db = seed_copy("incr")
    common = ["--repo", local_repo, "--dsn", db.dsn, "--policy", str(policy)]
    previous = cli.json("backup", "full", *common)
    taken: list[tuple[str, str, dbcompare.Fingerprint]] = []
    for name, statement, expected in CHANGES:
        if statement == "COPY":
            with db.connect() as conn, conn.cursor() as cur:
                with cur.copy("COPY public.achievements (code, title, tags) FROM STDIN") as copy:
                    copy.write_row(("copied\tcode", "line\nbreak \\ back", ["a", None]))
        else:
            db.execute(statement)
        entry = cli.json("backup", "incremental", *common)
        assert entry["kind"] == "incremental" and entry["parent_id"] == previous["id"], name
        show = cli.json("show", "--repo", local_repo, entry["id"])
        assert own(show) == expected, name
        taken.append((name, entry["id"], dbcompare.fingerprint(db.dsn)))
        previous = entry

    def restores_exactly(name: str, backup_id: str, source: dbcompare.Fingerprint) -> None:
        restored = fresh_db("r")
        result = cli.json("restore", "full", "--repo", local_repo, "--backup", backup_id,
                          "--target-dsn", restored.dsn)
        assert result["ok"] is True, name
        try:
            dbcompare.assert_same(source, dbcompare.fingerprint(restored.dsn))
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        restored.server.drop_db(restored.name)

    # Every incremental of the chain, restored into its own database and compared with the
    # source as it was when that backup was taken; the restores are independent, so two run
    # at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(restores_exactly, *step) for step in taken]:
            done.result()


def test_incremental_without_full_takes_a_full_and_says_so(cli: Any, local_repo: str, seed_db: Any) -> None:
    proc = cli("backup", "incremental", "--repo", local_repo, "--dsn", seed_db.dsn, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.json()["kind"] == "full"
    assert "taking a full backup instead" in proc.stderr


def test_one_of_twenty_tables_costs_a_fraction(cli: Any, s3_repo: str, fresh_db: Callable[..., Any]) -> None:
    db = fresh_db("twenty")
    for i in range(20):
        db.execute(f"CREATE TABLE t{i:02d} (id int PRIMARY KEY, payload text)")
        db.execute(f"INSERT INTO t{i:02d} SELECT g, md5(g::text || '{i}') || md5(g::text) FROM generate_series(1, 20000) g")
    full = cli.json("backup", "full", "--repo", s3_repo, "--dsn", db.dsn)
    db.execute("UPDATE t07 SET payload = upper(payload) WHERE id % 10 = 0")
    incr = cli.json("backup", "incremental", "--repo", s3_repo, "--dsn", db.dsn)
    show = cli.json("show", "--repo", s3_repo, incr["id"])
    assert own(show) == {"public.t07"}
    stored = {o["key"] for o in show["objects"] if o["key"].startswith(f"backups/{incr['id']}/")}
    assert len(stored) == 3, stored
    assert incr["size_bytes"] < 0.15 * full["size_bytes"], (incr["size_bytes"], full["size_bytes"])
    target = fresh_db("t20")
    assert cli.json("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn)["ok"] is True
    assert dbcompare.table_hashes(db.dsn) == dbcompare.table_hashes(target.dsn)


def test_a_parent_lacking_a_reused_object_fails_the_incremental_and_commits_nothing(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """The parent's reused objects are listed while the changed tables are dumped: one gone
    fails the backup naming it, and leaves no manifest, object or running marker behind."""
    db = fresh_db("lacking")
    for name in ("kept", "gone", "edited"):
        db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        db.execute(f"INSERT INTO {name} SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    full = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    show = cli.json("show", "--repo", local_repo, full["id"])
    lost = next(t["object"] for t in show["tables"] if t["table"] == "public.gone")
    (Path(local_repo) / lost).unlink()
    db.execute("UPDATE edited SET v = upper(v) WHERE id % 7 = 0")
    before = sorted(p.relative_to(local_repo) for p in Path(local_repo).rglob("*") if p.is_file())
    proc = cli("backup", "incremental", "--repo", local_repo, "--dsn", db.dsn, "--json")
    assert proc.returncode == 1, proc.stderr
    assert f"parent backup {full['id']} lacks objects it lists ({lost})" in proc.stderr
    after = sorted(p.relative_to(local_repo) for p in Path(local_repo).rglob("*") if p.is_file())
    assert after == before
    assert [b["id"] for b in cli.json("list", "--repo", local_repo)] == [full["id"]]


def test_verify_and_validate_work_for_incrementals(cli: Any, local_repo: str, seed_copy: Callable[..., Any]) -> None:
    db = seed_copy("vi")
    cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("UPDATE public.payments SET amount = amount + 1 WHERE ctid = (SELECT min(ctid) FROM public.payments)")
    incr = cli.json("backup", "incremental", "--repo", local_repo, "--dsn", db.dsn)
    report = cli.json("verify", "--repo", local_repo, incr["id"])
    assert report["ok"] is True
    assert cli.json("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", incr["id"])["ok"] is True
    db.execute("UPDATE public.payments SET amount = amount + 1 WHERE ctid = (SELECT min(ctid) FROM public.payments)")
    proc = cli("validate", "--repo", local_repo, "--dsn", db.dsn, "--against", incr["id"], "--json")
    assert proc.returncode == 3
    assert "public.payments" in {c["name"]: c["detail"] for c in proc.json()["checks"]}["content_checksums"]


pytestmark = pytest.mark.slow


def test_an_incremental_reads_only_its_parents_manifest_once_the_index_is_current(
        cli: Any, local_repo: str, fresh_db: Callable[..., Any]) -> None:
    """Planning a backup costs the same with thousands of backups as with two: once a commit
    has written the catalog index, the next backup reads no other manifest than its parent's
    (an old manifest made unreadable does not stop it; `verify all` still names it)."""
    db = fresh_db("indexed")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200) g")
    first = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    second = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert list((Path(local_repo) / "catalog").glob("index-*.json"))
    damaged = Path(local_repo) / "manifests" / f"{first['id']}.json"
    damaged.chmod(0o644)
    damaged.write_bytes(b"{ not a manifest")
    db.execute("UPDATE t SET v = upper(v) WHERE id < 10")
    incr = cli.json("backup", "incremental", "--repo", local_repo, "--dsn", db.dsn)
    assert incr["kind"] == "incremental" and incr["parent_id"] == second["id"]
    proc = cli("verify", "--repo", local_repo, "all", "--json")
    assert proc.returncode != 0 and first["id"] in proc.stdout + proc.stderr
