"""Data page checksums as PostgreSQL computes and pg_basebackup verifies them: every page of
the catalogs of a real cluster initdb'd with --data-checksums verifies with its stored
pd_checksum, a flipped byte or a wrong block number fails, the vectorised checksum equals a
line-by-line transcription of checksum_impl.h, and the copy's piece logic (pages straddling
two pieces, new pages, pages written after the backup's start, a torn read fixed by the
re-read, a partial last page) matches basebackup.c."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support.clusters import PgServer, find_pg_bin_dir, server_os_user

from backup_tool.errors import PageChecksumError
from backup_tool.physical import pagecheck
from backup_tool.physical.basebackup import explain_basebackup_error
from backup_tool.physical.basedirect import PIECE, DirectBackup, checksum_error, list_files
from backup_tool.physical.pagecheck import Failure, PageVerifier, page_checksums, relation_segment
from backup_tool.postgres.connection import ConnInfo

BLCKSZ = 8192
ROOT = Path(__file__).resolve().parents[2]


def reference_checksum(page: bytes, blkno: int) -> int:
    """pg_checksum_page, transcribed from checksum_impl.h one step at a time."""
    raw = bytearray(page)
    raw[8:10] = b"\0\0"
    words = [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw), 4)]
    sums = [int(x) for x in pagecheck.BASE_OFFSETS]

    def comp(checksum: int, value: int) -> int:
        tmp = checksum ^ value
        return ((tmp * 16777619) & 0xFFFFFFFF) ^ (tmp >> 17)

    for i in range(len(words) // 32):
        for j in range(32):
            sums[j] = comp(sums[j], words[i * 32 + j])
    for _ in range(2):
        for j in range(32):
            sums[j] = comp(sums[j], 0)
    result = 0
    for s in sums:
        result ^= s
    return ((result ^ blkno) % 65535) + 1


@pytest.fixture(scope="module")
def checksummed_catalogs() -> Iterator[Path]:
    """The data directory of a real cluster initdb'd with --data-checksums (never started:
    its catalogs were written, with checksums, by initdb's bootstrap)."""
    base = Path(tempfile.mkdtemp(prefix="backuptool-pgcsum-", dir="/tmp"))
    base.chmod(0o755)
    server = PgServer(find_pg_bin_dir(), server_os_user(), base, 0, secrets.token_hex(8),
                      initdb_args=("--data-checksums",))
    try:
        server.init()
        yield server.data_dir
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _relation_pages(root: Path) -> list[tuple[str, bytes]]:
    files = []
    for path in sorted([*root.glob("base/*/*"), *root.glob("global/*")]):
        rel = path.relative_to(root).as_posix()
        if relation_segment(rel) is not None and path.stat().st_size:
            files.append((rel, path.read_bytes()))
    return files


def test_relation_files_are_those_basebackup_verifies() -> None:
    assert [relation_segment(p) for p in ("base/5/16384", "base/5/16384.3", "base/5/16384_fsm", "base/5/16384_vm.1",
                                          "base/5/16384_init", "global/1262", "global/1262.12")] == [0, 3, 0, 1, 0, 0, 12]
    for path in ("global/pg_control", "global/pg_filenode.map", "global/pg_internal.init", "base/5/PG_VERSION",
                 "base/5/pg_filenode.map", "base/5/pg_internal.init", "base/5/t3_16384", "base/5/16384_main",
                 "base/5/0", "base/5/16384.", "base/16384", "pg_xact/0000", "base/5/sub/16384",
                 "pg_tblspc/16500/PG_15_202209061/5/16384", "base/x/16384", "base/5/99999999999"):
        assert relation_segment(path) is None, path


