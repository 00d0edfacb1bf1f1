"""Storage backends: atomic visibility, no overwrite, streaming, listing, against real S3 (moto server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import pytest

from backup_tool.errors import StorageError
from backup_tool.repository.storage import ObjectExistsError, ObjectMissingError, Storage, open_storage
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.repository.storage.s3 import MIN_PART, _Held


@pytest.fixture
def storage(repo: str) -> Storage:
    return open_storage(repo)


def test_put_get_list_delete(storage: Storage) -> None:
    r = storage.put("a/b/one", [b"hello ", b"world"])
    assert r.size == 11 and len(r.sha256) == 64
    storage.put_bytes("a/two", b"2")
    assert storage.get_bytes("a/b/one") == b"hello world"
    assert [o.key for o in storage.list("a/")] == ["a/b/one", "a/two"]
    assert storage.exists("a/two")
    storage.delete("a/two")
    assert not storage.exists("a/two")
    storage.delete("a/two")


def test_never_overwrites(storage: Storage) -> None:
    storage.put_bytes("k", b"first")
    with pytest.raises(ObjectExistsError):
        storage.put_bytes("k", b"second")
    assert storage.get_bytes("k") == b"first"


def test_missing_object(storage: Storage) -> None:
    with pytest.raises(ObjectMissingError):
        storage.get_bytes("nope")


def test_multipart_stream_round_trip(storage: Storage) -> None:
    chunk = os.urandom(1 << 20)
    r = storage.put("big", (chunk for _ in range(19)))
    assert r.size == 19 << 20
    got = 0
    for part in storage.get("big"):
        got += len(part)
    assert got == r.size


def test_stream_of_mixed_buffers_is_stored_byte_for_byte(storage: Storage) -> None:
    """Parts are cut across chunks of any type: ``bytes`` held as given, a bytearray its
    producer rewrites after each yield and memoryviews copied on arrival."""
    reused = bytearray(3 << 20)
    expected = bytearray()

    def chunks() -> Iterator[bytes | bytearray | memoryview]:
        for i in range(3):
            data = os.urandom((5 << 20) + 4099 * i)
            expected.extend(data)
            yield data
            reused[:] = os.urandom(len(reused))
            expected.extend(reused)
            yield reused
            view = memoryview(os.urandom(777_777))[11:]
            expected.extend(view)
            yield view
            yield b""

    r = storage.put("mixed", chunks())
    assert r.size == len(expected) and r.sha256 == hashlib.sha256(expected).hexdigest()
    assert b"".join(storage.get("mixed")) == expected


def test_held_chunks_make_parts_with_one_copy_at_most() -> None:
    held = _Held()
    part = os.urandom(MIN_PART)
    held.add(part)
    assert held.take(MIN_PART) is part
    held.add(part[:100])
    held.add(memoryview(part)[100:])
    held.add(b"tail")
    assert held.size == MIN_PART + 4
    assert held.take(MIN_PART - 1) == part[:-1]
    assert held.take(held.size) == part[-1:] + b"tail" and held.size == 0
    assert held.take(0) == b""


def test_chunks_of_any_size_are_stored_byte_for_byte_across_part_boundaries(storage: Storage) -> None:
    """Chunks smaller and larger than a part, one exactly a part, a boundary inside a chunk,
    an empty chunk: the object holds exactly their concatenation, and put's sha256 is its own."""
    sizes = [1, (3 << 20) + 5, 0, 8 << 20, 100 << 10, (9 << 20) + 3, 7, 8 << 20, 12345]
    chunks = [os.urandom(n) for n in sizes]
    whole = b"".join(chunks)
    r = storage.put("odd", iter(chunks))
    assert (r.size, r.sha256) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert storage.get_bytes("odd") == whole
    one = storage.put("one-chunk", [chunks[3]])
    assert storage.get_bytes("one-chunk") == chunks[3] and one.size == 8 << 20


def test_failed_stream_leaves_nothing(storage: Storage) -> None:
    def chunks():
        yield os.urandom(9 << 20)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        storage.put("broken", chunks())
    assert not storage.exists("broken")
    assert [o.key for o in storage.list("broken")] == []


