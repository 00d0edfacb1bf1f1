"""How the planning commands (`list`, `status`, `run-due --dry-run`, `retention apply --dry-run`,
`audit`) scale with the number of backups, with and without the catalog index.

Fabricates N manifests (each a full backup of --tables tables, built with the library's own
Manifest class and stored as a backup stores them) in a fresh local repository, then times
the real CLI (`python -m backup_tool`, interpreter start included):

- ``cold``: no catalog index, every manifest is read;
- ``indexed``: after ``status`` wrote the index, one index object is read.

Usage: python3 scripts/catalog_scale.py [--counts 5 5000] [--tables 20] [--runs 3]
Prints a markdown table of median wall times (this checkout's backup_tool is the one run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backup_tool.config.policy import Policy
from backup_tool.repository.catalog import manifest_key, new_backup_id
from backup_tool.repository.catalog_index import INDEX_PREFIX
from backup_tool.repository.manifest import Manifest, StoredObject, TableEntry
from backup_tool.repository.storage import open_storage

T0 = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
COMMANDS = (["list", "--json"], ["status"], ["run-due", "--dry-run"], ["retention", "apply", "--dry-run"],
            ["audit", "--format", "json"])


def fabricate(repo: Path, count: int, tables: int) -> None:
    storage = open_storage(str(repo))
    policy = Policy()
    for n in range(count):
        started = T0 + timedelta(hours=n)
        bid = new_backup_id("full", started)
        entries = tuple(
            TableEntry("public", f"table_{t:03d}", "r", None, ("id", "name", "payload"), 1000 + t,
                       f"{t:016x}", StoredObject(f"backups/{bid}/data/{16384 + t}.copy.zst", 4096, "a" * 64, 65536))
            for t in range(tables))
        manifest = Manifest(
            id=bid, kind="full", parent_id=None, database="app", server_version="15.20",
            server_version_num=150020, encoding="UTF8", system_identifier="7300000000000000001",
            started_at=started, finished_at=started + timedelta(minutes=3),
            expires_at=policy.expires_at("full", started), policy={"name": policy.name, "source": policy.source},
            snapshot_lsn="0/3000028", schema=StoredObject(f"backups/{bid}/schema.pgdump.zst", 2048, "b" * 64, 8192),
            globals=None, schema_fingerprint="f" * 64, tables=entries, sequences=(), inventory={}, options={},
            extra_objects=(), tool_version="scale")
        storage.put_bytes(manifest_key(bid), manifest.to_json())


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "backup_tool", *args], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5, 5000])
    parser.add_argument("--tables", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    rows = []
    for count in opts.counts:
        repo = Path(tempfile.mkdtemp(prefix="bt-scale-")) / "repo"
        try:
            fabricate(repo, count, opts.tables)
            result = {}
            for command in COMMANDS:
                cold = []
                for _ in range(opts.runs):
                    shutil.rmtree(repo / INDEX_PREFIX, ignore_errors=True)
                    cold.append(timed([*command, "--repo", str(repo)]))
                timed(["status", "--repo", str(repo)])  # writes the index
                warm = [timed([*command, "--repo", str(repo)]) for _ in range(opts.runs)]
                result[" ".join(command)] = (statistics.median(cold), statistics.median(warm))
            rows.append((count, result))
        finally:
            shutil.rmtree(repo.parent, ignore_errors=True)
    print(f"Median wall time, interpreter start included ({opts.tables} tables per backup); "
          "cold: no catalog index, indexed: after one run wrote it.\n")
    print("| command | " + " | ".join(f"{c} cold | {c} indexed" for c, _ in rows) + " |")
    print("|---|" + "---:|---:|" * len(rows))
    for command in COMMANDS:
        name = " ".join(command)
        print(f"| `{name}` | " + " | ".join(f"{r[name][0]:.2f} s | {r[name][1]:.2f} s" for _, r in rows) + " |")


if __name__ == "__main__":
    main()
