"""The S3 backend against a faulty store: the fault proxy (tests/faultproxy.py) between
boto3 and the moto server injects every fault kind into real HTTP exchanges, and each
write and read must either come out byte-identical or fail with one clear error, leaving
no partial object and no unfinished multipart upload behind."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zstandard
from faultproxy import ACTIONS, CHAOS_ACTIONS, Chaos, FaultProxy, Request, Rule

from backup_tool.errors import ConfigError, IntegrityError, StorageError
from backup_tool.repository.storage import ObjectExistsError
from backup_tool.repository.storage.s3 import FIRST_PART, MIN_PART, S3Storage, S3Tuning
from backup_tool.streams import pipeline

TUNING = S3Tuning(connect_timeout=2, read_timeout=1, attempts=4)
BIG = os.urandom(MIN_PART + 123_456)
SMALL = os.urandom(200_000)


@pytest.fixture
def bucket(s3_bucket: str) -> str:
    return s3_bucket


@pytest.fixture
def through(s3_server: Any, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[S3Storage, FaultProxy]]]:
    """``through(rules, chaos=...)``: an S3Storage on s3://bucket/repo reaching moto via a new proxy."""
    proxies: list[FaultProxy] = []

    def make(rules: list[Rule] | None = None, **kwargs: Any) -> tuple[S3Storage, FaultProxy]:
        proxy = FaultProxy(s3_server.endpoint_url, rules, stall_seconds=1.5, **kwargs).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        return S3Storage(f"s3://{bucket}/repo", TUNING), proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def uploads_left(s3_server: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


# ------------------------------------------------------------------------ the proxy itself


def test_schedule_is_deterministic_and_bounded() -> None:
    def run(seed: int, order: list[int]) -> list[tuple[str, int, str]]:
        proxy = FaultProxy("http://127.0.0.1:9", chaos=Chaos(seed, rate=0.5, max_faults=1000, max_per_request=2))
        seen = []
        for i in order:
            for _attempt in range(4):
                req = Request("PUT", f"/bucket-{i}/backups/20260101T000000Z-F{i:04x}/objects/{i}?partNumber=1&uploadId=x",
                              "HTTP/1.1", [("Content-Length", "10")], b"")
                fault = proxy._decide(req)
                if fault is None:
                    break
                seen.append((fault.identity, fault.occurrence, fault.action))
        return sorted(seen)

    masked = Request("GET", "/bucket-a/backups/20260101T000000Z-F1234/data/16384.copy.zst?x-id=GetObject",
                     "HTTP/1.1", [], b"").identity()
    assert masked == "GET /<bucket>/backups/<id>/data/<oid>.copy.zst?"
    forward, backward = run(7, list(range(40))), run(7, list(reversed(range(40))))
    assert forward == backward, "faults must not depend on the order requests arrive in"
    assert forward != run(8, list(range(40)))
    streaks: dict[str, int] = {}
    for identity, _n, _action in forward:
        streaks[identity] = streaks.get(identity, 0) + 1
    assert max(streaks.values()) <= 2
    assert {a for _i, _n, a in forward} >= {"error500", "slowdown", "reset_upload", "stall", "lose_response"}
    with pytest.raises(ValueError):
        Rule("explode")


# ------------------------------------------------------------------------ every fault survived


UPLOAD_TARGETS = {"reset_upload": "PUT", "lose_response": "PUT", "stall": "PUT", "error500": "PUT",
                  "error503": "PUT", "slowdown": "PUT"}
DOWNLOAD_TARGETS = {"reset_download", "truncate", "stall", "error500", "slowdown", "error503"}


@pytest.mark.parametrize("action", [a for a in CHAOS_ACTIONS])
def test_each_fault_is_retried_to_identical_bytes(action: str, through: Callable[..., Any], s3_server: Any,
                                                  bucket: str) -> None:
    times = 1 if action == "stall" else 2
    rules = []
    if action in UPLOAD_TARGETS:
        rules += [Rule(action, method="PUT", query="partNumber=2", times=times),
                  Rule(action, method="PUT", path="/small$", times=times),
                  Rule(action, method="POST", query="uploadId")]
    if action in DOWNLOAD_TARGETS:
        rules += [Rule(action, method="GET", times=times)]
    storage, proxy = through(rules)
    big = storage.put("big", chunks(BIG))
    small = storage.put("small", chunks(SMALL))
    assert (big.size, big.sha256) == (len(BIG), hashlib.sha256(BIG).hexdigest())
    assert (small.size, small.sha256) == (len(SMALL), hashlib.sha256(SMALL).hexdigest())
    assert storage.get_bytes("big") == BIG
    assert storage.get_bytes("small") == SMALL
    assert proxy.counts()[action] >= 2, proxy.faults
    assert uploads_left(s3_server, bucket) == []


def test_chaos_round_trip_many_objects(through: Callable[..., Any], s3_server: Any, bucket: str) -> None:
    storage, proxy = through(chaos=Chaos(seed=1234, rate=0.35, max_faults=60, max_per_request=2))
    payloads = {f"obj/{i}": os.urandom(20_000 * (i + 1)) for i in range(6)}
    for key, data in payloads.items():
        assert storage.put(key, chunks(data)).sha256 == hashlib.sha256(data).hexdigest()
    for key, data in payloads.items():
        assert storage.get_bytes(key) == data, key
    assert sorted(o.key for o in storage.list("obj/")) == sorted(payloads)
    assert len(proxy.counts()) >= 5, proxy.counts()
    assert uploads_left(s3_server, bucket) == []


# ------------------------------------------------------------------------ lost answers


def test_lost_put_answer_counts_only_if_the_object_is_ours(through: Callable[..., Any], s3_server: Any,
                                                           bucket: str) -> None:
    storage, proxy = through([Rule("lose_response", method="PUT", path="/mine$"),
                              Rule("error503", method="PUT", path="/theirs$"),
                              Rule("error503", method="PUT", path="/same$")])
    storage.put("mine", chunks(SMALL))
    assert storage.get_bytes("mine") == SMALL and proxy.counts()["lose_response"] == 1

    direct = s3_server.client()
    direct.put_object(Bucket=bucket, Key="repo/theirs", Body=b"x" * len(SMALL))
    with pytest.raises(ObjectExistsError):
        storage.put("theirs", chunks(SMALL))
    assert direct.get_object(Bucket=bucket, Key="repo/theirs")["Body"].read() == b"x" * len(SMALL)

    direct.put_object(Bucket=bucket, Key="repo/same", Body=SMALL)
    storage.put("same", chunks(SMALL))

    fresh, _ = through()
    with pytest.raises(ObjectExistsError):
        fresh.put("mine", chunks(SMALL))


def test_lost_multipart_answers(through: Callable[..., Any], s3_server: Any, bucket: str) -> None:
    storage, proxy = through([Rule("lose_response", method="POST", query="uploads"),
                              Rule("lose_response", method="POST", query="uploadId")])
    storage.put("big", chunks(BIG))
    assert proxy.counts()["lose_response"] == 2
    assert storage.get_bytes("big") == BIG
    assert uploads_left(s3_server, bucket) == [], "the upload whose creation answer was lost must be aborted"

    s3_server.client().put_object(Bucket=bucket, Key="repo/theirs", Body=b"x" * len(BIG))
    storage, _ = through([Rule("error503", method="POST", query="uploadId")])
    with pytest.raises(ObjectExistsError):
        storage.put("theirs", chunks(BIG))
    assert uploads_left(s3_server, bucket) == []


# ------------------------------------------------------------------------ faults that persist


def test_persistent_part_failure_gives_up_and_aborts(through: Callable[..., Any], s3_server: Any,
                                                     bucket: str) -> None:
    storage, proxy = through([Rule("slowdown", method="PUT", query="partNumber=2", times=1000)])
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.put("big", chunks(BIG))
    assert "SlowDown" in str(err.value) and "gave up after 4 attempts" in str(err.value)
    assert time.monotonic() - started < 20
    assert proxy.counts()["slowdown"] == TUNING.attempts
    assert uploads_left(s3_server, bucket) == []
    assert not storage.exists("big")


def test_stall_past_the_read_timeout_gives_up_bounded(through: Callable[..., Any]) -> None:
    storage, proxy = through([Rule("stall", method="PUT", times=1000)])
    storage.tuning = tuning = S3Tuning(connect_timeout=1, read_timeout=1, attempts=2)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.put("small", chunks(SMALL))
    elapsed = time.monotonic() - started
    assert "timeout" in str(err.value).lower() or "timed out" in str(err.value).lower(), err.value
    assert proxy.counts()["stall"] == tuning.attempts
    assert elapsed < tuning.attempts * (tuning.read_timeout + 1) + 2, elapsed


def test_download_interrupted_too_often_fails_clearly(through: Callable[..., Any]) -> None:
    storage, proxy = through([Rule("truncate", method="GET", times=1000)])
    storage.put("big", chunks(BIG))
    with pytest.raises(StorageError) as err:
        storage.get_bytes("big")
    assert "kept failing" in str(err.value)
    assert proxy.counts()["truncate"] == TUNING.attempts


def test_version_deletes_honour_the_attempt_budget(through: Callable[..., Any], s3_server: Any,
                                                   bucket: str) -> None:
    """``purge`` in a versioned bucket retries like every other request: BACKUP_TOOL_S3_ATTEMPTS."""
    s3_server.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    storage, proxy = through([Rule("slowdown", method="DELETE", times=1000)])
    storage.put("small", chunks(SMALL))
    with pytest.raises(StorageError) as err:
        storage.purge("small")
    assert "SlowDown" in str(err.value)
    assert proxy.counts()["slowdown"] == TUNING.attempts
    assert storage.get_bytes("small") == SMALL


# ------------------------------------------------------------------------ damaged downloads


def test_resumed_download_never_splices_another_object(through: Callable[..., Any], s3_server: Any,
                                                       bucket: str) -> None:
    direct = s3_server.client()

    def replace(_fault: Any) -> None:
        direct.delete_object(Bucket=bucket, Key="repo/big")
        direct.put_object(Bucket=bucket, Key="repo/big", Body=os.urandom(len(BIG)))

    storage, _ = through([Rule("reset_download", method="GET")], on_fault=replace)
    storage.put("big", chunks(BIG))
    with pytest.raises(StorageError) as err:
        storage.get_bytes("big")
    assert "changed while it was being read" in str(err.value)


def test_bytes_altered_on_the_way_are_never_returned_as_good(through: Callable[..., Any]) -> None:
    storage, proxy = through([Rule("corrupt", method="GET", times=2)])
    raw = zstandard.ZstdCompressor(write_checksum=True).compress(BIG)
    small = storage.put("small.zst", chunks(zstandard.ZstdCompressor().compress(SMALL)))
    big = storage.put("big.zst", chunks(raw))
    for key, put in (("small.zst", small), ("big.zst", big)):
        with pytest.raises(IntegrityError) as err:
            b"".join(pipeline.read_stored(storage, key, put.sha256, put.size))
        assert key in str(err.value)
    assert proxy.counts()["corrupt"] == 2
    assert b"".join(pipeline.read_stored(storage, "big.zst", big.sha256, big.size)) == BIG


# ------------------------------------------------------------------------ tunables


def test_bodies_are_bound_to_the_signature_by_their_signed_sha256(through: Callable[..., Any]) -> None:
    """Part and object bodies are not hashed a second time for SigV4 (UNSIGNED-PAYLOAD, as
    botocore does over HTTPS anyway): each carries its SHA-256 in a header the signature
    covers, which the store checks against the body. Other requests keep a signed payload."""
    storage, proxy = through()
    data = os.urandom(FIRST_PART + MIN_PART + 1000)
    storage.put("big", chunks(data))
    storage.put("small", [SMALL])
    cuts = [(0, FIRST_PART), (FIRST_PART, FIRST_PART + MIN_PART), (FIRST_PART + MIN_PART, len(data))]
    expected = {base64.b64encode(hashlib.sha256(b).digest()).decode() for b in
                [data[lo:hi] for lo, hi in cuts] + [SMALL]}
    bodies = [r for r in proxy.seen if r.method == "PUT"]
    assert {r.header("x-amz-checksum-sha256") for r in bodies} == expected
    for r in bodies:
        assert r.header("x-amz-content-sha256") == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-sha256" in (r.header("Authorization") or "").split("SignedHeaders=")[1].split(",")[0]
    completes = [r for r in proxy.seen if r.method == "POST" and "uploadId=" in r.query]
    assert len(completes) == 1
    assert re.fullmatch(r"[0-9a-f]{64}", completes[0].header("x-amz-content-sha256") or "")


def test_tunables_come_from_the_environment() -> None:
    assert S3Tuning.from_env({}) == S3Tuning()
    assert S3Tuning.from_env({"BACKUP_TOOL_S3_READ_TIMEOUT": "2", "BACKUP_TOOL_S3_CONNECT_TIMEOUT": "0.5",
                              "BACKUP_TOOL_S3_ATTEMPTS": "3"}) == S3Tuning(0.5, 2.0, 3)
    for name, value in (("BACKUP_TOOL_S3_READ_TIMEOUT", "soon"), ("BACKUP_TOOL_S3_ATTEMPTS", "0"),
                        ("BACKUP_TOOL_S3_ATTEMPTS", "2.5")):
        with pytest.raises(ConfigError) as err:
            S3Tuning.from_env({name: value})
        assert name in str(err.value)
    assert set(CHAOS_ACTIONS) < set(ACTIONS)