def test_real_pages_verify_and_a_flipped_byte_or_moved_page_fails(checksummed_catalogs: Path) -> None:
    files = _relation_pages(checksummed_catalogs)
    verifier = PageVerifier(start_lsn=1 << 63)
    total = 0
    for rel, data in files:
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLCKSZ)
        verified, bad = verifier.bad_pages(pages, 0)
        assert bad == [], rel
        total += verified
    assert total > 1000, "the catalogs of a fresh cluster hold over a thousand pages"

    rel, data = max(files, key=lambda f: len(f[1]))
    pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, BLCKSZ)
    stored = pages.view(np.uint16)[:, 4]
    blocks = np.arange(len(pages), dtype=np.uint32)
    new = pages.view(np.uint16)[:, 7] == 0
    assert (page_checksums(pages.view(np.uint32), blocks)[~new] == stored[~new]).all()
    first = bytes(pages[0])
    assert reference_checksum(first, 0) == int(stored[0])
    assert reference_checksum(bytes(pages[3]), 3) == int(stored[3])

    for offset in (100, 4000, BLCKSZ - 1):
        damaged = bytearray(data)
        damaged[2 * BLCKSZ + offset] ^= 0x10
        _, bad = verifier.bad_pages(np.frombuffer(bytes(damaged), dtype=np.uint8).reshape(-1, BLCKSZ), 0)
        assert [(i, s) for i, _, s in bad] == [(2, int(stored[2]))]
        assert bad[0][1] == reference_checksum(bytes(damaged[2 * BLCKSZ:3 * BLCKSZ]), 2)
    _, moved = verifier.bad_pages(pages[1:4], 0)
    assert [i for i, _, _ in moved] == [0, 1, 2], "the block number is part of the checksum"


def test_vectorised_checksum_equals_the_reference_for_any_block_number() -> None:
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, size=(5, BLCKSZ), dtype=np.uint8)
    blocks = np.array([0, 1, 131072 * 3 + 17, 0xFFFFFFFF, 65535], dtype=np.uint32)
    got = page_checksums(pages.view(np.uint32), blocks)
    assert [int(x) for x in got] == [reference_checksum(bytes(p), int(b)) for p, b in zip(pages, blocks, strict=True)]
    small = rng.integers(0, 256, size=(2, 4096), dtype=np.uint8)
    assert [int(x) for x in page_checksums(small.view(np.uint32), np.array([9, 10], dtype=np.uint32))] == \
        [reference_checksum(bytes(small[0]), 9), reference_checksum(bytes(small[1]), 10)]


def _page(rng: np.random.Generator, block: int, lsn: int) -> bytearray:
    page = bytearray(rng.integers(0, 256, size=BLCKSZ, dtype=np.uint8).tobytes())
    page[0:4] = (lsn >> 32).to_bytes(4, sys.byteorder)
    page[4:8] = (lsn & 0xFFFFFFFF).to_bytes(4, sys.byteorder)
    page[14:16] = (4000).to_bytes(2, sys.byteorder)
    arr = np.frombuffer(bytes(page), dtype=np.uint32).reshape(1, -1)
    page[8:10] = int(page_checksums(arr, np.array([block], dtype=np.uint32))[0]).to_bytes(2, sys.byteorder)
    return page


