"""The schema half of a backup: pg_dump's schema archive, its text form and fingerprint,
the cluster globals (roles), and replaying archive sections with pg_restore.

The schema is kept as a custom-format archive so pg_restore can replay it in sections
(pre-data before the table data, post-data after it) and pick single objects for
selective restores. The fingerprint is the sha256 of the archive's SQL text with the
parts that legitimately vary removed: comments and the random ``\\restrict`` keys that
pg_dump 15.14+ writes.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import psycopg
from psycopg import sql

from backup_tool.core.graphs import reachable
from backup_tool.errors import RefusedError
from backup_tool.postgres.connection import ConnInfo, find_tool, quote_ident, quoted_table
from backup_tool.streams import pipeline

SCHEMA_DUMP_OPTIONS = ("--format=custom", "--compress=0", "--schema-only")
"""The options of :func:`dump_schema`'s ``pg_dump`` (what its output holds depends on them)."""


def dump_schema(conninfo: ConnInfo, major: int, snapshot_id: str | None = None,
                tables: Sequence[str] = ()) -> bytes:
    """A schema-only custom-format archive of the database, or only of ``tables`` (pg_dump
    ``--table`` patterns, each required to match: ``--strict-names``)."""
    argv = [find_tool("pg_dump", major), *SCHEMA_DUMP_OPTIONS, "--dbname", conninfo.tool_conninfo()]
    if snapshot_id:
        argv.append(f"--snapshot={snapshot_id}")
    if tables:
        argv += ["--strict-names", *(f"--table={t}" for t in tables)]
    return pipeline.run(argv, conninfo.tool_env(), "pg_dump (table definitions)" if tables else "pg_dump (schema)")


def dump_globals(conninfo: ConnInfo, major: int) -> bytes:
    """Roles and memberships (no passwords: role password hashes are secrets)."""
    argv = [find_tool("pg_dumpall", major), "--globals-only", "--no-role-passwords",
            "--no-tablespaces", "--dbname", conninfo.tool_conninfo()]
    return pipeline.run(argv, conninfo.tool_env(), "pg_dumpall (roles)")


def schema_text(archive: bytes, major: int) -> str:
    """The archive's schema as SQL text. pg_restore writes it in the database's encoding: read
    as UTF-8 with any other byte kept as a lone surrogate, so a LATIN1 or SQL_ASCII schema
    (a comment, a default) is compared byte for byte rather than refused."""
    argv = [find_tool("pg_restore", major), "--schema-only", "--file=-"]
    return pipeline.run(argv, dict(os.environ), "pg_restore (schema text)",
                        input_bytes=archive).decode("utf-8", "surrogateescape")


def normalize_v1(text: str) -> str:
    """The normalisation of backups written before ACL order was ignored (their stored
    fingerprints come from it)."""
    return "\n".join(_kept_lines(text)) + "\n"


def normalize(text: str) -> str:
    """The comparable text: varying parts removed and the privilege statements (GRANT,
    REVOKE, ALTER DEFAULT PRIVILEGES) of each object in a canonical order.

    PostgreSQL keeps an ACL as a list whose order follows the history of the grants, and
    pg_dump writes one statement per entry in that order; two databases with the same
    privileges can list them differently. Within each run of consecutive privilege
    statements on the same object, the statements (a grant made under ``SET SESSION
    AUTHORIZATION`` together with its SET/RESET, so the grantor stays attached) are sorted.
    Every statement is kept, so any difference in the set of privileges still shows. The
    role list of ``CREATE POLICY ... TO`` (which pg_dump writes in role OID order, so it
    depends on when each role was created on the server) is sorted likewise.
    """
    units: list[tuple[str | None, list[str]]] = []
    lines = [_sorted_policy_roles(ln) for ln in _kept_lines(text)]
    i = 0
    while i < len(lines):
        if lines[i].startswith("SET SESSION AUTHORIZATION "):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("RESET SESSION AUTHORIZATION")),
                       len(lines) - 1)
            block = lines[i:end + 1]
            keys = [_acl_object(ln) for ln in block[1:-1]]
            units.append((keys[0] if keys and len(set(keys)) == 1 else None, block))
            i = end + 1
        else:
            units.append((_acl_object(lines[i]), [lines[i]]))
            i += 1
    out: list[str] = []
    run: list[list[str]] = []
    run_key: str | None = None
    for key, block in units:
        if key is None or key != run_key:
            out.extend(ln for b in sorted(run) for ln in b)
            run = []
        run.append(block)
        run_key = key
    out.extend(ln for b in sorted(run) for ln in b)
    return "\n".join(out) + "\n"


_ACL_STATEMENT = re.compile(
    r"^(?P<scope>ALTER DEFAULT PRIVILEGES .*?)?(?:GRANT|REVOKE) .*? ON (?P<object>.+) (?:TO|FROM) ")


def _acl_object(line: str) -> str | None:
    """The object a one-line privilege statement is about (None: not such a statement)."""
    m = _ACL_STATEMENT.match(line)
    if m is None or not line.endswith(";"):
        return None
    return (m.group("scope") or "") + m.group("object")


_IDENT = r'(?:"(?:[^"]|"")*"|[^\s",;()])+'
_POLICY = re.compile(rf"^(CREATE POLICY {_IDENT} ON {_IDENT}(?: AS \w+)?(?: FOR \w+)? TO )"
                     rf"({_IDENT}(?:, {_IDENT})*)((?: USING | WITH CHECK |;$).*)$")


def _sorted_policy_roles(line: str) -> str:
    m = _POLICY.match(line)
    if m is None:
        return line
    roles = re.findall(_IDENT, m.group(2))
    return m.group(1) + ", ".join(sorted(roles)) + m.group(3)


def _kept_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))]


