"""Sizes as people read them: the one formatter the CLI and the library's reports share.

Binary units (KiB, MiB, GiB, TiB), one decimal above bytes.
"""

from __future__ import annotations


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
