"""Inheritance children through backup and restore, end to end through the CLI.

pg_dump/pg_restore recreate every inheritance child with its inherited columns first; a
child created stand-alone and attached with ALTER TABLE ... INHERIT, or whose parent gained
columns later, comes back reordered. backup-tool keeps the exact order, validation proves
it (``column_order``), and ``foreign_keys_hold`` counts only the rows a key covers.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import dbcompare
import psycopg
import pytest

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE SCHEMA ledger;
CREATE TYPE ledger.status AS ENUM ('open', 'settled', 'void');

CREATE TABLE ledger.accounts (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE ledger.accounts_closed (closed_on date) INHERITS (ledger.accounts);

CREATE TABLE ledger.entries (
    id bigint NOT NULL,
    account_id int REFERENCES ledger.accounts (id),
    booked_at timestamptz NOT NULL DEFAULT '2024-01-01 00:00+00',
    status ledger.status DEFAULT 'open',
    CONSTRAINT entries_id_positive CHECK (id > 0)
);
-- created with INHERITS, then the parent gains columns: (id, account_id, booked_at, status,
-- memo, amount, amount_cents); pg_dump's text is the same whatever the order
CREATE TABLE ledger.entries_2023 (memo text COLLATE "C" DEFAULT 'none') INHERITS (ledger.entries);
-- created stand-alone in its own order, then attached
CREATE TABLE ledger.entries_2024 (
    note text,
    status ledger.status NOT NULL DEFAULT 'settled',
    id bigint NOT NULL,
    booked_at timestamptz NOT NULL,
    account_id int,
    CONSTRAINT entries_id_positive CHECK (id > 0),
    CONSTRAINT note_not_blank CHECK (note <> '')
);
ALTER TABLE ledger.entries_2024 INHERIT ledger.entries;
-- a grandchild, and a child of two parents
CREATE TABLE ledger.entries_2024_q4 (audited boolean DEFAULT false) INHERITS (ledger.entries_2024);
CREATE TABLE ledger.tags (tag text NOT NULL DEFAULT 'untagged');
CREATE TABLE ledger.tagged_entries (extra jsonb) INHERITS (ledger.entries, ledger.tags);

ALTER TABLE ledger.entries ADD COLUMN amount numeric(12,2) NOT NULL DEFAULT 0;
ALTER TABLE ledger.entries ADD COLUMN amount_cents bigint GENERATED ALWAYS AS ((amount * 100)::bigint) STORED;
ALTER TABLE ledger.entries ADD CONSTRAINT amount_sane CHECK (amount > -1000000);
ALTER TABLE ledger.entries_2023 ALTER COLUMN amount SET DEFAULT 5;
ALTER TABLE ledger.entries_2024 ALTER COLUMN amount SET STATISTICS 200;
COMMENT ON TABLE ledger.entries_2024 IS 'attached after the fact';
COMMENT ON COLUMN ledger.entries_2024.note IS 'free text, never blank';
COMMENT ON COLUMN ledger.entries_2023.amount IS 'comment on an inherited column';
GRANT SELECT (id, note), UPDATE (amount) ON ledger.entries_2024 TO PUBLIC;

-- foreign keys never cover inheritance children: these rows are not orphans
CREATE TABLE ledger.invoices (id int PRIMARY KEY, account_id int NOT NULL REFERENCES ledger.accounts (id));
CREATE TABLE ledger.invoices_archive () INHERITS (ledger.invoices);

-- foreign keys between partitioned tables cover every partition
CREATE TABLE ledger.regions (code text, shard int, PRIMARY KEY (code, shard)) PARTITION BY LIST (shard);
CREATE TABLE ledger.regions_0 PARTITION OF ledger.regions FOR VALUES IN (0);
CREATE TABLE ledger.regions_1 PARTITION OF ledger.regions FOR VALUES IN (1);
CREATE TABLE ledger.shipments (id int, region text, shard int,
                               FOREIGN KEY (region, shard) REFERENCES ledger.regions) PARTITION BY RANGE (id);
CREATE TABLE ledger.shipments_low PARTITION OF ledger.shipments FOR VALUES FROM (0) TO (100);
CREATE TABLE ledger.shipments_high (shard int, region text, id int);
ALTER TABLE ledger.shipments ATTACH PARTITION ledger.shipments_high FOR VALUES FROM (100) TO (1000);
"""