def test_local_partials_are_invisible(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".x.partial-123").write_bytes(b"junk")
    assert list(s.list()) == []
    assert [p.key for p in s.list_partials()] == ["d/.x.partial-123"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "."])
def test_bad_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError):
        LocalStorage(tmp_path).put_bytes(key, b"x")


def test_missing_bucket_is_clear(s3_server: object) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        list(open_storage("s3://no-such-bucket-here/prefix").list())


def test_a_stream_goes_out_in_parts_once_it_outgrows_one_part(s3_repo: str) -> None:
    """A stream beyond :data:`MIN_PART` is uploaded in parts while it is still being produced
    (the first as soon as it outgrew one part), and the object is exactly its bytes."""
    import boto3

    storage = open_storage(s3_repo)
    bucket, prefix = s3_repo[len("s3://"):].split("/", 1)
    client = boto3.client("s3")
    uploading: list[int] = []
    chunks = [os.urandom(1 << 20) for _ in range(11)]

    def stream() -> Iterator[bytes]:
        for n, chunk in enumerate(chunks):
            if n == 10:
                uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/")
                uploading.append(len(uploads.get("Uploads", [])))
            yield chunk

    result = storage.put("data/table.copy.zst", stream())
    assert uploading == [1]
    assert result.size == 11 << 20 and storage.get_bytes("data/table.copy.zst") == b"".join(chunks)


def test_a_stream_that_ends_within_one_part_is_one_put(s3_repo: str) -> None:
    """A streamed object of at most :data:`MIN_PART` bytes (most tables' objects) is one PUT
    sent when it has all arrived (an ETag without a part count), not a multipart upload of
    four requests whose start the producer waits for."""
    import boto3

    storage = open_storage(s3_repo)
    bucket, prefix = s3_repo[len("s3://"):].split("/", 1)
    client = boto3.client("s3")
    for name, size in (("six", 6 << 20), ("whole-part", MIN_PART)):
        chunks = [os.urandom(1 << 20) for _ in range(size >> 20)]
        result = storage.put(f"data/{name}.copy.zst", iter(chunks))
        etag = client.head_object(Bucket=bucket, Key=f"{prefix}/data/{name}.copy.zst")["ETag"].strip('"')
        assert "-" not in etag, name
        assert result.size == size and storage.get_bytes(f"data/{name}.copy.zst") == b"".join(chunks)


def test_what_has_all_arrived_and_fits_a_part_is_one_put(s3_repo: str) -> None:
    """A WAL segment or any object handed over whole, up to a part's size, is one PUT (an
    ETag without a part count), not a multipart upload of three requests; beyond a part's
    size it goes in parts."""
    import boto3

    storage = open_storage(s3_repo)
    bucket, prefix = s3_repo[len("s3://"):].split("/", 1)
    client = boto3.client("s3")
    for name, size, parts in (("seven", 7 << 20, None), ("whole-part", MIN_PART, None), ("nine", 9 << 20, 2)):
        data = os.urandom(size)
        storage.put_bytes(f"wal/{name}", data)
        etag = client.head_object(Bucket=bucket, Key=f"{prefix}/wal/{name}")["ETag"].strip('"')
        assert (int(etag.split("-")[1]) if "-" in etag else None) == parts, name
        assert storage.get_bytes(f"wal/{name}") == data


def test_syncing_names_passes_over_a_directory_whose_objects_were_all_deleted(tmp_path: Path) -> None:
    """An incremental deletes the copy of a table it dumped early and then found unchanged
    (deleting an object removes the directories it leaves empty); committing it syncs the
    names under its prefix, that directory no longer among them."""
    storage = LocalStorage(tmp_path / "repo")
    storage.defer_name_sync("backups/x/")
    storage.put_bytes("backups/x/data/t.zst", b"early")
    storage.put_bytes("backups/x/schema.zst", b"kept")
    storage.delete("backups/x/data/t.zst")
    assert not (tmp_path / "repo" / "backups" / "x" / "data").exists()
    storage.sync_names("backups/x/")
    assert storage.get_bytes("backups/x/schema.zst") == b"kept"