@pytest.mark.parametrize("jobs", [1, 3])
def test_the_copy_verifies_every_page_as_basebackup_does(tmp_path: Path, jobs: int) -> None:
    """A second segment (block numbers from 131072 on) of 1100 pages copied in three pieces:
    the pages straddling the pieces' ends are verified too, new pages and pages written after
    the backup's start are skipped, damaged pages are named by their relation block number."""
    rng = np.random.default_rng(jobs)
    start = 0x3_0000_0000
    root = tmp_path / "data"
    (root / "base" / "5").mkdir(parents=True)
    count = 1100
    pages = [_page(rng, 131072 + b, 0x2_0000_0000 + b) for b in range(count)]
    pages[0] = bytearray(BLCKSZ)
    pages[1][100] ^= 1
    pages[7] = _page(rng, 0, start + 5)
    straddling = (PIECE - 512) // BLCKSZ
    assert (straddling + 1) * BLCKSZ > PIECE - 512
    for damaged in (straddling, 700, 1099):
        pages[damaged][5000] ^= 0x80
    pages[900][8:10] = b"\0\0"
    content = b"".join(pages)
    (root / "base/5/16384.1").write_bytes(content)
    (root / "base/5/16384_fsm").write_bytes(content[:3 * BLCKSZ])
    (root / "base/5/pg_filenode.map").write_bytes(bytes(pages[1])[:512])
    (root / "base/5/16390").write_bytes(content[:BLCKSZ] + bytes(pages[2][:100]))
    warnings: list[str] = []
    copy = DirectBackup(ConnInfo(), root, 15, 1, "test", True, jobs, warnings.append, verify_checksums=True)
    copy.verifier = PageVerifier(start)
    listed: list[tuple[str, int, int]] = []
    raw = b"".join(copy._members(list_files(root, 15, lambda _: None), listed)) + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert stored["base/5/16384.1"] == content
    assert copy.checksum_failures == {"base/5/16384.1": [131072 + b for b in (1, straddling, 700, 900, 1099)],
                                      "base/5/16384_fsm": [1, 2]}
    assert copy.pages_verified == (count - 2) + 2, "a new page (0) and one written since the start (7) are skipped"
    assert warnings[0].startswith("checksum verification failed in file base/5/16384.1, block 131073: calculated ")
    assert "could not verify the checksum of the last page of base/5/16390" in warnings[-1]
    error = checksum_error(copy.checksum_failures)
    assert error.exit_code == 1 and error.hint and "damaged" in error.hint
    assert error.message.startswith("checksum verification failed for 7 pages in 2 files of the cluster: "
                                    "base/5/16384.1 (blocks 131073, 131583, 131772, ...); base/5/16384_fsm (blocks 1, 2)")
    assert len(error.pages) == 7 and error.pages[0] == ("base/5/16384.1", 131073)


def test_a_torn_read_is_read_again_and_stored_as_reread(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = [_page(rng, b, 0x100 + b) for b in range(4)]
    path = tmp_path / "16384"
    path.write_bytes(b"".join(good))
    torn = bytearray(b"".join(good))
    torn[BLCKSZ + 4096:2 * BLCKSZ] = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    verifier = PageVerifier(1 << 40)
    fd = os.open(path, os.O_RDONLY)
    try:
        check = verifier.check(fd, memoryview(torn), "base/5/16384", 0, True)
        assert check is not None and check.failures == () and check.verified == 4
        assert bytes(torn) == path.read_bytes(), "the re-read page replaces the torn one"
        damaged = bytearray(b"".join(good))
        damaged[3 * BLCKSZ + 20] ^= 4
        path.write_bytes(damaged)
        check = verifier.check(fd, memoryview(bytearray(damaged)), "base/5/16384", 0, True)
        assert check is not None and [f.block for f in check.failures] == [3]
        assert isinstance(check.failures[0], Failure) and check.failures[0].stored == int.from_bytes(
            damaged[3 * BLCKSZ + 8:3 * BLCKSZ + 10], sys.byteorder)
        os.truncate(path, 3 * BLCKSZ)
        check = verifier.check(fd, memoryview(bytearray(damaged)), "base/5/16384", 0, True)
        assert check is not None and check.failures == (), "a page truncated away since is no failure"
        assert verifier.check(fd, memoryview(bytearray(damaged)), "base/5/PG_VERSION", 0, True) is None
    finally:
        os.close(fd)


def test_only_a_direct_backup_of_a_checksummed_cluster_loads_numpy() -> None:
    code = ("import sys; import backup_tool.physical.basebackup, backup_tool.jobs.run_due; "
            "print('numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_pg_basebackups_checksum_failure_is_the_same_typed_error() -> None:
    text = ('pg_basebackup: error: could not get COPY data stream: ERROR:  checksum verification failure '
            'during base backup')
    error = explain_basebackup_error(text, "postgres")
    assert isinstance(error, PageChecksumError) and error.exit_code == 1
    assert error.message == f"pg_basebackup failed: {text}" and error.hint and "damaged" in error.hint
    assert type(checksum_error({"base/5/1": [3]})) is PageChecksumError
