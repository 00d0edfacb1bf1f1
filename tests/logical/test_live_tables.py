"""Tables copied straight from a running database into another (what table PITR does from
its recovered scratch cluster): an --into-schema copy and a --replace of the seed's
payments (RLS, policies, a shared sequence, partial indexes) and partitioned
observability_logs equal the source's rows, and the verdict, taken against the source's
checksums in one snapshot, fails naming the table once a copied row changes."""

from __future__ import annotations

from typing import Any, Callable

import dbcompare
import pytest

from backup_tool.core.report import NullReporter
from backup_tool.logical.live_tables import LiveTables
from backup_tool.logical.restore_tables import restore_tables_from, validate_tables
from backup_tool.logical.selection import resolve_tables
from backup_tool.postgres.connection import ConnInfo

pytestmark = pytest.mark.slow

NAMES = ["public.payments", "public.observability_logs"]
WANTED = {("public", "payments"), ("public", "observability_logs")}


def failures(report: Any) -> str:
    return " | ".join(f"{c.name}: {c.detail}" for c in report.failed)


def copied(hashes: dict[str, Any], schema: str) -> dict[str, Any]:
    return {k.split(".", 1)[1]: v for k, v in hashes.items()
            if k.startswith(f"{schema}.") and k.split(".", 1)[1].startswith(("payments", "observability_logs"))}


def test_live_copy_equals_the_source_and_a_changed_row_fails_the_verdict(seed_copy: Callable[..., Any]) -> None:
    source, target = seed_copy("livesrc"), seed_copy("livedst")
    expected = copied(dbcompare.table_hashes(source.dsn), "public")
    assert len(expected) == 5
    settled: list[bool] = []
    with LiveTables(ConnInfo(source.dsn), WANTED, "live-source", "recovered", 2,
                    on_settled=lambda: settled.append(True)) as live:
        copy = restore_tables_from(live, target.dsn, NAMES, into_schema="recovered")
        manifest = live.settled()
    assert settled == [True]
    assert copy.validation is not None and copy.validation.ok, failures(copy.validation)
    assert copy.mode == "into-schema" and copy.rows == sum(v["rows"] for v in expected.values())
    assert {".".join(c.copy) for c in copy.sequences} >= {"recovered.invoice_number_seq"}
    assert copied(dbcompare.table_hashes(target.dsn), "recovered") == expected

    entries = resolve_tables(manifest, NAMES)
    location = {(t.schema, t.name): ("recovered", t.name) for t in entries}

    def check_copy() -> Any:
        return validate_tables(ConnInfo(target.dsn), manifest, entries, location, 2, NullReporter(), copy.sequences)

    assert check_copy().ok, failures(check_copy())
    target.execute("UPDATE recovered.payments SET raw = '{\"tampered\": true}'"
                   " WHERE ctid = (SELECT min(ctid) FROM recovered.payments)")
    assert "content differs: public.payments" in failures(check_copy())


def test_live_replace_brings_back_the_source_rows(seed_copy: Callable[..., Any]) -> None:
    source, target = seed_copy("livesrc"), seed_copy("livedst")
    expected = copied(dbcompare.table_hashes(source.dsn), "public")
    target.execute("DELETE FROM public.observability_logs WHERE id IN (SELECT id FROM public.observability_logs LIMIT 3)")
    target.execute("UPDATE public.payments SET amount = amount + 1")
    assert copied(dbcompare.table_hashes(target.dsn), "public") != expected
    with LiveTables(ConnInfo(source.dsn), WANTED, "live-source", None, 2) as live:
        replaced = restore_tables_from(live, target.dsn, NAMES, replace=True)
    assert replaced.validation is not None and replaced.validation.ok, failures(replaced.validation)
    assert replaced.mode == "replace"
    assert copied(dbcompare.table_hashes(target.dsn), "public") == expected


def test_a_key_gone_with_a_dropped_table_fails_the_live_restore_naming_it(seed_copy: Callable[..., Any]) -> None:
    """Table PITR of a table dropped with CASCADE: the table comes back from the recovered
    cluster, crm_projects' key to it does not (a table restore writes no other table), and the
    verdict says so, as it does for a restore from a backup, instead of "OK"."""
    source, target = seed_copy("livesrc"), seed_copy("livedst")
    target.execute("DROP TABLE public.crm_clients CASCADE")
    with LiveTables(ConnInfo(source.dsn), {("public", "crm_clients")}, "live-source", None, 2) as live:
        restored = restore_tables_from(live, target.dsn, ["public.crm_clients"], run_validation=False)
        manifest = live.settled()
    assert restored.validation is None
    entries = resolve_tables(manifest, ["public.crm_clients"])
    report = validate_tables(ConnInfo(target.dsn), manifest, entries,
                             {("public", "crm_clients"): ("public", "crm_clients")}, 2, NullReporter())
    assert [c.name for c in report.failed] == ["foreign_keys_match"], failures(report)
    assert "missing public.crm_projects.crm_projects_client_id_fkey" in failures(report)
    assert "ALTER TABLE public.crm_projects ADD CONSTRAINT crm_projects_client_id_fkey" in failures(report)
