"""The framed base backup tar and its index (backup_tool.physical.basetar), ranged reads
(local, encrypted, S3) and the partial lay-out's pure decisions (backup_tool.physical.partial).

Fast: synthetic tars built with tarfile, no PostgreSQL."""

from __future__ import annotations

import io
import os
import pwd
import random
import tarfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from support.manifests import make_manifest

from backup_tool.core.report import NullReporter
from backup_tool.errors import IntegrityError, RefusedError
from backup_tool.physical import basetar, partial, pitr
from backup_tool.physical.basetar import Member
from backup_tool.repository.manifest import StoredObject
from backup_tool.repository.storage import open_storage
from backup_tool.repository.storage.encrypted import EncryptedStorage, EncryptionKey
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.streams import pipeline

KEY = EncryptionKey(bytes(range(32)))


def make_tar(files: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        dirs = sorted({str(Path(name).parent) for name, _ in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o700
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def cluster_like(rnd: random.Random) -> list[tuple[str, bytes]]:
    """Catalog-sized files between big relation files, a long path, an empty file."""
    files = [("PG_VERSION", b"15\n"), ("global/pg_control", rnd.randbytes(8192)), ("base/5/PG_VERSION", b"15\n")]
    for i in range(40):
        files.append((f"base/5/{1200 + i}", (rnd.randbytes(64) * 128)[: rnd.choice([0, 8192, 16384, 40960])]))
        if i % 10 == 3:
            files.append((f"base/5/{16384 + i}", rnd.randbytes(rnd.randint(33, 48) << 15)))
    files.append(("base/5/" + "x" * 120, b"long name"))
    return files


def chunked(data: bytes, rnd: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rnd.choice([1, 100, 511, 512, 513, 8192, 1 << 20, 3 << 20])
        out.append(data[pos:pos + n])
        pos += n
    return out


def framed(raw: bytes, rnd: random.Random) -> tuple[bytes, basetar.TarIndex]:
    fc = basetar.FramedCompressor(3, pipeline.StreamStats())
    stored = b"".join(fc.compress(chunked(raw, rnd)))
    return stored, fc.index({})


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_framed_stream_is_the_tar_and_the_index_finds_every_member(seed: int, fmt: int) -> None:
    rnd = random.Random(seed)
    raw = make_tar(cluster_like(rnd), fmt)
    stored, index = framed(raw, rnd)
    assert b"".join(pipeline.decompress([stored], "k")) == raw
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = {m.name: m for m in tar.getmembers()}
        by_name = {m.name: m for m in index.members}
        assert set(by_name) == set(expected)
        for name, m in by_name.items():
            ref = expected[name]
            assert m.kind == ("d" if ref.isdir() else "f")
            if ref.isfile():
                assert raw[m.data_offset:m.data_offset + m.size] == tar.extractfile(ref).read()
                assert (m.mode, m.mtime) == (ref.mode, ref.mtime)
    starts = [f.raw_start for f in index.frames]
    assert starts[0] == 0 and all(a.raw_start + a.raw_size == b.raw_start for a, b in zip(index.frames, index.frames[1:], strict=False))
    assert sum(f.size for f in index.frames) == len(stored)
    for m in index.members:
        if m.kind == "f" and m.size >= basetar.BIG_MEMBER:
            assert m.data_offset - 512 in starts, f"big member {m.name} shares a frame"


def test_frames_cost_little_against_one_frame() -> None:
    rnd = random.Random(7)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    single = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw)
    assert len(index.frames) > 5
    assert len(stored) <= len(single) * 1.05


def test_multi_frame_objects_decompress_whole() -> None:
    parts = [zstandard.ZstdCompressor().compress(os.urandom(3000) * 400), zstandard.ZstdCompressor().compress(b"end")]
    assert b"".join(pipeline.decompress(parts, "k")) == zstandard.ZstdDecompressor().decompressobj(
        read_across_frames=True).decompress(b"".join(parts))


def collector(workers: int) -> tuple[dict[str, bytearray], Callable[[Member, int, bytes | memoryview], None]]:
    """Members' bytes as ``extract`` hands them over: in order with one worker, in any
    order across frames (each byte once) with several."""
    got: dict[str, bytearray] = {}
    seen: dict[str, set[int]] = {}
    lock = threading.Lock()

    def write(m: Member, offset: int, data: bytes | memoryview) -> None:
        with lock:
            buf = got.setdefault(m.name, bytearray(m.size) if workers > 1 else bytearray())
            if workers == 1:
                assert len(buf) == offset
                buf += data
                return
            assert not seen.setdefault(m.name, set()) & set(range(offset, offset + len(data)))
            seen[m.name] |= set(range(offset, offset + len(data)))
            buf[offset:offset + len(data)] = data
    return got, write


@pytest.mark.parametrize("encrypted,workers", [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_extract_reads_only_the_frames_of_the_wanted_files(tmp_path: Path, encrypted: bool, workers: int) -> None:
    rnd = random.Random(3)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    storage = EncryptedStorage(LocalStorage(tmp_path), KEY if encrypted else None)
    result = storage.put("backups/b/base.tar.zst", [stored])
    small = [m for m in index.members if m.kind == "f" and m.size < basetar.BIG_MEMBER]
    got, write = collector(workers)
    fetched = basetar.extract(storage, "backups/b/base.tar.zst", result.size, index, small, write, merge_gap=0,
                              workers=workers)
    assert {n: bytes(v) for n, v in got.items()} == {m.name: raw[m.data_offset:m.data_offset + m.size]
                                                     for m in small if m.size}
    assert fetched < len(stored) / 2


@pytest.mark.parametrize("workers", [1, 3])
def test_a_damaged_frame_is_refused(tmp_path: Path, workers: int) -> None:
    rnd = random.Random(5)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    frame = next(f for f in index.frames if f.size > 100)
    damaged = bytearray(stored)
    damaged[frame.offset + frame.size // 2] ^= 0x40
    storage = LocalStorage(tmp_path)
    storage.put("b/base.tar.zst", [bytes(damaged)])
    member = next(m for m in index.members if m.kind == "f" and m.size
                  and frame.raw_start <= m.data_offset < frame.raw_start + frame.raw_size)
    written: list[int] = []
    with pytest.raises(IntegrityError, match="corrupt at frame"):
        basetar.extract(storage, "b/base.tar.zst", len(damaged), index, [member],
                        lambda m, offset, data: written.append(len(data)), workers=workers)
    if workers > 1:
        assert written == [], "a frame decompressed whole is written only once its sha256 matched"


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_read_only_between_wanted_ones_are_not_decompressed(tmp_path: Path, workers: int) -> None:
    """Runs of frames are merged into one read across small gaps; the frames in between are
    passed over: a damaged one there does not matter, the wanted files come out exact."""
    rnd = random.Random(11)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    files = [m for m in index.members if m.kind == "f" and m.size]
    first, between, last = (basetar.frames_for(index.frames, [(m.data_offset, m.data_offset + m.size)])
                            for m in (files[0], files[len(files) // 2], files[-1]))
    wanted = [m for m in files if basetar.frames_for(index.frames, [(m.data_offset, m.data_offset + m.size)])
              <= first | last]
    skipped = sorted(between - first - last)
    assert skipped and all(min(first) < i < max(last) for i in skipped)
    damaged = bytearray(stored)
    for i in skipped:
        damaged[index.frames[i].offset + index.frames[i].size // 2] ^= 0x40
    storage = LocalStorage(tmp_path)
    storage.put("b/base.tar.zst", [bytes(damaged)])
    got, write = collector(workers)
    fetched = basetar.extract(storage, "b/base.tar.zst", len(damaged), index, wanted, write,
                              merge_gap=len(stored), workers=workers)
    assert fetched == len(stored)
    assert {n: bytes(v) for n, v in got.items()} == {m.name: raw[m.data_offset:m.data_offset + m.size]
                                                     for m in wanted}


def test_index_round_trips_through_json() -> None:
    rnd = random.Random(9)
    _, index = framed(make_tar(cluster_like(rnd)), rnd)
    relations = partial.relations_to_json([DB])
    again = basetar.TarIndex.from_json(basetar.TarIndex(index.frames, index.members, relations).to_json())
    assert (again.frames, again.members) == (index.frames, index.members)
    assert partial.relations_from_json(again.relations) == {DB.oid: DB}


def test_ranged_reads_on_s3(s3_repo: str) -> None:
    data = os.urandom(50_000)
    for key in (None, KEY):
        storage = open_storage(s3_repo, key)
        put = storage.put(f"backups/x/{'enc' if key else 'plain'}", [data])
        for lo, hi in ((0, 1), (100, 20_000), (49_990, 50_000), (0, 50_000)):
            assert storage.get_range(put.key, lo, hi, put.size) == data[lo:hi]


# --------------------------------------------------------------------------- partial lay-out decisions

R = partial.Relation
DB = partial.DatabaseRelations(16384, "app", (
    R(16390, 16390, "r", "public", "orders", 0, ()),
    R(16393, 16393, "t", "pg_toast", "pg_toast_16390", 16390, ()),
    R(16395, 16395, "i", "pg_toast", "pg_toast_16390_index", 16393, ()),
    R(16396, 16396, "i", "public", "orders_pkey", 16390, ()),
    R(16397, 16397, "S", "public", "orders_id_seq", 0, ()),
    R(16400, 16400, "p", "public", "events", 0, ()),
    R(16401, 16401, "r", "public", "events_2025", 0, (16400,)),
    R(16402, 16402, "i", "public", "events_2025_idx", 16401, ()),
    R(16410, 16410, "r", "public", "noise", 0, ()),
    R(16411, 16411, "i", "public", "noise_pkey", 16410, ()),
    R(16420, 16430, "m", "public", "summary", 0, ()),
    R(16421, 16421, "r", "public", "Orders", 0, ()),
))
OTHER = partial.DatabaseRelations(16500, "other", (R(16501, 16501, "r", "public", "orders", 0, ()),))


def member(name: str, size: int = 8192) -> Member:
    return Member(name, "f", 0, size, 0o600, 0)


def test_needed_brings_toast_indexes_and_partitions() -> None:
    assert partial.needed(DB, [(None, "orders")]) == {16390, 16393, 16395, 16396}
    assert partial.needed(DB, [("public", "events")]) == {16400, 16401, 16402}
    assert partial.needed(DB, [(None, "Orders")]) == {16421}
    assert partial.needed(DB, [(None, "ORDERS")]) == {16390, 16393, 16395, 16396, 16421}
    assert partial.needed(DB, [(None, "missing")]) == frozenset()


def test_choose_leaves_only_unneeded_user_relations_sparse() -> None:
    names = ["global/1262", "global/pg_control", "base/16384/1259", "base/16384/pg_filenode.map",
             "base/16384/16390", "base/16384/16390.1", "base/16384/16390_fsm", "base/16384/16393",
             "base/16384/16395", "base/16384/16396", "base/16384/16397", "base/16384/16410",
             "base/16384/16410.2", "base/16384/16410_vm", "base/16384/16410_init", "base/16384/16411",
             "base/16384/16430", "base/16384/16420", "base/16384/99999", "base/16500/16501", "base/16600/16501",
             "PG_VERSION", "pg_xact/0000"]
    keep = {16384: partial.needed(DB, [(None, "orders")])}
    choice = partial.choose([member(n) for n in names], {16384: DB, 16500: OTHER}, keep)
    assert sorted(m.name for m in choice.sparse) == [
        "base/16384/16410", "base/16384/16410.2", "base/16384/16410_vm", "base/16384/16411", "base/16384/16430",
        "base/16500/16501"]
    assert choice.sparse_files == {(16384, 16410), (16384, 16411), (16384, 16430), (16500, 16501)}
    assert len(choice.full) == len(names) - 6


def test_choose_leaves_out_the_relation_files_of_databases_nothing_connects_to() -> None:
    names = ["global/1262", "base/1/PG_VERSION", "base/1/pg_filenode.map", "base/1/1259", "base/1/1259_fsm",
             "base/1/16384_init", "base/1/16384", "base/5/1259", "base/16384/1259", "base/16384/16390",
             "base/16384/16410", "base/16500/16501", "base/16500/2600"]
    keep = {16384: partial.needed(DB, [(None, "orders")])}
    choice = partial.choose([member(n) for n in names], {16384: DB, 16500: OTHER}, keep, frozenset({1, 16500}))
    assert sorted(m.name for m in choice.left_out) == [
        "base/1/1259", "base/1/1259_fsm", "base/1/16384", "base/16500/16501", "base/16500/2600"]
    assert [m.name for m in choice.sparse] == ["base/16384/16410"]
    assert sorted(m.name for m in choice.full) == [
        "base/1/16384_init", "base/1/PG_VERSION", "base/1/pg_filenode.map", "base/16384/1259", "base/16384/16390",
        "base/5/1259", "global/1262"]
    assert choice.sparse_files == {(1, 1259), (1, 16384), (16500, 16501), (16500, 2600), (16384, 16410)}
    assert partial.unexplained_invalid_pages("page 2 of relation base/1/1259 does not exist", choice.sparse_files) == []


def test_choose_for_a_table_request_writes_no_free_space_or_visibility_map() -> None:
    names = ["global/1262", "global/1262_vm", "base/16384/1259", "base/16384/1259_fsm", "base/16384/1259_vm",
             "base/16384/16390", "base/16384/16390_fsm", "base/16384/16390_vm", "base/16384/16410",
             "base/16384/16410_vm", "base/16384/16410_init", "base/16500/16501", "base/16500/16501_fsm"]
    keep = {16384: partial.needed(DB, [(None, "orders")])}
    choice = partial.choose([member(n) for n in names], {16384: DB, 16500: OTHER}, keep, frozenset({16500}), lean=True)
    assert sorted(m.name for m in choice.maps_left_out) == [
        "base/16384/1259_fsm", "base/16384/1259_vm", "base/16384/16390_fsm", "base/16384/16390_vm",
        "base/16384/16410_vm", "global/1262_vm"]
    assert sorted(m.name for m in choice.full) == [
        "base/16384/1259", "base/16384/16390", "base/16384/16410_init", "global/1262"]
    assert [m.name for m in choice.sparse] == ["base/16384/16410"]
    assert sorted(m.name for m in choice.left_out) == ["base/16500/16501", "base/16500/16501_fsm"]
    assert choice.sparse_files == {(16384, 16410), (16500, 16501)}, "a catalog's or target's main fork stays checked"
    assert partial.unexplained_invalid_pages("page 2 of relation base/16384/1259 does not exist",
                                             choice.sparse_files) == ["base/16384/1259"]
    assert partial.choose([member(n) for n in names], {16384: DB}, keep).maps_left_out == ()


def test_a_catalog_moved_by_vacuum_full_stays_full() -> None:
    db = partial.DatabaseRelations(1, "x", (R(1259, 16999, "r", "pg_catalog", "pg_class", 0, ()),))
    assert partial.choose([member("base/1/16999")], {1: db}, {}).sparse == ()


def test_invalid_pages_outside_sparse_files_are_reported() -> None:
    log = ("WARNING:  page 3 of relation base/16384/16410 is uninitialized\n"
           "WARNING:  page 0 of relation base/16384/16410_vm does not exist\n"
           "WARNING:  page 7 of relation base/16384/16390 is uninitialized\n"
           "WARNING:  page 1 of relation global/1262 does not exist\n")
    sparse = frozenset({(16384, 16410)})
    assert partial.unexplained_invalid_pages(log, sparse) == ["base/16384/16390", "global/1262"]
    assert partial.unexplained_invalid_pages(log.splitlines()[0], sparse) == []


def test_missed_files_names_targets_left_sparse_and_new_databases() -> None:
    choice = partial.choose([member("base/16384/16410"), member("base/16384/16390")], {16384: DB},
                            {16384: partial.needed(DB, [(None, "orders")])})
    in_backup = frozenset({16384})
    assert partial.missed_files(16384, [16390, 17000], choice, in_backup) == []
    assert partial.missed_files(16384, [16410, 16390], choice, in_backup) == ["base/16384/16410"]
    assert partial.missed_files(20000, [1], choice, in_backup) == ["database oid 20000 was created after the backup"]
    full = partial.choose([member("base/16384/16410")], {}, {})
    assert partial.missed_files(20000, [1], full, in_backup) == []


def test_databases_in_backup() -> None:
    members = [Member("base", "d", 0, 0, 0o700, 0), Member("base/1", "d", 0, 0, 0o700, 0),
               Member("base/16384", "d", 0, 0, 0o700, 0), member("base/16384/1")]
    assert partial.databases_in(members) == {1, 16384}


class Events:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def event(self, message: str, **fields: object) -> None:
        self.seen.append(message)


def test_a_base_backup_without_index_is_laid_out_whole(tmp_path: Path) -> None:
    old = replace(make_manifest(kind="base"), tables=(), extra_objects=(
        StoredObject("backups/x/base.tar.zst", 10, "a" * 64, 30),))
    events = Events()
    request = pitr.PartialRequest("app", ((None, "orders"),))
    assert pitr._partial_choice(LocalStorage(tmp_path), old, request, events) is None  # type: ignore[arg-type]
    assert events.seen and "no index" in events.seen[0]


def test_big_members_span_frames_compressed_alike_on_any_number_of_threads(tmp_path: Path) -> None:
    """A member over FRAME_MAX is cut into frames of at most FRAME_MAX raw bytes; the stored
    object and its index are byte-identical whether one thread or several compress, and a
    range inside the big member reads back through the index."""
    rnd = random.Random(11)
    big = b"".join(rnd.randbytes(256) * 64 for _ in range(1300))  # ~21 MiB, compressible
    files = [("PG_VERSION", b"15\n"), ("base/5/16384", big), ("base/5/1259", rnd.randbytes(8192)),
             ("global/pg_control", rnd.randbytes(8192))]
    raw = make_tar(files)
    chunks = chunked(raw, random.Random(2))
    results = []
    for workers in (1, 3):
        fc = basetar.FramedCompressor(3, pipeline.StreamStats(), workers=workers)
        results.append((b"".join(fc.compress(iter(chunks))), fc.index({})))
    (stored, index), (stored_par, index_par) = results
    assert stored_par == stored and index_par.to_json() == index.to_json()
    assert b"".join(pipeline.decompress([stored], "k")) == raw
    assert max(f.raw_size for f in index.frames) <= basetar.FRAME_MAX
    member = next(m for m in index.members if m.name == "base/5/16384")
    inside = [f for f in index.frames if member.data_offset <= f.raw_start < member.data_offset + member.size]
    assert len(inside) >= 2
    storage = LocalStorage(tmp_path)
    result = storage.put("backups/b/base.tar.zst", [stored])
    got = bytearray()
    part = replace(member, data_offset=member.data_offset + (9 << 20), size=5 << 20)
    basetar.extract(storage, "backups/b/base.tar.zst", result.size, index, [part],
                    lambda m, offset, data: got.extend(data))
    assert bytes(got) == big[9 << 20:14 << 20]


def whole_layout(stored: bytes, index: basetar.TarIndex, workers: int) -> dict[str, bytes]:
    got: dict[str, bytearray] = {}
    lock = threading.Lock()

    def write(m: Member, offset: int, data: memoryview) -> None:
        with lock:
            buf = got.setdefault(m.name, bytearray(m.size))
            buf[offset:offset + len(data)] = data

    pieces = [stored[i:i + 300_001] for i in range(0, len(stored), 300_001)]
    basetar.extract_whole(iter(pieces), "k", index, write, workers)
    return {n: bytes(v) for n, v in got.items()}


@pytest.mark.parametrize("workers", [1, 3])
def test_the_whole_object_lays_out_every_file_exactly_on_any_number_of_threads(workers: int) -> None:
    rnd = random.Random(13)
    files = [*cluster_like(rnd), ("base/5/16390", b"".join(rnd.randbytes(200) * 90 for _ in range(1000)))]
    raw = make_tar(files)
    fc = basetar.FramedCompressor(3, pipeline.StreamStats(), workers=2)
    stored = b"".join(fc.compress(chunked(raw, rnd)))
    index = fc.index({})
    assert basetar.parallel_readable(index)
    assert whole_layout(stored, index, workers) == {name: data for name, data in files if data}


def test_whole_lay_out_refuses_a_damaged_or_cut_object_and_older_big_frames() -> None:
    rnd = random.Random(17)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    frame = index.frames[len(index.frames) // 2]
    damaged = bytearray(stored)
    damaged[frame.offset + frame.size // 2] ^= 0x40
    with pytest.raises(IntegrityError, match=f"corrupt at frame {len(index.frames) // 2}: sha256"):
        whole_layout(bytes(damaged), index, 2)
    with pytest.raises(IntegrityError, match="ends before frame"):
        whole_layout(stored[:frame.offset], index, 2)
    with pytest.raises(IntegrityError, match="longer than its index"):
        whole_layout(stored + b"x", index, 2)
    old_style = replace(index, frames=(*index.frames[:-1], replace(index.frames[-1], raw_size=basetar.FRAME_MAX + 1)))
    assert basetar.parallel_readable(index) and not basetar.parallel_readable(old_style)
    gap = replace(index, frames=(index.frames[0], replace(index.frames[1], offset=index.frames[1].offset + 1)))
    assert not basetar.parallel_readable(gap)



@pytest.mark.parametrize("delta", [-1, 1])
def test_a_frame_holding_other_than_its_recorded_raw_size_is_refused(delta: int) -> None:
    """The frame's stored bytes match their sha256 (the index was written with another raw
    size): decompressing into the thread's reusable buffer still finds the size wrong, one
    byte more or less, and nothing of that frame is written."""
    rnd = random.Random(19)
    raw = make_tar(cluster_like(rnd))
    stored, index = framed(raw, rnd)
    k = len(index.frames) // 2
    frames = list(index.frames)
    frames[k] = replace(frames[k], raw_size=frames[k].raw_size + delta)
    for j in range(k + 1, len(frames)):
        frames[j] = replace(frames[j], raw_start=frames[j].raw_start + delta)
    with pytest.raises(IntegrityError, match=f"corrupt at frame {k}: "):
        whole_layout(stored, replace(index, frames=tuple(frames)), 1)


def stored_backup(tmp_path: Path, files: list[tuple[str, bytes]], with_index: bool,
                  encrypted: bool = False) -> tuple[EncryptedStorage, Any]:
    """A base backup's tar and (``with_index``) its index in a local repository, and its manifest."""
    rnd = random.Random(23)
    raw = make_tar(files)
    fc = basetar.FramedCompressor(3, pipeline.StreamStats(), workers=2)
    stored = b"".join(fc.compress(chunked(raw, rnd)))
    storage = EncryptedStorage(LocalStorage(tmp_path / "repo"), KEY if encrypted else None)
    tar = storage.put("backups/x/base.tar.zst", [stored])
    objects = [StoredObject(tar.key, tar.size, tar.sha256, len(raw))]
    if with_index:
        index = storage.put("backups/x/" + basetar.INDEX_KEY, pipeline.compress([fc.index({}).to_json()], 3, 0,
                                                                               pipeline.StreamStats()))
        objects.append(StoredObject(index.key, index.size, index.sha256, 0))
    return storage, replace(make_manifest(kind="base"), tables=(), extra_objects=tuple(objects))


def tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, int(p.stat().st_mtime) if p.is_file() else 0,
                                       p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_parallel_lay_out_writes_what_the_tar_reader_writes(tmp_path: Path, encrypted: bool) -> None:
    """Files, directories, modes, dates and content are the same whether a backup is laid out
    frame by frame in parallel (index) or through the tar reader (no index, older backups)."""
    rnd = random.Random(29)
    files = [*cluster_like(rnd), ("base/5/16500", b"".join(rnd.randbytes(100) * 50 for _ in range(2000)))]
    user = pwd.getpwuid(os.getuid()).pw_name
    laid: list[dict[str, tuple[int, int, bytes | None]]] = []
    for with_index in (True, False):
        storage, manifest = stored_backup(tmp_path / str(with_index), files, with_index, encrypted)
        pgdata = tmp_path / str(with_index) / "data"
        pgdata.mkdir()
        if with_index:
            index = manifest.extra_objects[1]
            assert basetar.parallel_readable(basetar.load_index(storage, index.key, index.sha256, index.size))
        written = pitr.extract_base(storage, manifest, pgdata, user, NullReporter(), workers=3)
        assert written == sum(len(data) for _, data in files)
        laid.append(tree(pgdata))
    assert laid[0] == laid[1] and laid[0]["base/5/16500"][2] == files[-1][1]



@pytest.mark.parametrize("size", [0, 8192])
def test_an_index_naming_a_file_twice_is_refused_before_anything_is_written(tmp_path: Path, size: int) -> None:
    """Files are created by their first write, so creating one twice can no longer refuse
    the lay-out (it did, with O_EXCL, when every file was created up front): the index is
    checked for duplicates first, and nothing but the directories is made."""
    rnd = random.Random(37)
    storage, manifest = stored_backup(tmp_path, cluster_like(rnd), True)
    obj = manifest.extra_objects[1]
    index = basetar.load_index(storage, obj.key, obj.sha256, obj.size)
    twice = next(m for m in index.members if m.kind == "f" and m.size == size)
    forged = replace(index, members=(*index.members, twice))
    pgdata = tmp_path / "data"
    pgdata.mkdir()
    with pytest.raises(IntegrityError, match=f"names {twice.name} twice"):
        pitr.extract_frames(storage, manifest, forged, pgdata, pwd.getpwuid(os.getuid()).pw_name, NullReporter(),
                            workers=2)
    assert not [p for p in pgdata.rglob("*") if p.is_file()]



@pytest.mark.parametrize("size", [0, 8192])
def test_the_parallel_lay_out_never_writes_through_a_symbolic_link(tmp_path: Path, size: int) -> None:
    """A file is created by its first write (or, empty, by a thread of its own): a symbolic
    link planted where it goes fails the lay-out instead of receiving the data."""
    rnd = random.Random(41)
    storage, manifest = stored_backup(tmp_path, cluster_like(rnd), True)
    obj = manifest.extra_objects[1]
    index = basetar.load_index(storage, obj.key, obj.sha256, obj.size)
    victim = next(m for m in index.members if m.kind == "f" and m.size == size)
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    pgdata = tmp_path / "data"
    (pgdata / victim.name).parent.mkdir(parents=True)
    (pgdata / victim.name).symlink_to(outside)
    with pytest.raises(OSError):
        pitr.extract_frames(storage, manifest, index, pgdata, pwd.getpwuid(os.getuid()).pw_name, NullReporter(),
                            workers=2)
    assert outside.read_bytes() == b"untouched"


def test_a_failing_guard_stops_the_parallel_lay_out(tmp_path: Path) -> None:
    rnd = random.Random(31)
    storage, manifest = stored_backup(tmp_path, cluster_like(rnd), True)
    calls: list[int] = []

    def guard() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RefusedError("OS user postgres cannot run backup-tool")

    (tmp_path / "data").mkdir()
    with pytest.raises(RefusedError, match="cannot run"):
        pitr.extract_base(storage, manifest, tmp_path / "data", pwd.getpwuid(os.getuid()).pw_name, NullReporter(),
                          workers=2, guard=guard)
    assert len(calls) == 2
