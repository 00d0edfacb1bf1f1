"""Someone with write access to the repository but without the key.

Manifests must be authenticated under the configured key (a manifest that is untagged,
stripped of its tag, sealed under another key, edited, or replayed under another id is
refused by every reader, and ignored by retention), and a backup or WAL push never falls
back to plaintext when the policy or the repository says it must be encrypted.

Fast tests drive the library on a local or S3 (moto) repository; the end-to-end test runs
the real CLI, the attacker being this test process writing objects behind the tool's back.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from clioutput import one_line
from support.manifests import T0, make_manifest
from support.objects import drop_object, object_keys, read_object, write_object

from backup_tool.core.checksum_methods import ChecksumMethod
from backup_tool.errors import IntegrityError
from backup_tool.repository.catalog import Catalog, manifest_key
from backup_tool.repository.manifest import CHECKSUM_METHOD_FORMATS, SEAL_FIELD, Manifest, _digest
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.encrypted import KEY_ENV, EncryptionKey

KEY = EncryptionKey(bytes(range(32)))
OTHER = EncryptionKey(bytes(range(1, 33)))


def b64(key: EncryptionKey) -> str:
    return base64.b64encode(key.secret).decode()


def resealed(body: dict[str, Any], strip: bool = False) -> bytes:
    """The manifest as the attacker rewrites it: checksum recomputed (anyone can), tag kept or stripped
    (stripped: the lowest format an unencrypted manifest of that content has)."""
    body = json.loads(json.dumps(body))
    if strip:
        body.pop(SEAL_FIELD, None)
        body["options"].pop("encryption", None)
        body["format"] = CHECKSUM_METHOD_FORMATS[ChecksumMethod(body["checksum_method"])] \
            if "checksum_method" in body else 1
    body["manifest_sha256"] = _digest(body)
    return json.dumps(body, indent=1, sort_keys=True).encode()


def sealed_repo(repo: str, *manifests: Manifest) -> None:
    catalog = Catalog(open_storage(repo, KEY))
    for m in manifests:
        catalog.commit(m)


# --------------------------------------------------------------------------- defect 1: manifests


def forgeries(original: bytes) -> dict[str, bytes]:
    body = json.loads(original)
    edited = json.loads(original)
    edited["tables"][0]["checksum"] = "11" * 8
    other_key = json.loads(original)
    other_key["options"]["encryption"]["key_id"] = OTHER.key_id
    return {
        "edited, tag kept": resealed(edited),
        "edited, tag stripped": resealed(edited, strip=True),
        "tag stripped only": resealed(body, strip=True),
        "claims another key": resealed(other_key),
    }


def test_a_manifest_not_sealed_under_the_key_is_refused_by_every_reader(repo: str) -> None:
    from backup_tool.repository.catalog import REFUSED

    real = make_manifest()
    sealed_repo(repo, real)
    original = read_object(repo, manifest_key(real.id))
    for what, forged in forgeries(original).items():
        write_object(repo, manifest_key(real.id), forged)
        with_key = Catalog(open_storage(repo, KEY))
        with pytest.raises(REFUSED, match=f"manifest {manifest_key(real.id)} "):
            with_key.load(real.id)
        manifests, problems = with_key.scan()
        assert manifests == [] and len(problems) == 1 and isinstance(problems[0], REFUSED), what
        assert with_key.backups() == [], what
    write_object(repo, manifest_key(real.id), original)
    assert Catalog(open_storage(repo, KEY)).load(real.id).tables == real.tables


def test_untagged_manifests_are_trusted_only_on_request_and_a_failing_tag_never(
        repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tool.repository.storage.encrypted import ALLOW_UNAUTHENTICATED_ENV

    old = make_manifest("20261101T020000Z-Fold1")
    Catalog(open_storage(repo, None)).commit(old)
    real = make_manifest()
    sealed_repo(repo, real)
    refused = Catalog(open_storage(repo, KEY)).scan()
    assert [m.id for m in refused[0]] == [real.id]
    assert [p.message.split(":")[0] for p in refused[1]] == [
        f"manifest {manifest_key(old.id)} is not authenticated under key id {KEY.key_id}"]

    monkeypatch.setenv(ALLOW_UNAUTHENTICATED_ENV, "1")
    allowed = Catalog(open_storage(repo, KEY))
    assert [m.id for m in allowed.backups()] == [old.id, real.id]
    edited = json.loads(read_object(repo, manifest_key(real.id)))
    edited["tables"][0]["rows"] = 4
    write_object(repo, manifest_key(real.id), resealed(edited))
    with pytest.raises(IntegrityError, match="fails authentication"):
        Catalog(open_storage(repo, KEY)).load(real.id)


def test_after_a_rotation_previous_keys_authenticate_what_they_sealed(
        local_repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_tool.repository.catalog import REFUSED
    from backup_tool.repository.storage.encrypted import PREVIOUS_KEYS_ENV

    old, new = make_manifest("20261101T020000Z-Fold1"), make_manifest()
    Catalog(open_storage(local_repo, KEY)).commit(old)
    Catalog(open_storage(local_repo, OTHER)).commit(new)
    manifests, problems = Catalog(open_storage(local_repo, OTHER)).scan()
    assert [m.id for m in manifests] == [new.id] and len(problems) == 1 and isinstance(problems[0], REFUSED)
    assert problems[0].message.startswith(f"backup {old.id} is sealed with key id {KEY.key_id}, but the "
                                          f"configured key has id {OTHER.key_id}")
    keys = tmp_path / "previous.keys"
    keys.write_text(f"# retired\n\n{b64(KEY)}\n")
    monkeypatch.setenv(PREVIOUS_KEYS_ENV, str(keys))
    assert [m.id for m in Catalog(open_storage(local_repo, OTHER)).backups()] == [old.id, new.id]
    forged = json.loads(read_object(local_repo, manifest_key(old.id)))
    forged["tables"] = forged["tables"][1:]
    write_object(local_repo, manifest_key(old.id), resealed(forged))
    with pytest.raises(IntegrityError, match=f"fails authentication with key id {KEY.key_id}"):
        Catalog(open_storage(local_repo, OTHER)).load(old.id)


def test_a_manifest_replayed_under_another_id_is_refused_with_or_without_a_key(repo: str) -> None:
    older, newer = make_manifest("20261124T020000Z-Fold1"), make_manifest()
    sealed_repo(repo, older, newer)
    write_object(repo, manifest_key(newer.id), read_object(repo, manifest_key(older.id)))
    for key in (KEY, None):
        with pytest.raises(IntegrityError, match=f"holds backup {older.id}, not {newer.id}"):
            Catalog(open_storage(repo, key)).load(newer.id)


def test_retention_is_not_tricked_by_a_planted_full(cli: Any, repo: str) -> None:
    real = make_manifest("20261125T020000Z-Freal")
    sealed_repo(repo, real)
    planted = replace(make_manifest("20261201T020000Z-Fplnt"), started_at=T0 + timedelta(days=6),
                      finished_at=T0 + timedelta(days=6, seconds=5), expires_at=T0 + timedelta(days=36))
    claims_the_key = replace(planted, options={"encryption": KEY.describe()}, format=2)
    for forged in (planted.to_json(), claims_the_key.to_json(lambda digest: "0" * 64)):
        write_object(repo, manifest_key(planted.id), forged)
        result = cli.json("retention", "apply", "--repo", repo, "--now", "2027-02-01T00:00:00Z",
                          env={KEY_ENV: b64(KEY)})
        decisions = {d["id"]: d for d in result["decisions"]}
        assert list(decisions) == [real.id] and decisions[real.id]["action"] == "keep"
        assert "newest full" in decisions[real.id]["reasons"]
        assert any(manifest_key(planted.id) in n and n.startswith("refused manifest ignored") for n in result["notes"])
        assert manifest_key(real.id) in object_keys(repo)


# --------------------------------------------------------------------------- defect 2: no plaintext fallback


def test_key_needed_decisions() -> None:
    from backup_tool.repository.keyguard import key_needed

    assert key_needed(None, "", "default", [], "r") is None
    assert key_needed(KEY.key_id, "", "default", [OTHER.key_id], "r") is None, "rotation is allowed"
    need = key_needed(None, "", "default", [OTHER.key_id, KEY.key_id], "s3://b/p")
    assert need is not None and need.key_id == KEY.key_id and need.configured is None
    assert need.message("x") == (f"repository s3://b/p requires encryption with key id {KEY.key_id} and no "
                                 "encryption key is configured: refusing to x in plaintext")
    need = key_needed(OTHER.key_id, KEY.key_id, "prod", [], "r")
    assert need is not None and need.message("x") == (
        f"policy prod requires encryption with key id {KEY.key_id} and the configured key has id "
        f"{OTHER.key_id}: refusing to x with another key")
    assert key_needed(KEY.key_id, KEY.key_id, "prod", [], "r") is None


def test_guard_refuses_without_writing_and_records_the_key(local_repo: str) -> None:
    from backup_tool.errors import KeyRequiredError
    from backup_tool.repository.keyguard import guard_writes, key_marker

    with_key, keyless = open_storage(local_repo, KEY), open_storage(local_repo, None)
    guard_writes(keyless, "", "default", "write")
    assert object_keys(local_repo) == []
    guard_writes(with_key, "", "default", "write")
    assert object_keys(local_repo) == [key_marker(KEY.key_id)]
    assert json.loads(read_object(local_repo, key_marker(KEY.key_id))) == KEY.describe()
    with pytest.raises(KeyRequiredError, match=f"key id {KEY.key_id} and no encryption key is configured"):
        guard_writes(keyless, "", "default", "write")
    drop_object(local_repo, key_marker(KEY.key_id))
    sealed_repo(local_repo, make_manifest())
    before = sorted(object_keys(local_repo))
    with pytest.raises(KeyRequiredError, match=KEY.key_id):
        guard_writes(keyless, "", "default", "write", lambda: Catalog(keyless).scan()[0])
    assert sorted(object_keys(local_repo)) == before


@pytest.mark.parametrize("source", ["repository", "policy"])
def test_every_writer_refuses_plaintext_before_writing(cli: Any, repo: str, tmp_path: Path, source: str) -> None:
    env: dict[str, str] = {}
    args: list[str] = ["--repo", repo]
    if source == "repository":
        from backup_tool.repository.keyguard import guard_writes

        guard_writes(open_storage(repo, KEY), "", "default", "write")
        sealed_repo(repo, make_manifest())
    else:
        policy = tmp_path / "prod.toml"
        policy.write_text(f'[backup]\nencryption_key_id = "{KEY.key_id}"\n')
        args += ["--policy", str(policy)]
    segment = tmp_path / "000000010000000000000003"
    segment.write_bytes(b"\x01" * 8192)
    before = sorted(object_keys(repo))
    dsn = "postgresql://nobody@127.0.0.1:1/none"
    for command in (["backup", "full", "--dsn", dsn], ["backup", "incremental", "--dsn", dsn],
                    ["backup", "base", "--dsn", dsn], ["wal", "push", str(segment)]):
        proc = cli(*command, *args, env=env)
        line = one_line(proc)
        assert proc.returncode == 1, (command, proc.stderr)
        assert f"requires encryption with key id {KEY.key_id} and no encryption key is configured" in line, line
        assert sorted(object_keys(repo)) == before, command
    wrong = cli("wal", "push", str(segment), *args, env={KEY_ENV: b64(OTHER)})
    if source == "policy":
        assert wrong.returncode == 1 and f"the configured key has id {OTHER.key_id}" in one_line(wrong)
    else:
        assert wrong.returncode == 0, wrong.stderr


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tampering_without_the_key_is_detected_and_refused(
        cli: Any, repo: str, seed_db: Any, fresh_db: Callable[..., Any]) -> None:
    env = {KEY_ENV: b64(KEY)}
    older = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn, env=env)
    newer = cli.json("backup", "full", "--repo", repo, "--dsn", seed_db.dsn, env=env)
    key = manifest_key(newer["id"])
    original = read_object(repo, key)
    body = json.loads(original)
    victim = max((t for t in body["tables"] if t["object"]), key=lambda t: t["object"]["size"])
    victim_object = read_object(repo, victim["object"]["key"])

    def checksum_changed(strip: bool) -> None:
        edited = json.loads(original)
        next(t for t in edited["tables"] if t["name"] == victim["name"])["checksum"] = "0" * 16
        write_object(repo, key, resealed(edited, strip))

    attacks: list[tuple[str, Callable[[], None], Callable[[], None], str]] = [
        ("checksum changed, tag kept", lambda: checksum_changed(False), lambda: write_object(repo, key, original), key),
        ("checksum changed, tag stripped", lambda: checksum_changed(True), lambda: write_object(repo, key, original), key),
        ("table object dropped", lambda: drop_object(repo, victim["object"]["key"]),
         lambda: write_object(repo, victim["object"]["key"], victim_object), victim["object"]["key"]),
        ("older manifest replayed under the newer id",
         lambda: write_object(repo, key, read_object(repo, manifest_key(older["id"]))), lambda: write_object(repo, key, original), key),
    ]
    for what, attack, undo, named in attacks:
        attack()
        verified = cli("verify", "--repo", repo, newer["id"], env=env)
        assert verified.returncode == 3, (what, verified.stdout, verified.stderr)
        assert named in verified.stdout + verified.stderr, what
        target = fresh_db("tamper")
        restored = cli("restore", "full", "--repo", repo, "--backup", newer["id"], "--target-dsn", target.dsn,
                       env=env)
        assert restored.returncode != 0, what
        assert named in one_line(restored), (what, restored.stderr)
        if named == key:
            listed = cli("list", "--repo", repo, "--json", env=env)
            assert listed.returncode == 3 and [e["id"] for e in listed.json()] == [older["id"]], what
            warnings = [json.loads(ln)["event"] for ln in listed.stderr.splitlines() if ln.strip()]
            assert len(warnings) == 1 and warnings[0].startswith(f"refused manifest skipped: manifest {key} "), what
            shown = cli("show", "--repo", repo, newer["id"], env=env)
            assert shown.returncode == 3 and named in one_line(shown), what
        undo()
    assert cli.json("verify", "--repo", repo, newer["id"], env=env)["ok"] is True

    before = sorted(object_keys(repo))
    for command in (["backup", "full", "--dsn", seed_db.dsn], ["backup", "incremental", "--dsn", seed_db.dsn]):
        keyless = cli(*command, "--repo", repo)
        assert keyless.returncode == 1, keyless.stderr
        assert f"requires encryption with key id {KEY.key_id} and no encryption key" in one_line(keyless)
    assert sorted(object_keys(repo)) == before


def test_the_policy_names_a_key_id_or_nothing() -> None:
    from backup_tool.config.policy import parse_policy
    from backup_tool.errors import ConfigError

    assert parse_policy(f'[backup]\nencryption_key_id = "{KEY.key_id}"\n', "p.toml").backup.encryption_key_id \
        == KEY.key_id
    for bad in ("9F2C51E0A4B7D3E1", "9f2c51e0", b64(KEY)):
        with pytest.raises(ConfigError, match="backup.encryption_key_id .* is not a key id"):
            parse_policy(f'[backup]\nencryption_key_id = "{bad}"\n', "p.toml")