DATA = """
INSERT INTO ledger.accounts VALUES (1, 'Zoë & Co'), (2, E'tab\\there');
INSERT INTO ledger.accounts_closed VALUES (900, 'gone', '2022-12-31');
INSERT INTO ledger.entries (id, account_id, amount) VALUES (1, 1, 10.5);
INSERT INTO ledger.entries_2023 (id, account_id, booked_at, memo, amount)
    VALUES (2, 900, '2023-03-01', E'line1\\nline2', 3), (3, NULL, '2023-04-01', NULL, -7.25);
INSERT INTO ledger.entries_2024 (note, id, booked_at, account_id, amount)
    VALUES ('first', 4, '2024-02-02', 2, 99.99), ('ünïcode', 5, '2024-05-05', 4242, 0);
INSERT INTO ledger.entries_2024_q4 (note, id, booked_at, account_id, audited, amount)
    VALUES ('q4', 6, '2024-11-11', 1, true, 1);
INSERT INTO ledger.tagged_entries (id, booked_at, tag, extra) VALUES (7, '2024-12-01', 'vip', '{"a": [1, 2]}');
INSERT INTO ledger.invoices VALUES (1, 1);
INSERT INTO ledger.invoices_archive VALUES (2, 900), (3, 31337);
INSERT INTO ledger.regions VALUES ('north', 0), ('south', 1);
INSERT INTO ledger.shipments VALUES (1, 'north', 0), (150, 'south', 1), (151, NULL, NULL);
"""

LAYOUT = """
    SELECT c.oid::regclass::text,
           array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' local=' || a.attislocal
                     || ' inh=' || a.attinhcount ORDER BY a.attnum)
      FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
     WHERE c.relnamespace = 'ledger'::regnamespace AND c.relkind IN ('r', 'p')
     GROUP BY 1 ORDER BY 1"""

CONSTRAINTS = """
    SELECT conrelid::regclass::text, conname, conislocal, coninhcount, pg_get_constraintdef(oid)
      FROM pg_constraint WHERE connamespace = 'ledger'::regnamespace ORDER BY 1, 2"""


def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def select_star(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """``SELECT *`` of every ledger table, as an application without column lists sees it."""
    tables = [r[0] for r in rows(dsn, LAYOUT)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM ONLY {t}").fetchall())) for t in tables}


@pytest.fixture
def ledger(fresh_db: Callable[[str], Any]) -> Any:
    db = fresh_db("ledger")
    with db.connect() as conn:
        conn.execute(SCHEMA)
        conn.execute(DATA)
    return db


def test_restore_keeps_every_column_order(cli: Any, local_repo: str, ledger: Any,
                                          pg_server: Any) -> None:
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", ledger.dsn)
    target_name = f"inh_{entry['id'][-5:].lower()}"
    target_dsn = pg_server.dsn(target_name)
    try:
        proc = cli("restore", "full", "--repo", local_repo, "--target-dsn", target_dsn, "--create", "--json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = proc.json()
        checks = {c["name"]: c for c in result["validation"]["checks"]}
        assert checks["column_order"]["ok"] and "have the backed-up column order" in checks["column_order"]["detail"]
        assert checks["foreign_keys_hold"]["ok"], checks["foreign_keys_hold"]
        assert result["ok"] is True

        assert rows(target_dsn, LAYOUT) == rows(ledger.dsn, LAYOUT)
        assert rows(target_dsn, CONSTRAINTS) == rows(ledger.dsn, CONSTRAINTS)
        assert dbcompare.schema_dump(target_dsn) == dbcompare.schema_dump(ledger.dsn)
        assert select_star(target_dsn) == select_star(ledger.dsn)
        dbcompare.assert_same(dbcompare.fingerprint(ledger.dsn), dbcompare.fingerprint(target_dsn))

        again = cli.json("validate", "--repo", local_repo, "--dsn", target_dsn, "--against", entry["id"])
        assert again["ok"] is True
    finally:
        pg_server.drop_db(target_name)


def plain_copy(source_dsn: str, target: Any) -> None:
    """Copy a database the classic way, pg_dump | psql (which reorders inheritance children)."""
    pg_dump = dbcompare.find_pg_dump()
    psql = str(Path(pg_dump).parent / "psql")
    dump = subprocess.run([pg_dump, "--dbname", source_dsn], capture_output=True, check=True).stdout
    subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.dsn], input=dump,
                   capture_output=True, check=True)


def test_column_order_check_names_a_reordered_table(cli: Any, local_repo: str, ledger: Any,
                                                    fresh_db: Callable[[str], Any]) -> None:
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", ledger.dsn)
    reordered = fresh_db("reordered")
    plain_copy(ledger.dsn, reordered)
    assert rows(reordered.dsn, LAYOUT) != rows(ledger.dsn, LAYOUT)

    proc = cli("validate", "--repo", local_repo, "--dsn", reordered.dsn, "--against", entry["id"], "--json")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["name"]: c for c in proc.json()["checks"]}
    failed = checks["column_order"]
    assert not failed["ok"]
    for table in ("ledger.entries_2023", "ledger.entries_2024", "ledger.entries_2024_q4", "ledger.tagged_entries"):
        assert table in failed["detail"], failed["detail"]
    assert "ledger.entries (" not in failed["detail"] and "ledger.accounts" not in failed["detail"]
    assert checks["row_counts"]["ok"] and checks["content_checksums"]["ok"]
    text = cli("validate", "--repo", local_repo, "--dsn", reordered.dsn, "--against", entry["id"])
    assert text.returncode == 3
    shown = [ln for ln in text.stdout.splitlines() if "column_order" in ln]
    assert len(shown) == 1 and not shown[0].startswith("ok") and "ledger.entries_2023" in shown[0], text.stdout


