"""Client-side encryption: the object format's guarantees (tamper, truncation, reordering,
swapping, wrong or missing key), key configuration, bounded memory, the storage wrapper's
completeness, manifest sealing, and S3 server-side encryption pass-through.

Fast tests work on the library directly (a local directory repository, or moto for SSE);
the end-to-end CLI tests are marked slow.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from clioutput import one_line
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_tool.errors import BackupToolError, ConfigError, IntegrityError
from backup_tool.repository.manifest import parse_manifest
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.base import Storage
from backup_tool.repository.storage.encrypted import (
    CONTENT_METHODS,
    FRAME_SIZE,
    HEADER_SIZE,
    KEY_ENV,
    KEY_FILE_ENV,
    PREVIOUS_KEYS_ENV,
    TAG_SIZE,
    EncryptedStorage,
    EncryptionKey,
    decrypt_stream,
    encrypt_stream,
    key_from_environment,
)
from backup_tool.repository.storage.local import LocalStorage

KEY = EncryptionKey(bytes(range(32)))
OTHER = EncryptionKey(bytes(range(1, 33)))
SMALL = 64


def seal(data: bytes, object_key: str = "backups/X/data/1.copy.zst", key: EncryptionKey = KEY,
         frame: int = SMALL) -> bytes:
    return b"".join(encrypt_stream(key, object_key, [data], frame))


def unseal(stored: bytes, object_key: str = "backups/X/data/1.copy.zst",
           key: EncryptionKey | None = KEY, chunk: int = 7) -> bytes:
    return b"".join(decrypt_stream(key, object_key, [stored[i:i + chunk] for i in range(0, len(stored), chunk)]))


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL, 3 * SMALL + 5])
def test_round_trip_at_frame_boundaries(size: int) -> None:
    data = secrets.token_bytes(size)
    stored = seal(data)
    frames = max(1, -(-size // SMALL))
    assert len(stored) == HEADER_SIZE + size + frames * TAG_SIZE
    assert unseal(stored) == data


@pytest.mark.parametrize("chunk", [1, HEADER_SIZE, HEADER_SIZE + 1, 1000, 10**6])
def test_stored_bytes_read_in_any_chunk_size(chunk: int) -> None:
    data = secrets.token_bytes(5 * SMALL + 3)
    assert unseal(seal(data), chunk=chunk) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(1, 97), max_size=12), read=st.integers(1, 200))
def test_any_chunking_round_trips(data: bytes, cuts: list[int], read: int) -> None:
    pieces, pos = [], 0
    for c in cuts:
        pieces.append(data[pos:pos + c])
        pos += c
    pieces.append(data[pos:])
    stored = b"".join(encrypt_stream(KEY, "k", pieces, SMALL))
    assert unseal(stored, "k", chunk=read) == data


def test_ciphertext_hides_the_plaintext_and_differs_every_time() -> None:
    data = b"secret row\tvalue\n" * 50
    one, two = seal(data), seal(data)
    assert one != two
    assert b"secret row" not in one


@settings(max_examples=60, deadline=None)
@given(position=st.integers(5, HEADER_SIZE + 3 * SMALL + 3 * TAG_SIZE - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_fails_authentication(position: int, bit: int) -> None:
    """Past the magic, any change is refused before plaintext is released: a damaged version
    byte as an unknown format, a damaged key id as another key, anything else as forgery."""
    stored = bytearray(seal(secrets.token_bytes(3 * SMALL)))
    stored[position] ^= 1 << bit
    with pytest.raises(BackupToolError) as info:
        unseal(bytes(stored))
    assert isinstance(info.value, (IntegrityError, ConfigError)) or "encryption format" in str(info.value)


def test_a_damaged_magic_reads_as_ciphertext_which_the_sha256_then_refuses() -> None:
    from backup_tool.streams import pipeline

    stored = bytearray(seal(b"secret" * 40))
    stored[0] ^= 1
    assert b"secret" not in unseal(bytes(stored))
    with pytest.raises(IntegrityError):
        for _ in pipeline.verified([bytes(stored)], "k", "0" * 64, len(stored)):
            pass


def frames_of(stored: bytes) -> tuple[bytes, list[bytes]]:
    body = stored[HEADER_SIZE:]
    size = SMALL + TAG_SIZE
    return stored[:HEADER_SIZE], [body[i:i + size] for i in range(0, len(body), size)]


def test_truncation_at_a_frame_boundary_is_detected() -> None:
    header, frames = frames_of(seal(secrets.token_bytes(3 * SMALL)))
    with pytest.raises(IntegrityError, match="fails authentication"):
        unseal(header + b"".join(frames[:2]))
    with pytest.raises(IntegrityError, match="truncated"):
        unseal(header + frames[0][:5])
    with pytest.raises(IntegrityError, match="truncated"):
        unseal(header[:HEADER_SIZE - 1])


def test_reordered_dropped_or_appended_frames_are_detected() -> None:
    header, frames = frames_of(seal(secrets.token_bytes(4 * SMALL)))
    for tampered in ([frames[1], frames[0], *frames[2:]], [frames[0], *frames[2:]],
                     [*frames, frames[-1]], [*frames[:-1], frames[0]]):
        with pytest.raises(IntegrityError):
            unseal(header + b"".join(tampered))


def test_an_object_moved_under_another_key_does_not_decrypt() -> None:
    stored = seal(b"rows of table 1", "backups/X/data/1.copy.zst")
    with pytest.raises(IntegrityError, match="authentication"):
        unseal(stored, "backups/X/data/2.copy.zst")


def test_missing_and_wrong_keys_are_named() -> None:
    stored = seal(b"data")
    with pytest.raises(ConfigError, match=f"key id {KEY.key_id} and no encryption key") as missing:
        unseal(stored, key=None)
    assert KEY_ENV in str(missing.value)
    with pytest.raises(ConfigError, match=f"key id {KEY.key_id}, but the configured key has id {OTHER.key_id}"):
        unseal(stored, key=OTHER)


def test_unencrypted_objects_read_as_they_are() -> None:
    for data in (b"", b"BT", b"BTENC", b"\x28\xb5\x2f\xfd zstd frame", b"{}" * 100):
        if data == b"BTENC":
            with pytest.raises(IntegrityError):
                unseal(data)
            continue
        assert unseal(data) == data
        assert unseal(data, key=None) == data


def test_key_id_is_public_and_derived_from_the_key() -> None:
    import hashlib

    assert KEY.key_id == hashlib.sha256(KEY.secret).hexdigest()[:16]
    assert KEY.secret.hex() not in repr(KEY) and "secret" not in repr(KEY).replace("EncryptionKey", "")
    assert KEY.key_id.encode() not in KEY.secret


def test_memory_stays_bounded_by_frames() -> None:
    """A 64 MiB stream passes through both directions with never more than two frames buffered."""
    total = 64 * FRAME_SIZE
    block = secrets.token_bytes(FRAME_SIZE // 4)
    produced = [0]

    def source() -> Iterator[bytes]:
        while produced[0] < total:
            produced[0] += len(block)
            yield block

    consumed = 0
    sealed = encrypt_stream(KEY, "k", source())
    for out in decrypt_stream(KEY, "k", sealed):
        consumed += len(out)
        assert produced[0] - consumed <= 3 * FRAME_SIZE
    assert consumed == total


# --------------------------------------------------------------------------- keys from the environment


def test_key_from_environment_forms(tmp_path: Path) -> None:
    text = base64.b64encode(KEY.secret).decode()
    assert key_from_environment({}) is None
    assert key_from_environment({KEY_ENV: text}) == KEY
    assert key_from_environment({KEY_ENV: f"  {text}\n"}) == KEY
    path = tmp_path / "key"
    path.write_text(text + "\n")
    assert key_from_environment({KEY_FILE_ENV: str(path)}) == KEY
    assert key_from_environment({KEY_FILE_ENV: str(path), KEY_ENV: text}) == KEY
    with pytest.raises(ConfigError, match=f"key id {OTHER.key_id}.*key id {KEY.key_id}.* hold different keys"):
        key_from_environment({KEY_FILE_ENV: str(path), KEY_ENV: base64.b64encode(OTHER.secret).decode()})


@pytest.mark.parametrize("env, needle", [
    ({KEY_ENV: "not base64!"}, "does not hold an encryption key"),
    ({KEY_ENV: base64.b64encode(b"short").decode()}, "does not hold an encryption key"),
    ({KEY_ENV: base64.b64encode(bytes(33)).decode()}, "does not hold an encryption key"),
    ({KEY_FILE_ENV: "/nonexistent/key"}, "cannot read the encryption key file"),
    ({KEY_ENV: base64.b64encode(bytes(32)).decode(), KEY_FILE_ENV: "/x"}, "cannot read"),
])
def test_bad_key_configuration_is_a_usage_error(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        key_from_environment(env)
    assert info.value.exit_code == 2
    if len(env.get(KEY_ENV, "")) > 8:
        assert env[KEY_ENV] not in str(info.value)


# --------------------------------------------------------------------------- the storage wrapper


def test_wrapper_forwards_every_non_content_operation() -> None:
    """Methods added to Storage later are forwarded automatically; content ones are handled."""
    public = {n for n, m in vars(Storage).items() if callable(m) and not n.startswith("_")}
    for name in public - CONTENT_METHODS:
        assert name in vars(EncryptedStorage), name
    for name in CONTENT_METHODS - {"put_bytes", "get_bytes", "check_writable"}:
        assert name in vars(EncryptedStorage), name


def test_stored_size_and_sha256_are_those_of_the_ciphertext(tmp_path: Path) -> None:
    import hashlib

    storage = EncryptedStorage(LocalStorage(tmp_path), KEY)
    data = secrets.token_bytes(FRAME_SIZE + 10)
    result = storage.put("backups/X/data/1.copy.zst", [data])
    raw = (tmp_path / "backups/X/data/1.copy.zst").read_bytes()
    assert (result.size, result.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert b"".join(storage.get_stored(result.key)) == raw
    assert storage.get_bytes(result.key) == data
    assert [o.size for o in storage.list("backups/")] == [len(raw)]
    storage.check_writable()


def test_metadata_stays_plaintext_and_data_is_encrypted(tmp_path: Path) -> None:
    storage = EncryptedStorage(LocalStorage(tmp_path), KEY)
    for key in ("manifests/a.json", "running/r.json", "verifications/b.json", "retention-log/c.json",
                "schedule-log/d.json",
                "wal/history/00000002.history-abc.zst"):
        storage.put_bytes(key, b'{"x": 1}')
        assert (tmp_path / key).read_bytes() == b'{"x": 1}'
    for key in ("backups/a/schema.pgdump.zst", "wal/0000000100000000/x-y.zst", "tmp/probe-1"):
        storage.put_bytes(key, b"content")
        assert (tmp_path / key).read_bytes().startswith(b"BTENC")


def test_open_storage_reads_the_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, base64.b64encode(KEY.secret).decode())
    storage = open_storage(str(tmp_path))
    storage.put_bytes("backups/a/x", b"hello")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match="no encryption key is configured"):
        open_storage(str(tmp_path)).get_bytes("backups/a/x")


# --------------------------------------------------------------------------- manifests


def test_commit_records_the_key_id_and_seals_the_manifest(tmp_path: Path) -> None:
    from support.manifests import make_manifest

    from backup_tool.repository.catalog import Catalog

    storage = EncryptedStorage(LocalStorage(tmp_path), KEY)
    stored = Catalog(storage).commit(make_manifest())
    assert stored.options["encryption"] == {"algorithm": "AES-256-GCM", "key_id": KEY.key_id}
    raw = (tmp_path / f"manifests/{stored.id}.json").read_bytes()
    body = json.loads(raw)
    assert body["format"] == 2 and len(body["manifest_mac"]) == 64
    assert base64.b64encode(KEY.secret) not in raw and KEY.secret.hex().encode() not in raw

    assert Catalog(storage).load(stored.id) == stored
    assert Catalog(LocalStorage(tmp_path)).load(stored.id).id == stored.id, "list needs no key"

    body["tables"] = body["tables"][1:]
    from backup_tool.repository.manifest import _digest

    body["manifest_sha256"] = _digest(body)
    (tmp_path / f"manifests/{stored.id}.json").write_bytes(json.dumps(body).encode())
    parse_manifest(json.dumps(body).encode(), "x")
    with pytest.raises(IntegrityError, match="fails authentication"):
        Catalog(storage).load(stored.id)
    body.pop("manifest_mac")
    (tmp_path / f"manifests/{stored.id}.json").write_bytes(json.dumps(body).encode())
    with pytest.raises(IntegrityError, match="fails authentication"):
        Catalog(storage).load(stored.id)


def test_restoring_needs_the_recorded_key(tmp_path: Path) -> None:
    from support.manifests import make_manifest

    from backup_tool.repository.catalog import Catalog

    stored = Catalog(EncryptedStorage(LocalStorage(tmp_path), KEY)).commit(make_manifest())
    with pytest.raises(ConfigError, match=f"backup {stored.id} is encrypted with key id {KEY.key_id} and no"):
        Catalog(EncryptedStorage(LocalStorage(tmp_path), None)).resolve_logical(stored.id)
    with pytest.raises(ConfigError, match=f"configured key has id {OTHER.key_id}"):
        Catalog(EncryptedStorage(LocalStorage(tmp_path), OTHER)).resolve_logical(stored.id)
    assert Catalog(EncryptedStorage(LocalStorage(tmp_path), KEY)).resolve_logical(stored.id).id == stored.id


def test_an_incremental_chain_never_mixes_keys() -> None:
    from dataclasses import replace

    from support.manifests import T0, make_manifest

    from backup_tool.config.policy import Policy
    from backup_tool.logical.backup import choose_parent

    full = make_manifest()
    sealed = replace(full, options={"encryption": KEY.describe()})
    later = T0.replace(hour=8)
    assert choose_parent([full], "app", Policy(), later)[0] is full
    assert choose_parent([sealed], "app", Policy(), later, KEY.key_id)[0] is sealed
    for chain, key_id, needle in (([full], KEY.key_id, "not encrypted"), ([sealed], None, "no key"),
                                  ([sealed], OTHER.key_id, f"key id {OTHER.key_id}")):
        parent, why = choose_parent(chain, "app", Policy(), later, key_id)
        assert parent is None and needle in why and "never mixes keys" in why


# --------------------------------------------------------------------------- S3 server-side encryption


@pytest.mark.parametrize("mode, kms_key", [("AES256", None), ("aws:kms", "alias/backup-tool-test")])
def test_s3_server_side_encryption_is_requested_on_every_write(s3_server: Any, s3_bucket: str, mode: str,
                                                               kms_key: str | None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tool.repository.storage.s3 import S3Storage

    monkeypatch.setenv("BACKUP_TOOL_S3_SSE", mode)
    if kms_key:
        monkeypatch.setenv("BACKUP_TOOL_S3_SSE_KMS_KEY_ID", kms_key)
    storage = S3Storage(f"s3://{s3_bucket}/p")
    storage.put_bytes("small", b"x" * 100)
    storage.put("large", (b"y" * (1 << 20) for _ in range(9)))
    client = s3_server.client()
    for key in ("p/small", "p/large"):
        head = client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == mode, (key, head)
        if kms_key:
            assert kms_key in head["SSEKMSKeyId"], head
    assert client.head_object(Bucket=s3_bucket, Key="p/large")["ContentLength"] == 9 << 20
    assert b"".join(storage.get("large")) == b"y" * (9 << 20)


@pytest.mark.parametrize("env, needle", [
    ({"BACKUP_TOOL_S3_SSE": "aes256"}, "is not a server-side encryption mode"),
    ({"BACKUP_TOOL_S3_SSE_KMS_KEY_ID": "k"}, "is set but BACKUP_TOOL_S3_SSE is not"),
    ({"BACKUP_TOOL_S3_SSE": "AES256", "BACKUP_TOOL_S3_SSE_KMS_KEY_ID": "k"}, "needs BACKUP_TOOL_S3_SSE=aws:kms"),
])
def test_bad_sse_settings_are_usage_errors(env: dict[str, str], needle: str) -> None:
    from backup_tool.repository.storage.s3 import sse_args

    with pytest.raises(ConfigError, match=needle):
        sse_args(env)


# --------------------------------------------------------------------------- end to end


def b64(key: EncryptionKey) -> str:
    return base64.b64encode(key.secret).decode()


@pytest.mark.slow
def test_encrypted_backup_restores_identically_and_fails_clearly_otherwise(
        cli: Any, repo: str, seed_db: Any, fresh_db: Callable[..., Any], tmp_path: Path) -> None:
    import dbcompare
    from support.objects import object_keys, read_object, write_object

    key_file = tmp_path / "repo.key"
    key_file.write_text(b64(KEY) + "\n")
    with_key = {KEY_FILE_ENV: str(key_file)}
    entry = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn, env=with_key)
    show = cli.json("show", "--repo", repo, entry["id"])
    assert show["options"]["encryption"] == {"algorithm": "AES-256-GCM", "key_id": KEY.key_id}
    for key in object_keys(repo):
        raw = read_object(repo, key)
        assert raw.startswith(b"BTENC") != key.startswith(("manifests/", "encryption/")), key

    listed = cli.json("list", "--repo", repo)
    assert [(e["id"], e["encryption_key_id"]) for e in listed] == [(entry["id"], KEY.key_id)], "list needs no key"
    checks = {c["name"]: c for c in cli.json("check", "--repo", repo, "--dsn", seed_db.dsn, env=with_key)["checks"]}
    assert checks["encryption"]["ok"] and KEY.key_id in checks["encryption"]["detail"]
    keyless_check = cli("check", "--repo", repo, "--dsn", seed_db.dsn, "--json")
    checks = {c["name"]: c for c in keyless_check.json()["checks"]}
    assert keyless_check.returncode == 3 and not checks["encryption"]["ok"]
    assert "refuse to write plaintext" in checks["encryption"]["detail"]
    keyless_verify = cli.json("verify", "--repo", repo, "latest")
    assert keyless_verify["ok"] and "not decrypted" in keyless_verify["checks"][0]["detail"]
    assert "not decrypted" not in cli.json("verify", "--repo", repo, "latest", env=with_key)["checks"][0]["detail"]

    target = fresh_db("enc")
    missing = cli("restore", "full", "--repo", repo, "--target-dsn", target.dsn)
    assert missing.returncode == 2
    assert f"backup {entry['id']} is encrypted with key id {KEY.key_id}" in one_line(missing)
    wrong = cli("restore", "full", "--repo", repo, "--target-dsn", target.dsn, env={KEY_ENV: b64(OTHER)})
    assert wrong.returncode == 2 and f"configured key has id {OTHER.key_id}" in one_line(wrong)

    restored = cli.json("restore", "full", "--repo", repo, "--target-dsn", target.dsn, env=with_key)
    assert restored["ok"] is True
    dbcompare.assert_same(dbcompare.fingerprint(seed_db.dsn), dbcompare.fingerprint(target.dsn))

    victim = max((t for t in show["tables"] if t["object"]), key=lambda t: t["size_bytes"])
    data = bytearray(read_object(repo, victim["object"]))
    data[HEADER_SIZE + 10] ^= 0x40
    write_object(repo, victim["object"], bytes(data))
    other = fresh_db("tampered")
    tampered = cli("restore", "full", "--repo", repo, "--target-dsn", other.dsn, env=with_key)
    assert tampered.returncode == 3
    line = one_line(tampered)
    assert victim["object"] in line and ("fails authentication" in line or "is corrupt" in line)
    keyless = cli("verify", "--repo", repo, "latest", "--json")
    assert keyless.returncode == 3 and victim["object"] in json.dumps(keyless.json())


@pytest.mark.slow
def test_incremental_after_a_key_change_starts_a_new_chain(cli: Any, local_repo: str, seed_db: Any) -> None:
    first = cli.json("backup", "full", "--repo", local_repo, "--dsn", seed_db.dsn, env={KEY_ENV: b64(KEY)})
    same = cli.json("backup", "incremental", "--repo", local_repo, "--dsn", seed_db.dsn, env={KEY_ENV: b64(KEY)})
    assert same["kind"] == "incremental" and same["parent_id"] == first["id"]
    previous = Path(local_repo).parent / "previous.keys"
    previous.write_text(f"# retired 2026-11\n{b64(KEY)}\n")
    proc = cli("backup", "incremental", "--repo", local_repo, "--dsn", seed_db.dsn, "--json",
               env={KEY_ENV: b64(OTHER), PREVIOUS_KEYS_ENV: str(previous)})
    assert proc.returncode == 0, proc.stderr
    assert proc.json()["kind"] == "full" and "never mixes keys" in proc.stderr
    listed = cli.json("list", "--repo", local_repo, env={KEY_ENV: b64(OTHER), PREVIOUS_KEYS_ENV: str(previous)})
    assert [e["encryption_key_id"] for e in listed] == [KEY.key_id, KEY.key_id, OTHER.key_id]
    plain = cli("backup", "incremental", "--repo", local_repo, "--dsn", seed_db.dsn, "--json")
    assert plain.returncode == 1 and f"key id {OTHER.key_id} and no encryption key" in one_line(plain)
