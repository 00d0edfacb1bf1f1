"""`restore tables --into-schema` makes a copy that cannot reach live data, links to parents
included. A partition named without its partitioned table (pagila's payment_p2022_03) is
`PARTITION OF` the live parent, so the copy joined the live table (its rows visible in
public.payment) when the live partition was gone, and failed midway with pg_restore's overlap
error when it was there: it is refused before anything is written, and naming the partitioned
table brings its whole tree into the schema. An inheritance child was copied `INHERITS` the
live parent (its rows doubled in the parent's queries): it is copied without that link."""

from __future__ import annotations

from typing import Any, Callable

import pytest

pytestmark = pytest.mark.slow

SCHEMA = """
CREATE TABLE public.payment (payment_id serial, amount numeric(5,2) NOT NULL,
                             payment_date timestamptz NOT NULL, PRIMARY KEY (payment_date, payment_id))
  PARTITION BY RANGE (payment_date);
CREATE TABLE public.payment_p2022_01 PARTITION OF public.payment
  FOR VALUES FROM ('2022-01-01 00:00:00+00') TO ('2022-02-01 00:00:00+00');
CREATE TABLE public.payment_p2022_02 PARTITION OF public.payment
  FOR VALUES FROM ('2022-02-01 00:00:00+00') TO ('2022-03-01 00:00:00+00');
INSERT INTO public.payment (amount, payment_date)
  SELECT g % 10 + 0.99, '2022-01-01 00:00:00+00'::timestamptz + g * interval '1 hour' FROM generate_series(1, 1000) g;
"""


@pytest.mark.parametrize("live_partition", ["dropped", "present"])
def test_a_partition_alone_is_refused_before_anything_is_written(
        cli: Any, local_repo: str, fresh_db: Callable[[str], Any], live_partition: str) -> None:
    db = fresh_db("payments")
    db.execute(SCHEMA)
    backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    if live_partition == "dropped":
        db.execute("DROP TABLE public.payment_p2022_02")
    before = db.scalar("SELECT count(*) FROM public.payment")

    proc = cli("restore", "tables", "--repo", local_repo, "--backup", backup["id"],
               "--tables", "public.payment_p2022_02", "--target-dsn", db.dsn, "--into-schema", "recovered")

    assert proc.returncode == 1, proc.stderr
    assert "public.payment_p2022_02" in proc.stderr and "name public.payment" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert db.scalar("SELECT count(*) FROM public.payment") == before
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'recovered'") == 0


def test_the_partitioned_table_brings_its_tree_beside_the_live_one(
        cli: Any, local_repo: str, fresh_db: Callable[[str], Any]) -> None:
    db = fresh_db("payments")
    db.execute(SCHEMA)
    backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    db.execute("DROP TABLE public.payment_p2022_02")

    cli.json("restore", "tables", "--repo", local_repo, "--backup", backup["id"],
             "--tables", "public.payment", "--target-dsn", db.dsn, "--into-schema", "recovered")

    assert db.scalar("SELECT count(*) FROM recovered.payment") == 1000
    assert db.scalar("SELECT count(*) FROM recovered.payment_p2022_02") == db.scalar(
        "SELECT count(*) FROM recovered.payment WHERE payment_date >= '2022-02-01 00:00:00+00'")
    assert db.scalar("SELECT count(*) FROM public.payment") < 1000
    assert db.scalar("SELECT string_agg(DISTINCT inhparent::regclass::text, ',') FROM pg_inherits i "
                     "JOIN pg_class c ON c.oid = i.inhrelid AND c.relkind = 'r' "
                     "WHERE inhrelid::regclass::text LIKE 'recovered.%'") == "recovered.payment"


def test_an_inheritance_child_is_copied_without_joining_the_live_parent(
        cli: Any, local_repo: str, fresh_db: Callable[[str], Any]) -> None:
    """The copy of a child was created INHERITS the live parent: its rows doubled those a query
    on the live parent returns."""
    db = fresh_db("inherit")
    db.execute("CREATE TABLE public.events (id int PRIMARY KEY, at timestamptz NOT NULL, CHECK (id > 0));"
               "CREATE TABLE public.events_2024 (note text) INHERITS (public.events);"
               "INSERT INTO public.events_2024 SELECT g, '2024-01-01'::timestamptz + g * interval '1 day', 'n' || g "
               "FROM generate_series(1, 30) g")
    backup = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)

    cli.json("restore", "tables", "--repo", local_repo, "--backup", backup["id"],
             "--tables", "public.events_2024", "--target-dsn", db.dsn, "--into-schema", "recovered")

    assert db.scalar("SELECT count(*) FROM public.events") == 30
    assert db.scalar("SELECT count(*) FROM recovered.events_2024") == 30
    assert db.scalar("SELECT count(*) FROM pg_inherits WHERE inhrelid = 'recovered.events_2024'::regclass") == 0
    assert db.scalar("SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute "
                     "WHERE attrelid = 'recovered.events_2024'::regclass AND attnum > 0") == "id,at,note"
