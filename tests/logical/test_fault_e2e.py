"""Backups and restores through a faulty S3 endpoint, end to end: the real CLI talks to the
fault proxy (tests/faultproxy.py) in front of moto. With seeded faults that a bounded number
of retries can outlast, full and incremental backups and their restores succeed with data
identical to the source; with faults that outlast the retry budget, commands fail with exit 1
and one line, list nothing new, and leave no unfinished multipart upload; bytes damaged on
the way or at rest are never restored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import boto3
import dbcompare
import pytest
from clioutput import add_bulk, one_line
from faultproxy import CHAOS_ACTIONS, Chaos, FaultProxy, Rule

pytestmark = pytest.mark.slow

FAST_FAILURE = {"BACKUP_TOOL_S3_READ_TIMEOUT": "2", "BACKUP_TOOL_S3_CONNECT_TIMEOUT": "2"}


@pytest.fixture
def proxy_factory(s3_server: Any) -> Iterator[Callable[..., FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(rules: list[Rule] | None = None, chaos: Chaos | None = None) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint_url, rules, chaos, stall_seconds=2.5).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def via(proxy: FaultProxy, **extra: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": proxy.url, **FAST_FAILURE, **extra}


def s3_keys(repo: str, under: str = "") -> list[str]:
    bucket, _, prefix = repo[5:].partition("/")
    prefix = prefix.strip("/") + "/"
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + under)
    return sorted(o["Key"][len(prefix):] for p in pages for o in p.get("Contents", []))


def s3_uploads(repo: str) -> list[str]:
    bucket = repo[5:].partition("/")[0]
    return [u["Key"] for u in boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def marker_of(db: Any) -> str | None:
    rows = db.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace "
                      "WHERE nspname = 'backup_tool_unfinished_restore'")
    return rows[0][0] if rows else None


def test_backups_and_restores_through_a_faulty_store_are_identical(
        cli: Any, s3_repo: str, seed_copy: Callable[..., Any], fresh_db: Callable[..., Any],
        proxy_factory: Callable[..., FaultProxy]) -> None:
    db = seed_copy("faulty")
    add_bulk(db)
    proxy = proxy_factory(
        rules=[Rule("reset_upload", method="PUT", query="partNumber=1"), Rule("stall", method="PUT", path="/manifests/"),
               Rule("stall", method="GET", path="/schema"), Rule("lose_response", method="POST", query="uploadId"),
               Rule("reset_download", method="GET", path="/data/"),
               Rule("truncate", method="GET", path="/data/", skip=1), Rule("error500", method="GET", skip=2),
               Rule("error503", method="PUT", skip=1), Rule("slowdown", method="GET", path="/data/", skip=3)],
        chaos=Chaos(seed=20261125, rate=0.1, max_faults=25, max_per_request=2,
                    actions=tuple(a for a in CHAOS_ACTIONS if a != "stall")))
    env = via(proxy)
    common = ["--repo", s3_repo, "--dsn", db.dsn, "--jobs", "1"]

    full = cli.json("backup", "full", *common, env=env)
    db.execute("UPDATE public.bulk SET payload = upper(payload) WHERE id % 7 = 0")
    db.execute("UPDATE public.crm_clients SET name = name || ' (faulty)' WHERE ctid = "
               "(SELECT min(ctid) FROM public.crm_clients)")
    incr = cli.json("backup", "incremental", *common, env=env)
    assert incr["kind"] == "incremental" and incr["parent_id"] == full["id"]

    target = fresh_db("faulty_target")
    result = cli.json("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn, "--jobs", "1", env=env)
    assert result["ok"] is True and result["backup_id"] == incr["id"]
    dbcompare.assert_same(dbcompare.fingerprint(db.dsn), dbcompare.fingerprint(target.dsn))
    assert cli.json("verify", "--repo", s3_repo, "all", env=env)["ok"] is True

    counts = proxy.counts()
    rules_fired = 9
    assert set(counts) == set(CHAOS_ACTIONS) and sum(counts.values()) >= rules_fired + 5, counts
    assert [e["id"] for e in cli.json("list", "--repo", s3_repo)] == [full["id"], incr["id"]]
    assert s3_uploads(s3_repo) == []
    assert s3_keys(s3_repo, "running/") == []


def test_faults_past_the_retry_budget_fail_cleanly(cli: Any, s3_repo: str, fresh_db: Callable[..., Any],
                                                   proxy_factory: Callable[..., FaultProxy]) -> None:
    db = fresh_db("budget")
    add_bulk(db)
    common = ["--repo", s3_repo, "--dsn", db.dsn]
    broken = proxy_factory([Rule("slowdown", method="PUT", query="partNumber=2", times=10_000)])
    proc = cli("backup", "full", *common, env=via(broken, BACKUP_TOOL_S3_ATTEMPTS="3"))
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "SlowDown" in line and "gave up after 3 attempts" in line
    assert broken.counts()["slowdown"] == 3
    assert cli.json("list", "--repo", s3_repo) == []
    assert s3_uploads(s3_repo) == [], "the abort reached the store: no unfinished upload"
    assert s3_keys(s3_repo) == [], "the unfinished backup's objects and marker were removed"

    entry = cli.json("backup", "full", *common)
    target = fresh_db("budget_target")
    cut = proxy_factory([Rule("reset_download", method="GET", path=r"/data/\d+\.copy\.zst$", times=10_000)])
    proc = cli("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn,
               env=via(cut, BACKUP_TOOL_S3_ATTEMPTS="3"))
    assert proc.returncode == 1
    assert "kept failing" in one_line(proc.stderr)
    assert target.execute("SELECT count(*) FROM public.bulk") == [(0,)]
    assert (marker_of(target) or "").startswith(f"in-progress:{entry['id']}")


def test_damage_on_the_way_or_at_rest_is_never_restored(cli: Any, s3_repo: str, fresh_db: Callable[..., Any],
                                                         proxy_factory: Callable[..., FaultProxy]) -> None:
    db = fresh_db("damage")
    add_bulk(db)
    entry = cli.json("backup", "full", "--repo", s3_repo, "--dsn", db.dsn)
    show = cli.json("show", "--repo", s3_repo, entry["id"])
    objects = {t["table"]: t["object"] for t in show["tables"] if t["object"]}

    target = fresh_db("damage_target")
    flip = proxy_factory([Rule("corrupt", method="GET", path=objects["public.bulk"].replace(".", r"\.") + "$")])
    proc = cli("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn, env=via(flip))
    assert proc.returncode == 3, proc.stderr
    assert objects["public.bulk"] in one_line(proc.stderr)
    assert flip.counts()["corrupt"] == 1
    assert target.execute("SELECT count(*) FROM public.bulk") == [(0,)], "no row from a damaged object"
    assert marker_of(target) is not None
    again = cli.json("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn, "--restart-unfinished")
    assert again["ok"] is True
    assert dbcompare.table_hashes(db.dsn) == dbcompare.table_hashes(target.dsn)

    bucket, _, prefix = s3_repo[5:].partition("/")
    key = f"{prefix.strip('/')}/{objects['public.bulk']}"
    client = boto3.client("s3")
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 2])
    report = cli("verify", "--repo", s3_repo, "all", "--json")
    assert report.returncode == 3
    assert objects["public.bulk"] in " ".join(c["detail"] for c in report.json()["checks"] if not c["ok"])
    target = fresh_db("truncated_target")
    proc = cli("restore", "full", "--repo", s3_repo, "--target-dsn", target.dsn)
    assert proc.returncode == 3 and objects["public.bulk"] in one_line(proc.stderr)
    assert target.execute("SELECT count(*) FROM public.bulk") == [(0,)]