def test_column_order_check_sees_what_pg_dump_text_does_not(cli: Any, local_repo: str,
                                                            fresh_db: Callable[[str], Any]) -> None:
    """A child whose parent gained a column: pg_dump's text is identical after a plain copy,
    so only ``column_order`` can tell the restored table is (a, b, x) instead of (a, x, b)."""
    source = fresh_db("grown")
    with source.connect() as conn:
        conn.execute("CREATE TABLE public.parent (a int); "
                     "CREATE TABLE public.child (x text) INHERITS (public.parent); "
                     "ALTER TABLE public.parent ADD COLUMN b date; "
                     "INSERT INTO public.child VALUES (1, 'one', '2024-01-01')")
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", source.dsn)
    copy = fresh_db("grown_copy")
    plain_copy(source.dsn, copy)
    assert dbcompare.schema_dump(copy.dsn) == dbcompare.schema_dump(source.dsn)

    report = cli.json("validate", "--repo", local_repo, "--dsn", copy.dsn, "--against", entry["id"],
                      expect_rc=3)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["column_order"]
    assert failed[0]["detail"].startswith("column order differs: public.child (a integer, b date, x text; "
                                          "backup: a integer, x text, b date)")


def test_foreign_keys_hold_counts_only_the_rows_a_key_covers(cli: Any, ledger: Any) -> None:
    report = cli.json("validate", "--dsn", ledger.dsn)
    fk = next(c for c in report["checks"] if c["name"] == "foreign_keys_hold")
    assert fk["ok"] is True and report["ok"] is True, fk

    # a NOT VALID key is checked too: a row whose account exists only in a child of the
    # referenced table is a real orphan (the key looks at ledger.accounts alone)
    ledger.execute("CREATE TABLE ledger.payments (id int, account_id int)")
    ledger.execute("INSERT INTO ledger.payments VALUES (1, 1), (2, 900)")
    ledger.execute("ALTER TABLE ledger.payments ADD CONSTRAINT payments_account_fk "
                   "FOREIGN KEY (account_id) REFERENCES ledger.accounts (id) NOT VALID")
    proc = cli("validate", "--dsn", ledger.dsn, "--json")
    assert proc.returncode == 3
    fk = next(c for c in proc.json()["checks"] if c["name"] == "foreign_keys_hold")
    assert fk == {"name": "foreign_keys_hold", "ok": False,
                  "detail": "orphan rows: ledger.payments.payments_account_fk (1)"}


def test_without_superuser_the_order_is_kept_and_the_rest_reported(cli: Any, local_repo: str,
                                                                  pg_server: Any) -> None:
    """Marking inherited columns non-local is a catalog update only a superuser may make: a
    database owner's restore keeps the order, warns, and validation names what differs."""
    role = f"bt_inh_{uuid.uuid4().hex[:8]}"
    source, target = pg_server.create_db(f"{role}_src"), pg_server.create_db(f"{role}_dst")
    try:
        with pg_server.admin_conn() as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'inh-pw-7c1e'")
            for db in (source, target):
                conn.execute(f"ALTER DATABASE {db.name} OWNER TO {role}")
        as_role = {db.name: f"postgresql://{role}:inh-pw-7c1e@{pg_server.host}:{pg_server.port}/{db.name}"
                   for db in (source, target)}
        with psycopg.connect(as_role[source.name], autocommit=True) as conn:
            conn.execute("CREATE TABLE public.parent (a int CHECK (a > 0)); "
                         "CREATE TABLE public.child (x text) INHERITS (public.parent); "
                         "ALTER TABLE public.parent ADD COLUMN b date; "
                         "INSERT INTO public.child VALUES (1, 'one', '2024-01-01')")
        cli.json("backup", "full", "--repo", local_repo, "--dsn", as_role[source.name])

        proc = cli("restore", "full", "--repo", local_repo, "--target-dsn", as_role[target.name], "--json")
        assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
        warnings = [ln for ln in proc.stderr.splitlines() if '"level": "warning"' in ln]
        assert len(warnings) == 1 and "public.child" in warnings[0] and "superuser" in warnings[0]
        report = proc.json()
        assert [c["name"] for c in report["validation"]["checks"] if not c["ok"]] == ["schema_matches"]
        assert rows(as_role[target.name], LAYOUT.replace("'ledger'", "'public'")) == [
            ("child", ["a integer local=true inh=1", "x text local=true inh=0", "b date local=true inh=1"]),
            ("parent", ["a integer local=true inh=0", "b date local=true inh=0"])]
    finally:
        pg_server.drop_db(source.name)
        pg_server.drop_db(target.name)
        with pg_server.admin_conn() as conn:
            conn.execute(f"DROP ROLE IF EXISTS {role}")