_SECRET_OPTION = re.compile(
    r"""((?:^|[\s(,])(?:SET\s+|ADD\s+)?"?[A-Za-z_]*(?:password|passwd|pwd|secret|token)[A-Za-z_]*"?\s+)'(?:[^']|'')*'""",
    re.IGNORECASE)


_CONNINFO_SECRET = re.compile(r"(\b(?:ssl)?password\s*=\s*)(?:''(?:[^']|'''')*''|[^\s']+)", re.IGNORECASE)


def mask_secret_options(line: str) -> str:
    """``line`` of schema text with the value of every option whose name says it holds a
    secret (``password``, ``secret_access_key``, ``token``, ...) and of a connection string's
    ``password=`` replaced by ``***``: pg_dump writes user mappings', servers' and
    subscriptions' secrets in the clear, and a line quoted in a message must not carry them.
    Pure."""
    return _CONNINFO_SECRET.sub(r"\1***", _SECRET_OPTION.sub(r"\1'***'", line))


def fingerprint(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8", "surrogateescape")).hexdigest()


def live_schema(conninfo: ConnInfo, major: int) -> str:
    """The normalized schema text of a live database, produced the way backups produce it."""
    return normalize(schema_text(dump_schema(conninfo, major), major))


def section_listing(archive_path: Path, major: int, section: str | None) -> list[str]:
    """The table-of-contents ids of the objects one section of the archive holds (None: all
    of them), in the archive's order (a line of the listing that does not start with one
    continues a name holding a line break). Listed once per archive file as it stands: a
    restore counts a section for its progress and then replays it."""
    st = archive_path.stat()
    return list(_listing(str(archive_path), st.st_ino, st.st_size, st.st_mtime_ns, major, section))


@functools.lru_cache(maxsize=16)
def _listing(path: str, _inode: int, _size: int, _mtime_ns: int, major: int, section: str | None) -> tuple[str, ...]:
    return tuple(_listed_ids(_listing_text(path, _inode, _size, _mtime_ns, major, section).splitlines()))


@functools.lru_cache(maxsize=16)
def _listing_text(path: str, _inode: int, _size: int, _mtime_ns: int, major: int, section: str | None) -> str:
    """``pg_restore --list`` of the archive file as it stands (one section, or None: all)."""
    chosen = [f"--section={section}"] if section is not None else []
    return pipeline.run([find_tool("pg_restore", major), "--list", *chosen, path],
                        dict(os.environ), "pg_restore (list)").decode("utf-8", "replace")


def section_ids(archive_path: Path, major: int, section: str) -> set[str]:
    """The table-of-contents ids of the objects one section of the schema archive holds."""
    return set(section_listing(archive_path, major, section))


def section_items(archive_path: Path, major: int, section: str) -> int:
    """How many objects one section of the schema archive holds."""
    return len(section_ids(archive_path, major, section))


LOCKS_PER_ENTRY = 3
"""Lock-table entries one replayed object may hold until its transaction ends: a table
takes its own, its TOAST table's and that index's (measured: pre-data of N tables with a
text column holds 3N relation locks)."""

MIN_ENTRIES_PER_TRANSACTION = 64


def entries_per_transaction(lock_table_size: int) -> int:
    """How many archive entries one transaction of a lock-bounded replay restores: a quarter
    of the server's lock table (:class:`LockTable`), so the replay leaves the rest to the
    server's other sessions. Pure."""
    return max(MIN_ENTRIES_PER_TRANSACTION, lock_table_size // 4 // LOCKS_PER_ENTRY)


def batches(ids: Sequence[str], size: int, attached: frozenset[str] = frozenset()) -> list[list[str]]:
    """``ids`` cut in order into runs of at most ``size``, except that an id of ``attached``
    never starts a run: it stays with the entry before it, and that run grows by it. Pure."""
    runs: list[list[str]] = []
    for i in ids:
        if runs and (len(runs[-1]) < size or i in attached):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def annotation_ids(archive_path: Path, major: int) -> frozenset[str]:
    """The dump ids of the archive's comments, privileges and security labels. pg_restore
    restores one of them with ``--section`` and ``--use-list`` only when the object it
    annotates is in the same run (otherwise it is skipped without a word): a replay cut into
    runs keeps each with the entries before it, which pg_dump writes right after its object."""
    try:
        return frozenset(str(e.dump_id) for e in read_toc(archive_path.read_bytes()) if e.desc in _ANNOTATIONS)
    except UnreadableToc:
        st = archive_path.stat()
        listing = _listing_text(str(archive_path), st.st_ino, st.st_size, st.st_mtime_ns, major, None)
        return frozenset(m.group(1) for m in _ANNOTATION_LINE.finditer(listing))


_ANNOTATION_LINE = re.compile(r"^(\d+); \d+ \d+ (?:COMMENT|ACL|SECURITY LABEL) ", re.MULTILINE)


def lock_table_exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's "out of shared memory" for want of lock-table slots
    (SQLSTATE 53200 with the hint naming ``max_locks_per_transaction``, which is never
    translated), rather than any other shortage of memory."""
    diag = getattr(exc, "diag", None)
    return (isinstance(exc, psycopg.errors.OutOfMemory) and diag is not None
            and "max_locks_per_transaction" in (diag.message_hint or ""))


@dataclass(frozen=True)
class LockTable:
    """The settings that size a server's shared lock table: ``max_locks_per_transaction``
    slots for each server process that may lock (``max_connections``, autovacuum workers and
    their launcher, background workers, WAL senders) and each prepared transaction, as
    PostgreSQL 15's lock manager allocates it."""
    per_transaction: int
    processes: int

    @property
    def slots(self) -> int:
        return self.per_transaction * self.processes

    def sized_for(self, relations: int) -> int:
        """The smallest multiple of 64 above today's ``max_locks_per_transaction`` whose
        table holds ``relations`` locks with a quarter to spare for the server's other
        sessions. Pure."""
        need = max(-(-relations * 5 // 4 // self.processes), self.per_transaction + 1)
        return -(-need // 64) * 64


def lock_table(conn: psycopg.Connection[Any]) -> LockTable:
    row = conn.execute("SELECT current_setting('max_locks_per_transaction')::int, "
                       "current_setting('max_connections')::int + current_setting('autovacuum_max_workers')::int"
                       " + 1 + current_setting('max_worker_processes')::int"
                       " + current_setting('max_wal_senders')::int"
                       " + current_setting('max_prepared_transactions')::int").fetchone()
    assert row is not None
    return LockTable(int(row[0]), int(row[1]))


def relations_locked(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> int:
    """How many relations a transaction that creates or rewrites ``tables`` locks: each
    table, its TOAST table and that table's index, and its indexes; a table the database
    does not have counts as :data:`LOCKS_PER_ENTRY`."""
    names = [quoted_table(s, n) for s, n in tables]
    row = conn.execute("""
        WITH t AS (SELECT to_regclass(name) AS oid FROM unnest(%s::text[]) AS name)
        SELECT count(*) FILTER (WHERE t.oid IS NULL),
               count(c.oid) + 2 * count(NULLIF(c.reltoastrelid, 0)) + coalesce(sum(
                   (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid)), 0)
          FROM t LEFT JOIN pg_class c ON c.oid = t.oid""", (names,)).fetchone()
    assert row is not None
    return int(row[0]) * LOCKS_PER_ENTRY + int(row[1])


def lock_table_refusal(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]], other_ways: str,
                       ) -> RefusedError:
    """The error for a transaction over ``tables`` that ran out of lock slots (see
    :func:`lock_table_exhausted`), raised once it has been rolled back: how many locks it
    needed, how many the server holds and the setting that would fit them."""
    size = lock_table(conn)
    relations = relations_locked(conn, tables)
    return RefusedError(
        f"restoring {len(tables):,} tables in one transaction needs about {relations:,} locks (the tables, "
        f"their TOAST tables and indexes), more than the server's lock table holds: {size.slots:,} "
        f"(max_locks_per_transaction {size.per_transaction} for each of {size.processes} server processes and "
        f"prepared transactions); nothing was changed",
        f"set max_locks_per_transaction = {size.sized_for(relations)} on the target server (ALTER SYSTEM, "
        f"then a restart), {other_ways}")


def lock_table_size(conninfo: ConnInfo) -> int:
    """The number of locks the server's shared lock table is sized for."""
    with conninfo.connect() as conn:
        return lock_table(conn).slots


# In a parallel replay an item is done when a worker reports "finished item N", or the leader
# "processing item N" / "processing missed item N" (it restores some items itself before and after
# the workers; which ones depends on timing): each counted once, by its table-of-contents id. A
# serial replay reports each item it creates as "creating <kind> <name>".
_ITEM_DONE = re.compile(r"(?:processing item|processing missed item|finished item) (\d+) ")


def restore_section(archive_path: Path, conninfo: ConnInfo, major: int, section: str,
                    jobs: int = 1, listing: Sequence[str] | None = None,
                    on_item: Callable[[], None] | None = None, skip: frozenset[int] = frozenset(),
                    lock_bounded: bool = False) -> None:
    """Replay one section (pre-data or post-data) of the schema archive into the target, or
    only the entries of ``listing`` (lines of ``pg_restore --list``, in the order to restore);
    ``on_item`` is called as pg_restore reports each object it creates (with ``--jobs``:
    each one finished). A parallel post-data replay runs in the passes of
    :func:`post_data_passes` (partition index attachments one at a time). ``skip``: dump
    ids already created (see :func:`per_table_post_data`), left out of the replay.

    What is not replayed in parallel is replayed in a single transaction, which holds the
    lock of every object it creates until it commits: thousands of tables can need more locks
    than the server's lock table holds, although a backup of them needed fewer. With
    ``lock_bounded`` (a restore guarded by its unfinished-restore marker, or a scratch
    database) such a replay is cut, in the archive's order, into transactions of
    :func:`entries_per_transaction` entries, each comment, privilege and security label in
    the transaction of its object (:func:`annotation_ids`); without it, it stays all-or-nothing."""
    base = [find_tool("pg_restore", major), f"--section={section}", "--exit-on-error",
            "--dbname", conninfo.tool_conninfo()]
    counted: set[str] = set()

    def run(parallel: bool, ids: Sequence[str] | None, tmp: Path) -> None:
        wanted = set(ids) if ids is not None else set(everything()) if parallel and on_item is not None else set()

        def seen_parallel(line: str) -> None:
            # Searched, not matched at the start: workers share stderr and pg_restore writes its
            # "pg_restore: " prefix apart from the message, so two messages can share a line.
            for found in _ITEM_DONE.finditer(line):
                if on_item is not None and found.group(1) in wanted and found.group(1) not in counted:
                    counted.add(found.group(1))
                    on_item()

        def seen_serial(line: str) -> None:
            if on_item is not None and line.startswith("pg_restore: creating "):
                on_item()

        use_list: list[str] = []
        if ids is not None:
            path = tmp / f"run-{len(list(tmp.iterdir()))}.list"
            path.write_text("".join(f"{i}\n" for i in ids))
            use_list = [f"--use-list={path}"]
        argv = [*base, f"--jobs={jobs}" if parallel else "--single-transaction", *use_list]
        if on_item is None:
            pipeline.run([*argv, str(archive_path)], conninfo.tool_env(), f"pg_restore ({section})")
        else:
            pipeline.run_watching([*argv, "--verbose", str(archive_path)], conninfo.tool_env(),
                                  f"pg_restore ({section})", seen_parallel if parallel else seen_serial)

    listed = None if listing is None else [i for i in _listed_ids(listing) if int(i) not in skip]
    whole: list[str] = []

    def everything() -> list[str]:
        if listed is not None:
            return listed
        if not whole:
            whole.extend(i for i in section_listing(archive_path, major, section) if int(i) not in skip)
        return whole

    if skip and not everything():
        return
    passes = _planned_passes(archive_path, set(everything())) \
        if section == "post-data" and jobs > 1 and listing is None else []
    if skip and not passes:
        passes = [ReplayPass(tuple(int(i) for i in everything()), jobs > 1)]
    runs: list[tuple[bool, Sequence[str] | None]]
    if not skip and len(passes) <= 1 and all(step.parallel for step in passes):
        runs = [(jobs > 1, listed)]
    else:
        runs = [(step.parallel, [str(i) for i in step.ids]) for step in passes]
    size: list[int] = []
    with tempfile.TemporaryDirectory(prefix=f"backup-tool-{section}-") as tmp_name:
        for parallel, ids in runs:
            entries = ids if ids is not None else (everything() if lock_bounded and not parallel else ())
            if parallel or not lock_bounded or len(entries) <= MIN_ENTRIES_PER_TRANSACTION:
                run(parallel, ids, Path(tmp_name))
                continue
            if not size:
                size.append(entries_per_transaction(lock_table_size(conninfo)))
            runs_of = batches(entries, size[0], annotation_ids(archive_path, major)) \
                if len(entries) > size[0] else [ids]
            for batch in runs_of:
                run(False, batch, Path(tmp_name))


def _listed_ids(listing: Sequence[str]) -> list[str]:
    """The dump ids of ``pg_restore --list`` lines (comments and the continuation lines of a
    name holding a line break have none)."""
    return [line.split(";", 1)[0].strip() for line in listing
            if line and not line.startswith(";") and line.split(";", 1)[0].strip().isdigit()]


def _planned_passes(archive_path: Path, ids: set[str]) -> list[ReplayPass]:
    try:
        toc = read_toc(archive_path.read_bytes())
    except UnreadableToc:
        return []
    return post_data_passes(toc, {int(i) for i in ids})


@dataclass(frozen=True)
class ReplayPass:
    """One pg_restore run of a post-data replay: the dump ids it restores, in archive order,
    in parallel (``--jobs``) or one after another in a single transaction."""

    ids: tuple[int, ...]
    parallel: bool


# Entries pg_restore keeps for its later restore passes (_tocEntryRestorePass in
# pg_backup_archiver.c): they run after every other entry of the run.
_LATE_PASS = frozenset({"ACL", "ACL LANGUAGE", "DEFAULT ACL", "EVENT TRIGGER", "MATERIALIZED VIEW DATA"})


def _late_pass(entry: TocEntry) -> bool:
    return entry.desc in _LATE_PASS or (entry.desc in ("COMMENT", "SECURITY LABEL")
                                        and entry.tag.startswith("EVENT TRIGGER "))


def post_data_passes(toc: list[TocEntry], section: set[int]) -> list[ReplayPass]:
    """How to replay the post-data entries ``section`` of an archive with several workers
    without leaving a partitioned index invalid. Pure.

    ``ALTER INDEX … ATTACH PARTITION`` marks the parent index valid once every partition has
    a valid index attached, and then checks the grandparent under a lock it releases before
    its transaction commits (validatePartitionedIndex in PostgreSQL's tablecmds.c). Two
    workers completing sibling subtrees at once can each see the other's index still invalid,
    and the grandparent stays invalid for good although every index below it is attached and
    valid (pg_restore never runs two attachments of the same table at once). So: (1)
    everything that does not depend on an attachment, in parallel (the index builds); (2)
    the ``INDEX ATTACH`` entries alone, one after another in one transaction (catalog
    updates only); (3) what depends on them, in parallel (foreign keys referencing a
    partitioned table need its index valid; pg_dump makes them depend on every attachment
    below it). Entries of pg_restore's late passes (privileges, event triggers) and their
    dependents go to (3) as well, so they still come after everything else.

    One parallel pass (the archive as it is) when there is no attachment, or when an
    attachment depends on something that must wait for (3)."""
    entries = [e for e in toc if e.dump_id in section]
    attach = {e.dump_id for e in entries if e.desc == "INDEX ATTACH"}
    if not attach:
        return [ReplayPass(tuple(e.dump_id for e in entries), True)]
    dependents: dict[int, list[int]] = {}
    for e in entries:
        for d in e.deps:
            dependents.setdefault(d, []).append(e.dump_id)
    later = reachable(attach | {e.dump_id for e in entries if _late_pass(e)}, dependents)
    last = later - attach
    if any(d in last for e in entries if e.dump_id in attach for d in e.deps):
        return [ReplayPass(tuple(e.dump_id for e in entries), True)]
    steps = [ReplayPass(tuple(e.dump_id for e in entries if e.dump_id not in later), True),
             ReplayPass(tuple(e.dump_id for e in entries if e.dump_id in attach), False),
             ReplayPass(tuple(e.dump_id for e in entries if e.dump_id in last), True)]
    return [s for s in steps if s.ids]


# --------------------------------------------------------------------------- table definitions


class Section(enum.IntEnum):
    """pg_dump's TOC sections (``teSection``)."""

    NONE = 1
    PRE_DATA = 2
    DATA = 3
    POST_DATA = 4


@dataclass(frozen=True)
class TocEntry:
    """One entry of a custom-format archive's table of contents: what pg_restore -l lists,
    plus the section and the dump ids the entry depends on."""

    dump_id: int
    section: Section
    desc: str
    namespace: str
    tag: str
    deps: tuple[int, ...]
    tablespace: str = ""
    owner: str = ""


class UnreadableToc(Exception):
    """The archive is not a custom-format archive of a version :func:`read_toc` knows."""


# Format 1.16 (pg_dump 17 and 18) adds the relation kind to each entry, which is skipped.
_READABLE_VERSIONS = ((1, 12), (1, 13), (1, 14), (1, 15), (1, 16))


def read_toc(archive: bytes, versions: tuple[tuple[int, int], ...] = _READABLE_VERSIONS) -> list[TocEntry]:
    """The table of contents of a pg_dump custom-format archive (format 1.12 to 1.16, written
    by pg_dump 11 to 18, or those of ``versions``), in archive order; :class:`UnreadableToc`
    for anything else."""
    if archive[:5] != b"PGDMP" or len(archive) < 11:
        raise UnreadableToc("not a pg_dump custom-format archive")
    vmaj, vmin, _, int_size, off_size, fmt = archive[5:11]
    if (vmaj, vmin) not in versions or fmt != 1:
        raise UnreadableToc(f"archive format {vmaj}.{vmin} (kind {fmt}) is not read here")
    pos = 11

    def read_int() -> int:
        nonlocal pos
        if pos + 1 + int_size > len(archive):
            raise UnreadableToc("the archive's table of contents is truncated")
        negative = archive[pos]
        value = int.from_bytes(archive[pos + 1:pos + 1 + int_size], "little")
        pos += 1 + int_size
        return -value if negative else value

    def read_str() -> str | None:
        nonlocal pos
        n = read_int()
        if n < 0:
            return None
        if pos + n > len(archive):
            raise UnreadableToc("the archive's table of contents is truncated")
        try:
            text = archive[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadableToc("the archive's table of contents is not UTF-8") from None
        pos += n
        return text

    if (vmaj, vmin) >= (1, 15):
        pos += 1
    else:
        read_int()
    for _ in range(7):
        read_int()
    for _ in range(3):
        read_str()
    entries = []
    for _ in range(read_int()):
        dump_id = read_int()
        read_int()
        read_str(), read_str()
        tag = read_str() or ""
        desc = read_str() or ""
        section = read_int()
        for _ in range(3):
            read_str()
        namespace = read_str() or ""
        tablespace = read_str() or ""
        if (vmaj, vmin) >= (1, 14):
            read_str()
        if (vmaj, vmin) >= (1, 16):
            read_int()
        owner = read_str() or ""
        read_str()
        deps = []
        while (dep := read_str()) is not None:
            deps.append(int(dep))
        pos += 1 + off_size
        try:
            entries.append(TocEntry(dump_id, Section(section), desc, namespace, tag, tuple(deps), tablespace, owner))
        except ValueError:
            raise UnreadableToc(f"entry {dump_id} has an unknown section {section}") from None
    return entries


def tablespaces(toc: Iterable[TocEntry]) -> frozenset[str]:
    """The tablespaces these entries' tables, indexes and materialized views are created in
    (pg_restore sets ``default_tablespace`` to each; the database's default has none)."""
    return frozenset(e.tablespace for e in toc if e.tablespace)


def missing_tablespaces(needed: frozenset[str], present: Iterable[str]) -> RefusedError | None:
    """The refusal of a restore needing tablespaces the target server lacks (None: it has them
    all). A ``CREATE TABLESPACE`` is never carried (it names a directory on the server's disk),
    and without it pg_restore fails half-way."""
    missing = sorted(needed - set(present))
    if not missing:
        return None
    names = ", ".join(f'tablespace "{name}"' for name in missing)
    verb = "does" if len(missing) == 1 else "do"
    create = "; ".join(f"CREATE TABLESPACE {quote_ident(name)} LOCATION '/a/directory/the/server/owns'"
                       for name in missing)
    return RefusedError(f"the backup puts tables or indexes in {names}, which {verb} not exist on the target server",
                        f"create {'it' if len(missing) == 1 else 'them'} there first ({create}), "
                        "then run the restore again")


def refuse_missing_tablespaces(conn: psycopg.Connection[Any], needed: frozenset[str]) -> None:
    """Raise :func:`missing_tablespaces`' refusal for the server ``conn`` is on, if any."""
    if needed and (refusal := missing_tablespaces(needed, (r[0] for r in conn.execute(
            "SELECT spcname FROM pg_catalog.pg_tablespace")))):
        raise refusal


def owners(toc: Iterable[TocEntry]) -> frozenset[str]:
    """The roles these entries' objects are given to (``ALTER ... OWNER TO``)."""
    return frozenset(e.owner for e in toc if e.owner)


def refuse_unsettable_owners(conn: psycopg.Connection[Any], needed: frozenset[str]) -> None:
    """Refuse, before anything is created, a restore whose role cannot give the objects back to
    their owners: ``ALTER ... OWNER TO`` needs a superuser or a member of the new owner (on
    PostgreSQL 15), and pg_restore otherwise fails half-way on the first object (a role the
    restore would create with ``--with-roles`` is not granted to the role restoring either)."""
    if not needed:
        return
    rows = conn.execute(
        "SELECT pg_catalog.quote_ident(o), r.oid IS NOT NULL FROM unnest(%s::text[]) o LEFT JOIN pg_catalog.pg_roles r ON r.rolname = o"
        " WHERE NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)"
        "   AND (r.oid IS NULL OR NOT pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))"
        " ORDER BY 1", (sorted(needed),)).fetchall()
    if not rows:
        return
    user = conn.execute("SELECT pg_catalog.quote_ident(current_user)").fetchone()
    me = str(user[0]) if user else "the role restoring"
    names = ", ".join(r[0] for r in rows)
    grant = ", ".join(r[0] for r in rows if r[1])
    raise RefusedError(
        f"{me} cannot give the backup's objects back to their owners: it is not a superuser and not a member of "
        f"{'role' if len(rows) == 1 else 'roles'} {names}",
        "restore as a superuser" + (f", or grant them first (GRANT {grant} TO {me})" if grant else
                                    " (roles the restore creates are not granted to the role restoring)"))


_TABLE_PARTS = frozenset({"CONSTRAINT", "CHECK CONSTRAINT", "FK CONSTRAINT", "DEFAULT", "TRIGGER",
                          "POLICY", "RULE"})
_ANNOTATIONS = frozenset({"COMMENT", "ACL", "SECURITY LABEL"})
_RELATIONS = frozenset({"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"})


def table_definition_ids(toc: list[TocEntry], tables: set[tuple[str, str]]) -> list[int] | None:
    """The dump ids that ``pg_dump --schema-only --table`` of ``tables``
    would write: each table with its owned and identity sequences, column defaults,
    constraints (foreign keys included), indexes, triggers, rules, row security and policies,
    partition attachments, and the comments, privileges and security labels on all of
    those; not extended statistics, not sequences a default only calls, not views. In archive
    order, except that every post-data entry (by :func:`effective_section`) comes after the
    others, and the attachments of a partition to a parent not among ``tables`` (one the target
    already has: pg_partman's parent, whose partition was dropped since; the archive may not
    hold it, as ``pg_dump --table`` of the partition alone) come last, with those
    of its indexes: attached before its own indexes and keys exist, it would get copies of the
    parent's, named as the archive's own, which then could not be created.

    Pure. None when an entry's table cannot be told from its tag and dependencies (a table
    name containing a space can make ``"a b" c`` ambiguous): the caller then asks pg_dump.
    """
    by_id = {e.dump_id: e for e in toc}

    def table_deps(e: TocEntry) -> list[TocEntry]:
        return [by_id[d] for d in dict.fromkeys(e.deps) if d in by_id and by_id[d].desc == "TABLE"]

    def owner(e: TocEntry) -> TocEntry | None | Literal[False]:
        """The table ``e`` belongs to; None: not a part of a table; False: ambiguous."""
        if e.desc in ("INDEX", "ROW SECURITY"):
            found = table_deps(e)
            return found[0] if len(found) == 1 else False
        if e.desc == "TABLE ATTACH":
            found = [t for t in table_deps(e) if t.tag == e.tag and t.namespace == e.namespace]
            return found[0] if len(found) == 1 else False
        if e.desc == "INDEX ATTACH":
            index = [by_id[d] for d in dict.fromkeys(e.deps) if d in by_id and by_id[d].namespace == e.namespace
                     and ((by_id[d].desc == "INDEX" and by_id[d].tag == e.tag)
                          or (by_id[d].desc == "CONSTRAINT" and by_id[d].tag.endswith(" " + e.tag)))]
            return owner(index[0]) if len(index) == 1 else False
        if e.desc in _TABLE_PARTS:
            found = [by_id[d] for d in dict.fromkeys(e.deps) if d in by_id and by_id[d].desc in _RELATIONS
                     and by_id[d].namespace == e.namespace and e.tag.startswith(by_id[d].tag + " ")]
            if len(found) != 1:
                return False
            return found[0] if found[0].desc == "TABLE" else None
        return None

    chosen: set[int] = {e.dump_id for e in toc if e.desc == "TABLE" and (e.namespace, e.tag) in tables}
    for e in toc:
        if e.desc == "SEQUENCE" and any(d in chosen and by_id[d].desc == "TABLE" for d in e.deps):
            chosen.add(e.dump_id)
        elif e.desc == "SEQUENCE OWNED BY" and any(d in chosen for d in e.deps):
            chosen.add(e.dump_id)
        else:
            table = owner(e)
            if table is False:
                if any(d in chosen for d in e.deps):
                    return None
            elif table is not None and table.dump_id in chosen:
                chosen.add(e.dump_id)
    grew = True
    while grew:
        extra = {e.dump_id for e in toc if e.desc in _ANNOTATIONS and e.dump_id not in chosen
                 and e.deps and all(d in chosen for d in e.deps)}
        chosen |= extra
        grew = bool(extra)
    picked = [e for e in toc if e.dump_id in chosen]
    attached_late = {child.dump_id for e in picked if e.desc == "TABLE ATTACH"
                     and (child := owner(e)) and not any((t.namespace, t.tag) in tables
                                                         for t in table_deps(e) if t is not child)}
    late = {e.dump_id for e in picked if e.desc in ("TABLE ATTACH", "INDEX ATTACH")
            and (table := owner(e)) and table.dump_id in attached_late}
    return ([e.dump_id for e in picked if e.dump_id not in late and effective_section(e, by_id) != Section.POST_DATA]
            + [e.dump_id for e in picked if e.dump_id not in late and effective_section(e, by_id) == Section.POST_DATA]
            + [e.dump_id for e in picked if e.dump_id in late])


def effective_section(entry: TocEntry, by_id: dict[int, TocEntry]) -> Section:
    """The section an entry is restored in: its own, or for a comment, privilege or security
    label (section "none") that of the object it is about, as in an archive of that object
    alone (pg_dump writes those right after their object)."""
    seen: set[int] = set()
    while entry.section == Section.NONE and entry.deps and entry.deps[0] in by_id and entry.dump_id not in seen:
        seen.add(entry.dump_id)
        entry = by_id[entry.deps[0]]
    return Section.PRE_DATA if entry.section == Section.NONE else entry.section


@dataclass(frozen=True)
class DefinitionScripts:
    """SQL that creates some tables: ``before_data`` (tables, sequences, defaults: run before
    loading the rows) and ``after_data`` (indexes, constraints, triggers, policies)."""

    before_data: bytes
    after_data: bytes


_OWNER = "; Owner: "


def _header(entry: TocEntry) -> str:
    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\r", " ")
    return f"-- Name: {clean(entry.tag)}; Type: {entry.desc}; Schema: {clean(entry.namespace) or '-'}{_OWNER}"


def _script(archive_path: Path, ids: list[int], major: int, section: str | None = None,
            errors: str = "strict", codec: str = "utf-8") -> list[str]:
    listing = archive_path.with_name(archive_path.name + ".list")
    listing.write_text("".join(f"{i}\n" for i in ids))
    argv = [find_tool("pg_restore", major), "--use-list", str(listing), "--file=-",
            *([f"--section={section}"] if section else []), str(archive_path)]
    text = pipeline.run(argv, dict(os.environ), "pg_restore (table definitions)").decode(codec, errors=errors)
    return [ln for ln in text.split("\n") if not ln.startswith(("\\restrict ", "\\unrestrict "))]


def definition_scripts(archive_path: Path, toc: list[TocEntry], ids: list[int], major: int,
                       utf8: bool = True) -> DefinitionScripts:
    """The SQL of the TOC entries ``ids`` (see :func:`table_definition_ids`) from one
    pg_restore run, cut where the first post-data entry begins; each part starts with the
    archive's session settings (search_path, encoding...), so it runs on any session.
    Privileges come in the second part (pg_restore applies them after every other entry).

    The parts are pg_restore's bytes, in the archive's encoding: not ``utf8``, they are cut
    as Latin-1 text, which maps every byte to one character and back (each server encoding
    is a superset of ASCII, where the cut's markers are). Run them in a session whose
    client encoding is the archive's.

    If the cut cannot be placed with certainty (its entry header not found exactly once),
    each section is asked for separately instead."""
    codec = "utf-8" if utf8 else "latin-1"
    lines = _script(archive_path, ids, major, codec=codec)
    by_id = {e.dump_id: e for e in toc}
    entries = [by_id[i] for i in ids]
    heads = [i for i, ln in enumerate(lines) if ln.startswith("-- Name: ") and i and lines[i - 1] == "--"]
    preamble = lines[:heads[0] - 1] if heads else lines
    first_post = next((e for e in entries if effective_section(e, by_id) == Section.POST_DATA), None)
    if first_post is None:
        return DefinitionScripts("\n".join(lines).encode(codec), b"")
    cut = [i for i in heads if lines[i].startswith(_header(first_post))]
    if len(cut) != 1:
        pre = _script(archive_path, ids, major, "pre-data", codec=codec)
        post = _script(archive_path, ids, major, "post-data", codec=codec)
        return DefinitionScripts("\n".join(pre).encode(codec), "\n".join(post).encode(codec))
    start = cut[0] - 1
    while start > 0 and (lines[start - 1] == "" or lines[start - 1].startswith("SET ")):
        start -= 1
    return DefinitionScripts("\n".join(lines[:start]).encode(codec),
                             "\n".join(preamble + lines[start:]).encode(codec))


# --------------------------------------------------------------------------- per-table post-data

_EARLY_KINDS = frozenset({"INDEX", "CONSTRAINT"})
# Post-data entries that leave a table's planner statistics as they are: ANALYZE may run before them.
_STATS_NEUTRAL = frozenset({"FK CONSTRAINT", "CHECK CONSTRAINT", "TRIGGER", "POLICY", "ROW SECURITY", "RULE"})


@dataclass(frozen=True)
class TablePostData:
    """The post-data entries of one table that can be built as soon as its rows are in
    (``ids``, archive order), and whether its statistics may be gathered right after them
    (``analyze_early``: no other post-data entry of the table changes what ANALYZE collects)."""

    ids: tuple[int, ...]
    analyze_early: bool


def per_table_post_data(toc: list[TocEntry], tables: set[tuple[str, str]]) -> dict[tuple[str, str], TablePostData]:
    """For each of ``tables`` (schema, name): its indexes and its primary key, unique and exclusion
    constraints, each depending on that table and on pre-data objects only, and not needed by
    a partition index attachment (those keep the order of :func:`post_data_passes`). What
    ``pg_restore --jobs`` builds per table as soon as that table's data is loaded; foreign
    keys, triggers, policies and the rest wait for every table. Not ``analyze_early``: a table
    another table depends on (an inheritance parent, whose ANALYZE also samples its children).
    Pure."""
    by_id = {e.dump_id: e for e in toc}
    attached = {d for e in toc if e.desc == "INDEX ATTACH" for d in e.deps}

    def table_of(e: TocEntry) -> tuple[str, str] | None:
        found = {(by_id[d].namespace, by_id[d].tag) for d in e.deps if d in by_id and by_id[d].desc == "TABLE"}
        return found.pop() if len(found) == 1 else None

    early: dict[tuple[str, str], list[int]] = {}
    late = {(by_id[d].namespace, by_id[d].tag) for e in toc if e.desc == "TABLE"
            for d in e.deps if d in by_id and by_id[d].desc == "TABLE"}
    for e in toc:
        if e.section != Section.POST_DATA:
            continue
        key = table_of(e)
        movable = (e.desc in _EARLY_KINDS and e.dump_id not in attached and key is not None
                   and key[0] == e.namespace and (e.desc == "INDEX" or e.tag.startswith(key[1] + " "))
                   and all(d in by_id and by_id[d].section == Section.PRE_DATA for d in e.deps))
        if movable and key in tables:
            early.setdefault(key, []).append(e.dump_id)
        elif e.desc not in _STATS_NEUTRAL:
            late.update({(by_id[d].namespace, by_id[d].tag) for d in e.deps
                         if d in by_id and by_id[d].desc == "TABLE"} if key is None else {key})
    return {key: TablePostData(tuple(early.get(key, ())), key not in late) for key in tables}


_STATE_SETTINGS = ("SET default_tablespace ", "SET default_table_access_method ")


def post_data_statements(archive_path: Path, toc: list[TocEntry], ids: Sequence[int],
                         major: int) -> dict[int, str] | None:
    """The SQL of each post-data entry ``ids`` as pg_restore writes it, each preceded by the
    archive's session settings (search path, encoding...) and the tablespace it is built in,
    so that it runs alone on any session; bytes that are not UTF-8 (an archive in another
    encoding) are kept as surrogate escapes, to be encoded back with them. None when an entry's header is not found exactly
    once in pg_restore's script (the caller then leaves those entries to pg_restore)."""
    if not ids:
        return {}
    lines = _script(archive_path, list(ids), major, "post-data", errors="surrogateescape")
    heads = [i for i, ln in enumerate(lines) if ln.startswith("-- Name: ") and i and lines[i - 1] == "--"]
    if not heads:
        return None
    preamble = [ln for ln in lines[:heads[0] - 1] if not ln.startswith(_STATE_SETTINGS)]
    state: dict[str, str] = {}
    blocks: list[tuple[str, list[str], dict[str, str]]] = []
    for ln in lines[:heads[0] - 1]:
        if ln.startswith(_STATE_SETTINGS):
            state[ln.split("=", 1)[0]] = ln
    for n, head in enumerate(heads):
        body = lines[head - 1:heads[n + 1] - 1] if n + 1 < len(heads) else lines[head - 1:]
        blocks.append((lines[head], [ln for ln in body if not ln.startswith(_STATE_SETTINGS)], dict(state)))
        for ln in body:
            if ln.startswith(_STATE_SETTINGS):
                state[ln.split("=", 1)[0]] = ln
    by_id = {e.dump_id: e for e in toc}
    by_head: dict[str, list[tuple[str, list[str], dict[str, str]]]] = {}
    for block in blocks:
        for prefix in _header_prefixes(block[0]):
            by_head.setdefault(prefix, []).append(block)
    result: dict[int, str] = {}
    for i in ids:
        found = by_head.get(_header(by_id[i]), [])
        if len(found) != 1:
            return None
        _, body, settings = found[0]
        result[i] = "\n".join([*preamble, *settings.values(), *body])
    return result


def _header_prefixes(line: str) -> list[str]:
    """Every prefix of a script's entry header line that :func:`_header` could have made
    (each ends with ``"; Owner: "``): a line starts with an entry's header exactly when the
    header is one of them. Looked up in a dict, matching thousands of entries stays linear."""
    prefixes = []
    at = line.find(_OWNER)
    while at >= 0:
        prefixes.append(line[:at + len(_OWNER)])
        at = line.find(_OWNER, at + 1)
    return prefixes


def uncreatable_extensions(conn: psycopg.Connection[Any], names: Iterable[str]) -> dict[str, str]:
    """The extensions of ``names`` that ``conn``'s database will not create, with the
    server's reason (its package missing, a library not preloaded, pg_cron's
    ``cron.database_name`` naming another database): each is tried in a transaction rolled
    back at once, so nothing is left behind. It is created in ``public``, not in the first
    schema of the session's search_path: a search_path the restoring role sets (``app``, not
    yet restored) would have every extension refused for want of a schema to create it in."""
    refused: dict[str, str] = {}
    for name in sorted(set(names)):
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SELECT pg_catalog.set_config('search_path', 'public', true)")
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} CASCADE").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            refused[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return refused


def definition_closure(toc: list[TocEntry], tables: set[tuple[str, str]],
                       extensions: bool = False) -> set[int] | None:
    """The dump ids a scratch database needs for ``pg_dump --table`` of ``tables`` to write
    what it writes after a replay of the whole archive: the tables' own definitions
    (:func:`table_definition_ids`) and everything they depend on, transitively, as pg_dump
    recorded it (their schemas, types, domains, collations, functions their defaults, checks,
    triggers and policies call, sequences, the tables their partitions attach to and their
    foreign keys reference, the extensions of the types they use). With ``extensions``,
    every extension too: a dependency on an extension's object is not always recorded (an
    exclusion constraint's default GiST operator class for an integer column comes from
    btree_gist, and its entry names no extension). Pure. None when the tables' entries
    cannot be told."""
    ids = table_definition_ids(toc, tables)
    if ids is None:
        return None
    return reachable([*ids, *(e.dump_id for e in toc if extensions and e.desc == "EXTENSION")],
                     {e.dump_id: e.deps for e in toc})


def replay_into_scratch(archive_path: Path, scratch: ConnInfo, major: int,
                        only: set[int] | None = None) -> None:
    """Replay the archive's schema (pre-data and post-data) into an empty scratch database,
    or only the entries ``only`` names (see :func:`definition_closure`), in archive order.

    An extension that refuses to be created there (pg_cron only installs in the database
    ``cron.database_name`` names) is left out, with the entries that depend on nothing else
    (its comment, grants on its objects): the scratch copy only serves to read definitions,
    and a table needing that extension still fails, naming it."""
    try:
        toc = read_toc(archive_path.read_bytes())
    except UnreadableToc:
        toc = []
    with scratch.connect() as conn:
        uncreatable = uncreatable_extensions(conn, [e.tag for e in toc if e.desc == "EXTENSION"
                                                    and (only is None or e.dump_id in only)])
    refused = {e.dump_id for e in toc if e.desc == "EXTENSION" and e.tag in uncreatable}
    skip = frozenset(refused | {e.dump_id for e in toc if e.section is not Section.POST_DATA and e.deps
                                and set(e.deps) <= refused})
    for section in ("pre-data", "post-data"):
        listing = None if only is None else [i for i in section_listing(archive_path, major, section)
                                             if int(i) in only]
        if listing == []:
            continue
        restore_section(archive_path, scratch, major, section, listing=listing,
                        skip=skip if section == "pre-data" else frozenset(), lock_bounded=True)
